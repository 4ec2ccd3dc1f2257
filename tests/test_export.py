"""Export: what `flowalign export` writes, loaded with plain diffusers, draws what the run's own weights draw."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

import flowalign.zoo
from flowalign.export import export_run
from flowalign.lora_window import limit_lora
from flowalign.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_trainer

PROMPTS = ["a red circle", "a blue square"]


def _stock(pipe, steps=4, seed=0) -> torch.Tensor:
    """An unchanged diffusers call: what a user of the export runs."""
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=8,
        output_type="pt",
    ).images


def _trained(tmp_path, **over):
    trainer = tiny_trainer(tmp_path / "run", PROMPTS, max_steps=2, ema_decay=0.5, **over)
    trainer.train(progress=False)
    with torch.no_grad():
        raw = _stock(trainer.adapter.pipe)
        with trainer.ema_weights():
            evaluated = _stock(trainer.adapter.pipe)
    assert not torch.allclose(raw, evaluated, atol=1e-4)  # the EMA differs from the last weights: which went out?
    return trainer, evaluated


@pytest.mark.parametrize(("family", "timestep_per_sigma"), [("sd3", 1000), ("flux", 1)])
def test_a_gated_lora_loads_into_a_stock_pipeline_and_draws_the_runs_ema_images(tmp_path, family, timestep_per_sigma):
    trainer, evaluated = _trained(tmp_path, family=family, sde_window=1, sde_window_max_start=0, lora_min_sigma=0.8)
    result = export_run(trainer, tmp_path / "lora")
    assert result.kind == "lora" and result.ema and result.lora_min_sigma == 0.8 and result.step == 2
    assert json.loads((tmp_path / "lora" / "export.json").read_text())["usage"] == result.usage
    assert f"limit_lora(pipe.transformer, 0.8, {timestep_per_sigma})" in result.usage

    pipe = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[family](seed=0)  # the same base model, rebuilt
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        everywhere = _stock(pipe)
        limit_lora(pipe.transformer, 0.8, timestep_per_sigma)
        gated = _stock(pipe)
    assert (gated - evaluated).abs().max() <= 1e-5
    assert not torch.allclose(everywhere, evaluated, atol=1e-4)  # the gate is part of the model

    with pytest.raises(ValueError, match="which a merged model cannot express"):
        export_run(trainer, tmp_path / "merged", merged=True)
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_run(trainer, tmp_path / "lora")


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["merged-lora", "full-finetune"])
def test_a_merged_lora_or_full_finetune_loads_with_from_pretrained_alone(tmp_path, lora_rank):
    trainer, evaluated = _trained(tmp_path, lora_rank=lora_rank)
    result = export_run(trainer, tmp_path / "pipe", merged=True)
    assert result.kind == "pipeline" and "pipe = StableDiffusion3Pipeline.from_pretrained(" in result.usage
    assert "text_encoder_3=None, tokenizer_3=None)" in result.usage  # this SD3 has no T5: say so when loading
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe", text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.dtype == torch.float32 and not getattr(pipe.transformer, "peft_config", None)
    with torch.no_grad():
        loaded, base = _stock(pipe), _stock(tiny_sd3_pipeline(seed=0))
    assert (loaded - evaluated).abs().max() <= 1e-4
    assert not torch.allclose(loaded, base, atol=1e-4)  # and it is not the base model
    # flowalign itself loads the folder with the run's settings (the text length above all)
    from flowalign.api import load_model, recommended_sampling

    assert load_model(str(tmp_path / "pipe"))[1]["max_sequence_length"] == 8
    assert recommended_sampling(str(tmp_path / "pipe"))["eval_num_steps"] == trainer.cfg.eval_num_steps
    if lora_rank == 0:  # saved in bf16 on request: the printed line loads it as such
        half = export_run(trainer, tmp_path / "half", dtype="bfloat16")
        assert "torch_dtype=torch.bfloat16)" in half.usage
        scope: dict = {}
        exec(half.usage.split("\nimage = ")[0], scope)  # imports and from_pretrained, as printed
        assert scope["pipe"].transformer.dtype == torch.bfloat16


def test_cli_export_prints_python_that_loads_and_samples_the_run(tmp_path):
    """On the shipped model: a one-step run, `flowalign export`, then the printed usage runs as it stands."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    train = [sys.executable, "-m", "flowalign.cli", "train", "shapes", "--max-steps", "1", "--prompts-per-step", "1"]
    train += ["--group-size", "4", "--train-batch-size", "4", "--num-eval-prompts", "2", "--grid-prompts", "0"]
    res = subprocess.run([*train, "--output-dir", str(run), "--no-progress"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "exported"
    res = subprocess.run(
        [sys.executable, "-m", "flowalign.cli", "export", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    usage = json.loads((out / "export.json").read_text())["usage"]
    assert all(line in res.stdout for line in usage.splitlines())
    card = json.loads((Path(flowalign.zoo.model_dir("shapes")) / "flowalign.json").read_text())
    size = f"height={card['height']}, width={card['width']}"
    assert f"max_sequence_length={card['max_sequence_length']}, {size})" in usage  # sampled as it was trained
    script = "import flowalign.lora_window, flowalign.zoo, torch\n" + usage.replace('"a prompt"', '"a red circle"')
    script += "\nassert image.size == (32, 32), image.size\nprint('drew', image.size)"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "drew (32, 32)" in res.stdout, res.stderr[-2000:]

    res = subprocess.run(
        [sys.executable, "-m", "flowalign.cli", "export", str(run), "--out", str(tmp_path / "m"), "--merged"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 2 and "merged model cannot express" in res.stderr and "Traceback" not in res.stderr
    # both config refusals come from the run's config, before its model loads
    from unittest import mock

    import flowalign.api as api

    with mock.patch.object(api, "load_run", side_effect=AssertionError("the model loaded")):
        with pytest.raises(ValueError, match="merged model cannot express"):
            api.export(run, tmp_path / "m2", merged=True)
        with pytest.raises(ValueError, match="dtype applies to a saved pipeline"):
            api.export(run, tmp_path / "m3", dtype="bfloat16")
