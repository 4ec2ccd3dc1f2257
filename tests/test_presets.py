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


@pytest.mark.parametrize("name", REAL)
def test_preset_lora_targets_each_name_a_layer_of_its_family(name):
    """peft fails only when no target matches: a misspelt one among several would silently train less."""
    from flowalign.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    cfg = load_config(name)
    pipe = (tiny_flux_pipeline if "FLUX" in cfg.model else tiny_sd3_pipeline)(seed=0)
    names = [n for n, _ in pipe.transformer.named_modules()]
    for target in cfg.lora_targets:
        assert any(n == target or n.endswith("." + target) for n in names), (name, target)
    assert (cfg.height, cfg.width, cfg.max_sequence_length, cfg.adv_std) == (512, 512, 128, "batch")
