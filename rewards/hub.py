"""Where reward weights come from and where they go: a hub id or a local path, one clear error when missing.

Every model-backed head accepts either a Hugging Face Hub id (`"yuvalkirstain/PickScore_v1"`) or a local
copy of it (a directory, or a file for single-file checkpoints). When neither is reachable (offline,
`HF_HUB_OFFLINE=1`, no network) the head raises ONE `WeightsNotFoundError` (a `FileNotFoundError`) whose
message names the hub id and the two steps that fix it: download with `hf download ID --local-dir DIR` where
the hub is reachable, then pass `DIR`. Library errors are caught here and re-raised `from None`, so the user
reads one message instead of three chained tracebacks.

Loading is safe by construction: `load_state_dict` reads safetensors, or `torch.load(weights_only=True)`;
it never unpickles arbitrary objects from a downloaded file.

Heavy libraries (huggingface_hub, safetensors) are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

from flowalign.hub import cache_only_when_unreachable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# "name" or "owner/name" (the Hub's repo id grammar, loosely): anything else that does not exist is a bad path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class WeightsNotFoundError(FileNotFoundError):
    """Reward weights are neither a local path nor reachable on the Hub; the message says how to fix it."""


def is_local(source: str | os.PathLike[str]) -> bool:
    """True when `source` is an existing file or directory on this machine."""
    return Path(source).expanduser().exists()


def looks_like_hub_id(source: str) -> bool:
    """True for strings shaped like a Hub repo id (`"name"` or `"owner/name"`) that are not local paths."""
    return not is_local(source) and bool(_HUB_ID.match(source)) and not source.startswith((".", "~"))


def download_hint(hub_id: str, kwarg: str, filename: str | None = None) -> str:
    """The two-step fix for missing weights: the download command and what to pass afterwards."""
    target = f"{hub_id} {filename}" if filename else hub_id
    passed = f"{kwarg}='DIR/{filename}'" if filename else f"{kwarg}='DIR'"
    return (
        f"Download them where the Hub is reachable with `hf download {target} --local-dir DIR` "
        f"(older huggingface_hub: `huggingface-cli download {target} --local-dir DIR`), "
        f"copy DIR to this machine, then pass {passed}."
    )


def weights_not_found(
    hub_id: str, *, what: str, kwarg: str, filename: str | None = None, reason: str = ""
) -> WeightsNotFoundError:
    """Builds the one error a head raises when its weights are missing (not raised here: `raise ... from None`)."""
    item = f"{hub_id!r} (file {filename!r})" if filename else repr(hub_id)
    msg = (
        f"{what}: weights {item} are not in the local Hugging Face cache and could not be fetched from the Hub "
        f"(offline, HF_HUB_OFFLINE=1, no network, or no such repo / file). {download_hint(hub_id, kwarg, filename)}"
    )
    if reason:
        msg += f" (library said: {reason})"
    return WeightsNotFoundError(msg)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _missing_errors() -> tuple[type[BaseException], ...]:
    """The library exceptions that mean "the files are not here" (OSError covers transformers' and the hub's)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover - huggingface_hub always comes with transformers
        pass
    return tuple(errors)


def _missing_cause(exc: BaseException) -> BaseException | None:
    """The "files are not here" error that is `exc` or its explicit cause (`raise ... from e`, as open_clip
    wraps hub errors), or None. Implicit contexts are not followed: an unrelated error raised while handling a
    benign OSError must not be reported as missing weights."""
    kinds = _missing_errors()
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kinds):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__
    return None


@contextmanager
def explain_missing(source: str, *, what: str, kwarg: str, filename: str | None = None) -> Iterator[None]:
    """Turns the "not found / cannot download" errors raised inside into one clear error.

    A hub id becomes `WeightsNotFoundError` naming the id and the download command; an existing local path
    that is incomplete becomes a `FileNotFoundError` saying which path is incomplete. Both are raised
    `from None`. Errors that do not mean "missing files" (anywhere in their cause chain) pass through. For a
    hub id on a machine without network only the cache is read, at once (`flowalign.hub`).

    Args:
        source: the hub id or local path the user passed.
        what: the head's name for the message (e.g. `"pickscore"`).
        kwarg: the keyword argument that takes a local copy instead (e.g. `"model"`).
        filename: the single file fetched from the repo, when there is one.
    """
    local, no_network = is_local(source), None
    try:
        with nullcontext() if local else cache_only_when_unreachable() as no_network:
            yield
    except WeightsNotFoundError:
        raise
    except Exception as exc:
        cause = _missing_cause(exc)
        if cause is None:
            raise
        if local:
            raise FileNotFoundError(
                f"{what}: the local copy {str(source)!r} passed as {kwarg}= is incomplete or unreadable "
                f"({_first_line(cause)}). Pass a directory made with `hf download ID --local-dir DIR`."
            ) from None
        reason = f"{no_network}; {_first_line(cause)}" if no_network else _first_line(cause)
        raise weights_not_found(source, what=what, kwarg=kwarg, filename=filename, reason=reason) from None


