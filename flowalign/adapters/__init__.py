"""Model-family adapters: one file per diffusers pipeline family, all implementing `flowalign.types.FlowAdapter`.

`adapter_for(pipe)` picks the adapter for a built pipeline; `load_pipeline(model)` is the user-facing loader
(hub id or local directory) that fails with one clear message when the weights are not available offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from flowalign.adapters.flux import FluxAdapter
from flowalign.adapters.sd3 import SD3Adapter
from flowalign.registry import Registry
from flowalign.types import FlowAdapter

__all__ = ["ADAPTERS", "FluxAdapter", "SD3Adapter", "adapter_for", "load_pipeline"]

#: family name -> adapter class (each has `pipeline_class` and `family`).
ADAPTERS: Registry = Registry("model family")
ADAPTERS.register("sd3")(SD3Adapter)
ADAPTERS.register("flux")(FluxAdapter)


def _supported() -> str:
    return ", ".join(f"{ADAPTERS.get(n).pipeline_class.__name__} ({n})" for n in ADAPTERS.names())


def adapter_for(pipe: Any, **kwargs: Any) -> FlowAdapter:
    """The adapter for a stock diffusers pipeline object.

    Args:
        pipe: e.g. a `StableDiffusion3Pipeline` or `FluxPipeline`.
        **kwargs: forwarded to the adapter (`max_sequence_length`, `height`, `width`, FLUX `true_cfg_scale`).
    """
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        if isinstance(pipe, cls.pipeline_class):
            return cls(pipe, **kwargs)
    raise ValueError(f"no flowalign adapter for {type(pipe).__name__}; supported pipelines: {_supported()}")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or flag in {"1", "ON", "YES", "TRUE"}


def _not_found(model: str, offline: bool, detail: str) -> FileNotFoundError:
    where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the Hugging Face Hub"
    fix = (
        f"Download it first with `hf download {model} --local-dir DIR` (older huggingface_hub: "
        f"`huggingface-cli download {model} --local-dir DIR`) and pass DIR"
    )
    fix += ", or unset HF_HUB_OFFLINE so from_pretrained can download it." if offline else "."
    return FileNotFoundError(f"model {model!r} is neither a local directory nor {where}{detail}. {fix}")


def load_pipeline(
    model: str | os.PathLike,
    *,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
):
    """Loads a diffusers pipeline with `from_pretrained` from a local directory or a Hugging Face hub id.

    Args:
        model: local directory (with `model_index.json`) or hub id such as
            "stabilityai/stable-diffusion-3.5-medium".
        family: "sd3" or "flux" to load that pipeline class; None lets diffusers pick it from `model_index.json`.
        dtype: `torch_dtype` for every component (None: diffusers' default, fp32).
        **kwargs: forwarded to `from_pretrained` (`revision`, `variant`, `text_encoder_3=None`, ...).

    Raises:
        FileNotFoundError: the model is neither a local directory nor available from the hub cache (or, online,
            from the hub); the message says how to fix it.
    """
    from diffusers import DiffusionPipeline

    cls = DiffusionPipeline if family is None else ADAPTERS.get(family).pipeline_class
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    name = os.fspath(model)
    local = Path(name).expanduser()
    if local.is_dir():
        name, index = str(local), local / "model_index.json"
    else:
        offline = _hub_offline() or bool(kwargs.get("local_files_only", False))
        try:  # a cheap existence check, so errors from inside diffusers are never mistaken for "not found"
            from huggingface_hub import hf_hub_download

            index = Path(
                hf_hub_download(name, "model_index.json", revision=kwargs.get("revision"), local_files_only=offline)
            )
        except (OSError, ValueError) as err:
            detail = " (nor a valid hub id)" if type(err).__name__ == "HFValidationError" else ""
            if not offline and not detail:
                detail = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            raise _not_found(name, offline, detail) from None
    # Components saved as None (SD3 without T5: text_encoder_3 / tokenizer_3) must be passed as None again.
    if index.is_file():
        for key, value in json.loads(index.read_text(encoding="utf-8")).items():
            if isinstance(value, list) and len(value) == 2 and value[0] is None and value[1] is None:
                kwargs.setdefault(key, None)
    return cls.from_pretrained(name, **kwargs)
