"""The real-model presets resolve, and offline they fail with the one clear error naming what to download."""

import pytest

from flowalign.api import build_reward
from flowalign.config import load_config, preset_names

REAL = [p for p in preset_names() if p != "shapes"]


def test_presets_cover_both_families_and_three_reward_setups():
    assert {f"{fam}_{r}" for fam in ("sd35m", "flux_dev") for r in ("pickscore", "clip_dino", "vlm")} <= set(REAL)


@pytest.mark.parametrize("name", REAL)
def test_preset_is_valid_and_names_missing_weights(name):
    cfg = load_config(name)
    assert cfg.model in ("stabilityai/stable-diffusion-3.5-medium", "black-forest-labs/FLUX.1-dev")
    heads = [h["name"] for h in cfg.reward]
    assert heads[-1] in ("vlm_artifact", "artifact_head"), "every preset carries the artifact regularizer"
    assert "gate" in cfg.reward[-1]
    if "dino_similarity" in heads:  # the head reads reference images in evaluation and grids too
        assert cfg.prompts.endswith(".jsonl") and cfg.eval_prompts.endswith(".jsonl")
    with pytest.raises(FileNotFoundError) as err:
        build_reward(cfg.reward, normalize=cfg.reward_normalize, log_tame=cfg.reward_log_tame)
    msg = str(err.value)
    assert "hf download" in msg and "/" in msg.split("'")[1], msg
