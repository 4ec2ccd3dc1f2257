"""CLIP score: cosine(image embedding, prompt embedding), through open_clip or transformers' `CLIPModel`.

`ClipEncoder` is the reusable piece (PickScore, HPSv2, the aesthetic predictor and the artifact head build on
it): torch preprocessing identical to the model's own processor (`rewards.preprocess`), batched image
features with gradients to the pixels, and a per-prompt text-feature cache (each prompt is scored G times
per group and again every epoch). Features are L2-normalised in fp32 whatever the model dtype.

Score convention: `clip_score` returns the raw cosine in [-1, 1] (`scale=1.0`, the default). Pass
`scale=100.0` for the "CLIPScore" of Hessel et al. / torchmetrics (which also clamps at 0; we do not clamp,
so negative similarity still carries signal for RL).

open_clip is imported lazily (it imports torchvision); transformers models load through `from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import pickle
import posixpath
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rewards.base import REWARDS, check_images
from rewards.hub import (
    WeightsNotFoundError,
    check_source,
    explain_missing,
    from_pretrained,
    is_local,
    looks_like_hub_id,
    resolve_device,
    resolve_dtype,
    resolve_file,
)
from rewards.preprocess import ImagePreprocess

logger = logging.getLogger(__name__)

# open_clip's weight file names on the Hub, safetensors first (their own preference order).
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_LOCAL_CHECKPOINTS = OPEN_CLIP_WEIGHT_FILES + (
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.pth",
    "pytorch_model.bin",
)


def _unwrap_features(out: Any) -> Tensor:
    """transformers 4 returns a tensor from get_*_features; transformers 5 returns an output whose
    `pooler_output` holds the projected features."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected feature output {type(out).__name__}; expected a tensor or pooler_output")
    return pooled


