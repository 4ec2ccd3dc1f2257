"""A trained run in the formats diffusers loads, so the aligned model runs in users' own code without flowalign.

A LoRA run exports as a diffusers LoRA file (`pipe.load_lora_weights(DIR)`) or, `merged`, as a whole pipeline
(`from_pretrained(DIR)`); a full fine-tune as a whole pipeline. The weights are the ones flowalign evaluates: the
EMA where the run kept one. Trainable weights live in fp32 during training; a merged or fully fine-tuned
transformer is saved in fp32 unless `dtype` says otherwise, since rounding a small update into bf16 base weights
can erase it.

A LoRA gated to high noise (`lora_min_sigma`) acts only on some denoising steps, which a merged model cannot
express: it exports as a LoRA file, and `flowalign.lora_window.limit_lora` restores the gate after loading
(`usage` in export.json says how).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowalign.api import DTYPES, require_empty_dir
from flowalign.config import TrainConfig, load_run_config
from flowalign.trainer import GRPOTrainer, checkpoint_dir


@dataclass(frozen=True)
class Export:
    """What `export_run` wrote (also export.json in the directory)."""

    path: str
    kind: str  # "lora" (load onto the base model) or "pipeline" (load on its own)
    base_model: str  # the model the run trained (a LoRA belongs on it)
    step: int
    ema: bool  # the EMA weights were exported
    lora_min_sigma: float  # > 0: the LoRA must be gated to sigma >= this after loading
    sampling: dict  # the run's evaluation settings (what its figures were measured with); flowalign.json of a pipeline
    usage: str  # Python that loads it


def _sampling(trainer: GRPOTrainer) -> dict:
    """How the run evaluated, in a model card's keys (those `flowalign.api.model_card` reads back)."""
    cfg, adapter = trainer.cfg, trainer.adapter
    return {
        "num_inference_steps": cfg.eval_num_steps,
        "guidance_scale": cfg.eval_guidance,
        "stochastic_sampling": cfg.eval_sampler == "renoise",
        # the text length matters: the shapes model learned 4 zero T5 tokens, not the pipeline's 256
        "max_sequence_length": adapter.max_sequence_length,
        "height": adapter.height,
        "width": adapter.width,
    }


def _usage(kind: str, path: Path, trainer: GRPOTrainer, sampling: dict, dtype: str | None = None) -> str:
    """Python that loads the export and samples it as the run evaluated it (`sampling`)."""
    from flowalign import zoo

    cfg, pipe = trainer.cfg, trainer.adapter.pipe
    cls = type(pipe).__name__
    if kind == "pipeline":
        # Slots saved empty (SD3 without T5) must be passed as None again, or from_pretrained refuses the folder.
        empty = [k for k, v in pipe.config.items() if tuple(v or ()) == (None, None)]
        none = "".join(f", {k}=None" for k in empty if k not in type(pipe)._optional_components)
        lines = [f"from diffusers import {cls}", f'pipe = {cls}.from_pretrained("{path}"{none})']
        if dtype not in (None, "float32"):  # saved in that dtype; from_pretrained alone would load it as fp32
            lines[0:1] = ["import torch", lines[0]]
            lines[-1] = lines[-1][:-1] + f", torch_dtype=torch.{dtype})"
    elif cfg.model in zoo.ZOO:
        lines = ["from flowalign import zoo", f'pipe = zoo.load("{cfg.model}")']
    else:
        lines = [f"from diffusers import {cls}", f'pipe = {cls}.from_pretrained("{cfg.model}")']
    if kind == "lora":
        lines.append(f'pipe.load_lora_weights("{path}")')
        if cfg.lora_min_sigma > 0:
            lines[:0] = ["from flowalign.lora_window import limit_lora"]
            lines.append(
                f"limit_lora(pipe.transformer, {cfg.lora_min_sigma}, {trainer.adapter.timestep_per_sigma:g})"
                "  # the LoRA acts only where it was trained"
            )
    call = dict(sampling)
    stochastic = call.pop("stochastic_sampling")
    if bool(pipe.scheduler.config.get("stochastic_sampling", False)) != stochastic:
        lines.append(
            f"pipe.scheduler.register_to_config(stochastic_sampling={stochastic})  # the run's {cfg.eval_sampler}"
        )
    lines.append(f'image = pipe("a prompt", {", ".join(f"{k}={v}" for k, v in call.items())}).images[0]')
    return "\n".join(lines)


def check_request(out: str | Path | None, dtype: str | None, merged: bool, run: TrainConfig | str | Path) -> bool:
    """Everything an export can check before any model loads: a new or empty `out` and a known `dtype` first, then
    from the run's config (`run`: it, or a checkpoint to read it from) that the dtype applies and the LoRA can be
    merged. Returns whether the export merges (a full fine-tune is already a whole model)."""
    if out is None or str(out).strip() == "":
        raise ValueError("export needs out=: a new directory for the exported model")
    require_empty_dir(out, "export into a new directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = run if isinstance(run, TrainConfig) else load_run_config(checkpoint_dir(run))
    lora = cfg.lora_rank > 0
    if merged and lora and cfg.lora_min_sigma > 0:
        raise ValueError(
            f"this run's LoRA acts only at sigma >= {cfg.lora_min_sigma} (lora_min_sigma), which a merged model "
            "cannot express: export the LoRA (without merged) and gate it with flowalign.lora_window.limit_lora"
        )
    if dtype is not None and lora and not merged:
        raise ValueError("dtype applies to a saved pipeline (merged or a full fine-tune), not to a LoRA file")
    return merged and lora


def export_run(trainer: GRPOTrainer, out: str | Path, *, merged: bool = False, dtype: str | None = None) -> Export:
    """Writes `trainer`'s current (EMA) weights to `out` for diffusers; see the module docstring.

    `merged` (LoRA runs) fuses the LoRA into the transformer and saves the whole pipeline; a full fine-tune always
    saves the whole pipeline. `dtype` casts a saved pipeline's transformer (default fp32, exact). The trainer's
    transformer is changed by a merged or full export: build a new trainer to go on training.
    """
    cfg, out = trainer.cfg, Path(out)
    lora = cfg.lora_rank > 0
    merged = check_request(out, dtype, merged, cfg)
    pipe, transformer = trainer.adapter.pipe, trainer.adapter.transformer
    kind = "lora" if lora and not merged else "pipeline"
    with trainer.ema_weights():
        if kind == "lora":
            from peft import get_peft_model_state_dict

            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
            type(pipe).save_lora_weights(
                out,
                transformer_lora_layers=state,
                transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
            )
        else:
            transformer.to(torch.float32)  # the fp32 trainable weights meet the base's in full precision
            if lora:
                transformer.fuse_lora()
                transformer.unload_lora()
            transformer.to(DTYPES[dtype or "float32"])
            pipe.save_pretrained(out)
    sampling = _sampling(trainer)
    result = Export(
        path=str(out),
        kind=kind,
        base_model=cfg.model,
        step=trainer.step,
        ema=trainer.ema is not None,
        lora_min_sigma=cfg.lora_min_sigma if kind == "lora" else 0.0,
        sampling=sampling,
        usage=_usage(kind, out, trainer, sampling, dtype),
    )
    (out / "export.json").write_text(json.dumps(asdict(result), indent=2))
    if kind == "pipeline":  # read by flowalign when it loads this folder (`sample --model DIR`, a config's model)
        (out / "flowalign.json").write_text(json.dumps(sampling, indent=2))
    return result
