"""Built-in models shipped inside the package, loaded through the same `from_pretrained` path as a real model.

    import flowalign.zoo
    pipe = flowalign.zoo.load("shapes")               # a diffusers StableDiffusion3Pipeline, offline
    settings = flowalign.zoo.sampling_settings("shapes")  # max_sequence_length, num_inference_steps, ...

Each model folder holds the `save_pretrained` output, a model card (`README.md`) and a `flowalign.json` sidecar
with the recommended sampling settings and the accuracy measured when the model was made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).parent

ZOO: dict[str, Path] = {
    "shapes": _HERE / "shapes",  # coloured shapes at 32×32; see shapes/README.md
}

# How each model is (re)made; named in the error when its weights are missing.
_PRETRAIN_COMMANDS: dict[str, str] = {
    "shapes": "python -m flowalign.zoo.pretrain --out flowalign/zoo/shapes --steps 10670 --seed 0 --text-layers 2 "
    "--train-text --no-bf16 --compile",
}


def model_dir(name: str) -> Path:
    """The folder of a built-in model, checked to hold saved weights."""
    if name not in ZOO:
        raise ValueError(f"unknown built-in model {name!r}; valid names: {', '.join(sorted(ZOO))}")
    path = ZOO[name]
    if not (path / "model_index.json").exists() or not any(path.rglob("*.safetensors")):
        raise FileNotFoundError(
            f"the weights of built-in model {name!r} are missing from {path}; create them with "
            f"`{_PRETRAIN_COMMANDS[name]}` (run from the repository root)"
        )
    return path


def sampling_settings(name: str = "shapes") -> dict[str, Any]:
    """The recommended sampling settings and the measured base accuracy from the model's `flowalign.json`.

    Keys: max_sequence_length, num_inference_steps, guidance_scale, height, width, stochastic_sampling (already set
    in the shipped scheduler's config; recorded here), and "eval" ({"strict", "partial", "n", "seeds"} on the
    held-out split).
    """
    path = model_dir(name) / "flowalign.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rerun `{_PRETRAIN_COMMANDS[name]}` to write it")
    return json.loads(path.read_text(encoding="utf-8"))


def load(
    name: str = "shapes", *, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> Any:
    """Loads a built-in model as a diffusers pipeline with `from_pretrained` (no network).

    Args:
        name: one of `ZOO` ("shapes").
        torch_dtype: dtype of the loaded weights.
        device: where to move the pipeline; left on the CPU when None.

    Returns:
        A `StableDiffusion3Pipeline`. Sample it with `max_sequence_length=sampling_settings(name)[...]`: the model
        was trained with that many zero T5 tokens.
    """
    from diffusers import StableDiffusion3Pipeline

    from flowalign.adapters import dtype_kwarg

    path = str(model_dir(name))
    pipe = StableDiffusion3Pipeline.from_pretrained(
        path,
        text_encoder_3=None,  # no T5: the saved index records it as absent, and the SD3 class requires the slot
        tokenizer_3=None,
        local_files_only=True,
        **{dtype_kwarg(): torch_dtype},
    )
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


__all__ = ["ZOO", "load", "model_dir", "sampling_settings"]