class ClipEncoder:
    """A CLIP-family dual encoder with differentiable torch preprocessing and a text-feature cache.

    `ClipEncoder("openai/clip-vit-large-patch14")` (transformers) or `ClipEncoder("ViT-H-14",
    "laion2b_s32b_b79k")` (open_clip); `backend="auto"` picks open_clip when `pretrained` is given, for
    `hf-hub:` / `local-dir:` names and for directories holding `open_clip_config.json`, and transformers for
    other hub ids / directories. `from_open_clip` / `from_hf` say it explicitly.

    Attributes:
        model: the underlying module (frozen, eval mode, on `device` in `dtype`).
        preprocess: the torch version of the model's image processor.
        device, dtype: where and in which precision the model runs.
        batch_size: images / prompts per forward pass.
        logit_scale: `exp(model.logit_scale)`, the temperature the model was trained with (~100 for CLIP).
        kind, model_id: `"clip"` and the source it was loaded from (recorded by heads trained on it).
    """

    kind = "clip"

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        pretrained: str | None = None,
        *,
        processor: str | None = None,
        backend: Literal["auto", "hf", "open_clip"] = "auto",
        quick_gelu: bool | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        cache_size: int = 4096,
        name: str = "clip",
        model_kwarg: str = "model",
        processor_kwarg: str = "processor",
    ) -> None:
        """Loads the model.

        Args:
            model: open_clip: a built-in (or `open_clip.add_model_config`-registered) architecture name such as
                `"ViT-H-14"`, `"hf-hub:org/repo"`, `"local-dir:/path"`, or a local directory holding
                `open_clip_config.json` and the weights. transformers: a hub id or a local directory
                (`save_pretrained` / `hf download ID --local-dir DIR`).
            pretrained: open_clip only, with an architecture name: a pretrained tag (`"openai"`,
                `"laion2b_s32b_b79k"`), a local checkpoint file (safetensors, or `.bin/.pt` read with
                `weights_only=True`; `{"state_dict": ...}` checkpoints such as HPSv2's are unwrapped), a local
                directory holding one, or a hub repo id with open_clip weights.
            processor: transformers only: hub id / directory of the tokenizer + image processor (default:
                `model`; PickScore keeps its processor in `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
            backend: `"auto"`, `"hf"` or `"open_clip"`.
            quick_gelu: open_clip only: force QuickGELU (OpenAI weights need it); `None` takes the tag's.
            device, dtype: placement (`None`: CUDA if available; fp32). Similarities are fp32 regardless.
            batch_size: images / prompts per forward pass.
            cache_size: prompts kept in the text-feature cache (least recently used dropped first).
            name: the head's name in error messages.
            model_kwarg, processor_kwarg: the caller's keyword names, for the missing-weights message.
        """
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        if backend == "auto":
            backend = _guess_backend(str(model), pretrained)
        if backend not in ("hf", "open_clip"):
            raise ValueError(f"{name}: backend must be 'auto', 'hf' or 'open_clip', got {backend!r}")
        self.name, self.model_id, self.backend = name, str(model), backend
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.batch_size, self.cache_size = batch_size, cache_size
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()
        if backend == "open_clip":
            if processor is not None:
                raise ValueError(f"{name}: processor= is for transformers models; open_clip reads its own config")
            self._load_open_clip(str(model), pretrained, quick_gelu, model_kwarg)
        else:
            if pretrained is not None:
                raise ValueError(f"{name}: pretrained= is for open_clip models; a transformers model is one id")
            processor_kwarg = processor_kwarg if processor is not None else model_kwarg
            self._load_hf(str(model), processor or str(model), model_kwarg, processor_kwarg)
        self.model = self.model.eval().requires_grad_(False)
        self.logit_scale = float(self.model.logit_scale.detach().float().exp())

    @classmethod
    def from_open_clip(cls, model: str = "ViT-L-14", pretrained: str | None = "openai", **kwargs: Any) -> ClipEncoder:
        """An open_clip model (see `__init__` for the arguments)."""
        return cls(model, pretrained, backend="open_clip", **kwargs)

    @classmethod
    def from_hf(
        cls, model: str = "openai/clip-vit-large-patch14", processor: str | None = None, **kwargs: Any
    ) -> ClipEncoder:
        """A transformers CLIP-family model (`CLIPModel`, or anything with `get_image_features` /
        `get_text_features`) and its processor (see `__init__` for the arguments)."""
        return cls(model, processor=processor, backend="hf", **kwargs)

    def _load_open_clip(self, model: str, pretrained: str | None, quick_gelu: bool | None, kwarg: str) -> None:
        import open_clip

        model_name, checkpoint, overrides = _resolve_open_clip(model, pretrained, self.name, kwarg)
        if checkpoint is None and not model_name.startswith("local-dir:"):
            raise ValueError(f"{self.name}: open_clip model {model!r} needs pretrained= weights (tag, file, hub id)")
        if quick_gelu is not None:
            overrides["force_quick_gelu"] = quick_gelu
        with explain_missing(model, what=self.name, kwarg=kwarg):
            try:  # open_clip reads .bin/.pt checkpoints with torch.load(weights_only=True)
                net = open_clip.create_model(model_name, pretrained=checkpoint, device="cpu", **overrides)
            except pickle.UnpicklingError as exc:
                raise ValueError(
                    f"{self.name}: {checkpoint!r} holds Python objects beyond tensors; flowalign only loads "
                    f"weights_only checkpoints or safetensors. ({str(exc).splitlines()[0][:200]})"
                ) from None
            tokenizer = open_clip.get_tokenizer(model_name)
        self.model = net.to(device=self.device, dtype=self.dtype)
        self.preprocess = ImagePreprocess.from_open_clip(net.visual.preprocess_cfg)
        device = self.device

        def encode_text(prompts: list[str]) -> Tensor:
            return net.encode_text(tokenizer(prompts).to(device))

        self._encode_image: Callable[[Tensor], Tensor] = net.encode_image
        self._encode_text: Callable[[list[str]], Tensor] = encode_text

    def _load_hf(self, model: str, processor: str, model_kwarg: str, processor_kwarg: str) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        what = self.name
        # Loaded in the checkpoint's dtype and cast below (`dtype=` / `torch_dtype=` differ across versions).
        net = from_pretrained(AutoModel.from_pretrained, model, what=what, kwarg=model_kwarg, require="config.json")
        if not (hasattr(net, "get_image_features") and hasattr(net, "get_text_features")):
            raise ValueError(f"{what}: {model!r} is a {type(net).__name__}, not a CLIP-style dual encoder")
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, processor, what=what, kwarg=processor_kwarg)
        image_processor = from_pretrained(
            AutoImageProcessor.from_pretrained,
            processor,
            what=what,
            kwarg=processor_kwarg,
            require="preprocessor_config.json",
        )
        self.model = net = net.to(device=self.device, dtype=self.dtype)
        self.preprocess = ImagePreprocess.from_hf_processor(image_processor)
        max_length, device = _text_max_length(net, tokenizer), self.device

        def encode_image(pixels: Tensor) -> Tensor:
            return _unwrap_features(net.get_image_features(pixel_values=pixels))

        def encode_text(prompts: list[str]) -> Tensor:
            tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            return _unwrap_features(net.get_text_features(**tokens))

        self._encode_image, self._encode_text = encode_image, encode_text

    # ---- features -----------------------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings.

        Args:
            images: `[B,3,H,W]` in [0, 1], any device; gradients flow back to it when it requires grad.
        Returns:
            `[B,D]` fp32 on `self.device`.
        """
        check_images(images.detach(), self.name)
        feats = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size].to(self.device)
            pixels = self.preprocess(chunk).to(self.dtype)
            feats.append(self._encode_image(pixels).float())
        return nn.functional.normalize(torch.cat(feats), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised prompt embeddings `[B,D]` fp32 on `self.device`, from the cache when seen before."""
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            feats = nn.functional.normalize(self._encode_text(chunk).float(), dim=-1)
            for prompt, feat in zip(chunk, feats, strict=True):
                self._text_cache[prompt] = feat
        out = []
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
            out.append(self._text_cache[prompt])
        while len(self._text_cache) > max(self.cache_size, len(prompts)):
            self._text_cache.popitem(last=False)
        return torch.stack(out) if out else torch.zeros(0, 0, device=self.device)

    def similarity(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """cos(image_i, prompt_i): `[B]` fp32 on `self.device` (differentiable w.r.t. `images`)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)

    def clear_cache(self) -> None:
        self._text_cache.clear()


class ClipScore:
    """Reward `scale * cos(image, prompt)` for a `ClipEncoder` (CLIP score, PickScore, HPSv2).

    Returns `[B]` fp32 on the images' device; differentiable w.r.t. the images.
    """

    def __init__(self, encoder: ClipEncoder, scale: float = 1.0, name: str = "clip_score") -> None:
        self.encoder = encoder
        self.scale = float(scale)
        self.name = name

    def __call__(self, images: Tensor, prompts: Sequence[str], **columns: Any) -> Tensor:
        return (self.scale * self.encoder.similarity(images, prompts)).to(images.device)


@REWARDS.register("clip_score")
def clip_score(
    model: str = "ViT-L-14",
    pretrained: str | None = "openai",
    *,
    scale: float = 1.0,
    quick_gelu: bool | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
) -> ClipScore:
    """CLIP score through open_clip: `scale * cos` (raw cosine by default; `scale=100` for CLIPScore).

    `model` / `pretrained` as in `ClipEncoder` (e.g. `"ViT-H-14"`, `"laion2b_s32b_b79k"`, or a local
    checkpoint file / directory).
    """
    encoder = ClipEncoder.from_open_clip(
        model, pretrained, quick_gelu=quick_gelu, device=device, dtype=dtype, batch_size=batch_size, name="clip_score"
    )
    return ClipScore(encoder, scale=scale, name="clip_score")


@REWARDS.register("clip_score_hf")
def clip_score_hf(
    model: str = "openai/clip-vit-large-patch14",
    *,
    processor: str | None = None,
    scale: float = 1.0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
) -> ClipScore:
    """CLIP score through transformers' `CLIPModel` (hub id or local directory): `scale * cos`."""
    encoder = ClipEncoder.from_hf(
        model, processor, device=device, dtype=dtype, batch_size=batch_size, name="clip_score_hf"
    )
    return ClipScore(encoder, scale=scale, name="clip_score_hf")


# ---- open_clip source resolution ---------------------------------------------------------------------------
def _text_max_length(net: nn.Module, tokenizer: Any) -> int:
    config = getattr(net, "config", None)
    text_config = getattr(config, "text_config", None)
    limit = getattr(text_config, "max_position_embeddings", None) or 77
    model_max = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(limit, model_max))


