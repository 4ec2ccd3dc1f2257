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
from flowalign.config import is_run_dir
from flowalign.hub import cache_only_when_unreachable, hub_offline_env
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


_SWITCHED_OFF = "HF_HUB_OFFLINE is set"


def _not_found(model: str, why: str | None, detail: str) -> FileNotFoundError:
    """The one error for missing weights; `why` the hub was not asked (None: it was asked and said no)."""
    where = f"in the local Hugging Face cache ({why})" if why else "on the Hugging Face Hub"
    fix = (
        f"Download it first with `hf download {model} --local-dir DIR` (older huggingface_hub: "
        f"`huggingface-cli download {model} --local-dir DIR`) and pass DIR (`--model DIR`, `model: DIR` in a YAML,"
        " `model='DIR'` in Python)"
    )
    if why == _SWITCHED_OFF:
        fix += ", or unset HF_HUB_OFFLINE so from_pretrained can download it."
    elif why:
        fix += " (download where the Hub is reachable, then copy DIR to this machine)."
    else:
        fix += "."
    return FileNotFoundError(f"model {model!r} is neither a local directory nor {where}{detail}. {fix}")


def dtype_kwarg() -> str:
    """`dtype` where diffusers accepts it (recent releases deprecate `torch_dtype`), else `torch_dtype`: older
    releases would silently ignore an unknown `dtype` and load fp32, so the name is chosen, never guessed."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


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
        dtype: the dtype of every component (None: diffusers' default, fp32).
        **kwargs: forwarded to `from_pretrained` (`revision`, `variant`, `cache_dir`, `text_encoder_3=None`, ...).

    Without network (the Hub's host does not resolve) only the local cache is read, at once, instead of after
    huggingface_hub's retries.

    Raises:
        FileNotFoundError: the model is neither a local directory nor available from the hub cache (or, online,
            from the hub); the message says how to fix it.
    """
    from diffusers import DiffusionPipeline

    cls = DiffusionPipeline if family is None else ADAPTERS.get(family).pipeline_class
    if dtype is not None:
        kwargs[dtype_kwarg()] = dtype
    name = os.fspath(model)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            hint = (
                " It holds a flowalign run: pass it as --checkpoint (checkpoint= in Python), or export it with"
                " `flowalign export`."
                if is_run_dir(local)
                else " Pass the folder that `save_pretrained` (or `hf download`) wrote."
            )
            raise FileNotFoundError(
                f"{str(local)!r} is a folder but not a diffusers pipeline (no model_index.json).{hint}"
            )
        return _from_pretrained(cls, str(local), local / "model_index.json", kwargs)
    if local.is_file():
        raise FileNotFoundError(
            f"model {name!r} is a file; pass a pipeline folder (with model_index.json) or a hub id"
        )
    switched_off = hub_offline_env()
    with cache_only_when_unreachable() as no_network:
        if switched_off:
            why = _SWITCHED_OFF
        elif no_network:
            why, kwargs["local_files_only"] = no_network, True  # diffusers keeps its own copy of the offline flag
        else:
            why = "local_files_only=True" if kwargs.get("local_files_only") else None
        try:  # a cheap existence check, so errors from inside diffusers are never mistaken for "not found"
            import huggingface_hub

            where = {k: kwargs[k] for k in ("revision", "cache_dir", "token") if kwargs.get(k) is not None}
            index = Path(
                huggingface_hub.hf_hub_download(name, "model_index.json", local_files_only=bool(why), **where)
            )
        except (OSError, ValueError) as err:
            detail = " (nor a valid hub id)" if type(err).__name__ == "HFValidationError" else ""
            if not why and not detail:
                detail = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            raise _not_found(name, why, detail) from None
        return _from_pretrained(cls, name, index, kwargs)


def _from_pretrained(cls: Any, name: str, index: Path, kwargs: dict[str, Any]):
    # Components saved as None (SD3 without T5: text_encoder_3 / tokenizer_3) must be passed as None again.
    if index.is_file():
        for key, value in json.loads(index.read_text(encoding="utf-8")).items():
            if isinstance(value, list) and len(value) == 2 and value[0] is None and value[1] is None:
                kwargs.setdefault(key, None)
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as err:  # a local folder with a component's weights missing: diffusers' message, not its trace
        if not Path(name).is_dir():
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(f"pipeline folder {name!r} is incomplete: {first}") from None