def check_source(source: str | os.PathLike[str], *, what: str, kwarg: str) -> str:
    """Validates a user-given weights source; returns it as a string (local paths expanded).

    Raises `FileNotFoundError` right away for something that is meant as a local path (absolute, relative
    with `./`, `~`, or not shaped like a hub id) but does not exist, instead of asking the Hub for it.
    """
    text = str(source)
    if is_local(text):
        return str(Path(text).expanduser())
    if not looks_like_hub_id(text):
        raise FileNotFoundError(
            f"{what}: {kwarg}={text!r} is neither an existing local path nor a Hugging Face Hub id (owner/name)"
        )
    return text


def from_pretrained(
    loader: Callable[..., T], source: str, *, what: str, kwarg: str, require: str | None = None, **kwargs: Any
) -> T:
    """Calls `loader(source, **kwargs)` (a transformers `from_pretrained`) with the one clear missing-weights error.

    Args:
        loader: e.g. `CLIPModel.from_pretrained`.
        source: hub id or local directory.
        what, kwarg: for the error message (see `explain_missing`).
        require: a file a local directory must hold (e.g. `"config.json"`), checked up front so an incomplete
            copy fails with its name rather than a library error about something else.

    Example: `from_pretrained(CLIPModel.from_pretrained, "openai/clip-vit-large-patch14", what="aesthetic",
    kwarg="clip", require="config.json")`.
    """
    source = check_source(source, what=what, kwarg=kwarg)
    if require and Path(source).is_dir() and not (Path(source) / require).is_file():
        present = ", ".join(sorted(p.name for p in Path(source).iterdir())[:20]) or "(empty)"
        raise FileNotFoundError(
            f"{what}: the local copy {source!r} passed as {kwarg}= is incomplete: no {require} (it holds: {present}). "
            f"Pass a directory made with `hf download ID --local-dir DIR`."
        )
    with explain_missing(source, what=what, kwarg=kwarg):
        return loader(source, **kwargs)


def resolve_file(source: str | os.PathLike[str], filename: str | None, *, what: str, kwarg: str) -> Path:
    """A single weights file from a local file, a local directory holding `filename`, or a hub repo.

    Args:
        source: a local file, a local directory, or a hub repo id.
        filename: the file inside the directory / repo (`None` when `source` must be the file itself).
        what, kwarg: for the error message (see `explain_missing`).

    Returns:
        The local path of the file (downloaded into the Hugging Face cache when `source` is a hub id).
    """
    text = check_source(source, what=what, kwarg=kwarg)
    path = Path(text)
    if path.is_file():
        return path
    if path.is_dir():
        if filename is None or not (path / filename).is_file():
            present = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "(empty)"
            raise FileNotFoundError(
                f"{what}: directory {text!r} passed as {kwarg}= has no {filename!r}; it holds: {present}"
            )
        return path / filename
    if filename is None:
        raise FileNotFoundError(f"{what}: {kwarg}={text!r} must be a local file (no filename to fetch from a repo)")
    from huggingface_hub import hf_hub_download

    with explain_missing(text, what=what, kwarg=kwarg, filename=filename):
        return Path(hf_hub_download(text, filename))


def resolve_snapshot(source: str | os.PathLike[str], *, what: str, kwarg: str, **kwargs: Any) -> Path:
    """A local directory holding a whole repo: `source` itself when local, else `snapshot_download(source)`.

    Extra kwargs go to `huggingface_hub.snapshot_download` (e.g. `allow_patterns`).
    """
    text = check_source(source, what=what, kwarg=kwarg)
    if Path(text).is_dir():
        return Path(text)
    if Path(text).is_file():
        raise FileNotFoundError(f"{what}: {kwarg}={text!r} is a file; pass the directory that holds the model")
    from huggingface_hub import snapshot_download

    with explain_missing(text, what=what, kwarg=kwarg):
        return Path(snapshot_download(text, **kwargs))


def load_state_dict(path: str | os.PathLike[str], *, what: str = "weights") -> dict[str, torch.Tensor]:
    """Reads a state dict safely: safetensors, or `torch.load(weights_only=True)` for `.pt/.pth/.bin`.

    A checkpoint stored as `{"state_dict": {...}}` (HPSv2, Lightning) is unwrapped and a DataParallel
    `module.` prefix is stripped. A file that needs arbitrary unpickling is refused with a clear error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{what}: {str(path)!r} holds Python objects beyond tensors and containers; flowalign only loads "
                f"weights_only checkpoints or safetensors (never arbitrary pickles). Convert it where you trust it: "
                f"`safetensors.torch.save_file(state_dict, 'weights.safetensors')`. ({_first_line(exc)})"
            ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: {str(path)!r} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` picks CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Model weights dtype: a torch dtype or one of fp32/fp16/bf16. `None` is fp32 (reward models are small
    next to the policy; pass `"bf16"` on GPUs to halve their memory). Similarities are always computed in fp32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(sorted(_DTYPES))} or a torch.dtype")
    return _DTYPES[dtype]