def _find_local_checkpoint(directory: Path, what: str, kwarg: str) -> Path:
    for filename in _LOCAL_CHECKPOINTS:
        if (directory / filename).is_file():
            return directory / filename
    present = ", ".join(sorted(p.name for p in directory.iterdir())[:20]) or "(empty)"
    raise FileNotFoundError(
        f"{what}: directory {str(directory)!r} passed as {kwarg}= has no open_clip weights "
        f"({' or '.join(OPEN_CLIP_WEIGHT_FILES)}); it holds: {present}"
    )


def _hub_weights(hub_id: str, what: str, kwarg: str, files: Sequence[str] = OPEN_CLIP_WEIGHT_FILES) -> Path:
    """The first of `files` the hub repo (or cache) has; the error for the last one when none is reachable."""
    for i, filename in enumerate(files):
        try:
            return resolve_file(hub_id, filename, what=what, kwarg=kwarg)
        except WeightsNotFoundError:
            if i == len(files) - 1:
                raise
    raise AssertionError("unreachable")


def _guess_backend(model: str, pretrained: str | None) -> Literal["hf", "open_clip"]:
    if pretrained is not None or model.startswith(("hf-hub:", "local-dir:")):
        return "open_clip"
    path = Path(model).expanduser()
    if path.is_dir():
        return "open_clip" if (path / "open_clip_config.json").is_file() else "hf"
    return "hf" if "/" in model else "open_clip"  # "org/name" hub ids vs "ViT-L-14" architecture names


def _resolve_open_clip(
    model: str, pretrained: str | None, what: str, kwarg: str = "model"
) -> tuple[str, str | None, dict[str, Any]]:
    """(open_clip model name or schema, local checkpoint path or None, create_model overrides)."""
    import open_clip

    overrides: dict[str, Any] = {}
    if model.startswith("local-dir:") or (is_local(model) and Path(model).is_dir()):
        directory = Path(model.removeprefix("local-dir:")).expanduser()
        if not (directory / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{what}: {kwarg}={model!r} has no open_clip_config.json")
        _find_local_checkpoint(directory, what, kwarg)
        return f"local-dir:{directory}", None, overrides
    if model.startswith("hf-hub:"):
        hub_id = model.removeprefix("hf-hub:")
        config = resolve_file(hub_id, "open_clip_config.json", what=what, kwarg=kwarg)
        _hub_weights(hub_id, what, kwarg)  # lands next to the config in the same cache snapshot
        text_cfg = json.loads(config.read_text()).get("model_cfg", {}).get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name"):
            from huggingface_hub import snapshot_download

            with explain_missing(hub_id, what=what, kwarg=kwarg):
                snapshot_download(hub_id, allow_patterns=["*token*", "*.model", "vocab*", "merges*", "*.txt"])
        return f"local-dir:{config.parent}", None, overrides
    if model not in open_clip.list_models():
        raise ValueError(
            f"{what}: unknown open_clip model {model!r}: use a built-in name (open_clip.list_models()), register a "
            f"config with open_clip.add_model_config(path), or pass a directory holding open_clip_config.json"
        )
    if pretrained is None:
        return model, None, overrides
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if not is_local(pretrained) else {}
    if tag_cfg:
        overrides["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        overrides["force_preprocess_cfg"] = preprocess
        hub = tag_cfg.get("hf_hub", "")
        if hub:
            repo, filename = posixpath.split(hub)  # "org/repo/" -> default file names, "org/repo/f.bin" -> f.bin
            if not filename:
                return model, str(_hub_weights(repo, what, "pretrained")), overrides
            return model, str(resolve_file(repo, filename, what=what, kwarg="pretrained")), overrides
        with explain_missing(tag_cfg.get("url", pretrained), what=what, kwarg="pretrained"):
            return model, open_clip.download_pretrained(tag_cfg), overrides
    source = check_source(pretrained, what=what, kwarg="pretrained")
    if Path(source).is_file():
        return model, source, overrides
    if Path(source).is_dir():
        return model, str(_find_local_checkpoint(Path(source), what, "pretrained")), overrides
    if looks_like_hub_id(source) and "/" in source:
        return model, str(_hub_weights(source, what, "pretrained")), overrides
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "(none)"
    raise ValueError(
        f"{what}: pretrained={pretrained!r} is not a tag of {model} ({tags}), a local file/directory, or a hub id"
    )
