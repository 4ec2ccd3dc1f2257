"""Differentiable image preprocessing in torch, matching each reward model's own processor.

Reward heads receive images `[B,3,H,W]` in [0, 1] (the decoder's output, possibly with gradients). The
official processors (transformers image processors, open_clip's `image_transform`) take PIL images or
uint8 tensors and are not differentiable, so every head runs this one torch version instead:

    resize (processor's interpolation, antialias) -> clamp to [0, 1] -> center crop (pad if small) -> normalise

Fidelity, measured by the tests (`tests/test_rewards_*.py`):
- crop + normalise match exactly (measured <= 2.4e-7) on images already at the resize target. The two libraries place
  an odd crop margin differently: torchvision / open_clip use `int(round(d / 2))` (Python's round: half to
  even), transformers uses `int(d / 2)`; `crop_offset` reproduces either.
- resize: torch's antialiased bicubic/bilinear (`F.interpolate(..., antialias=True)`) is a port of PIL's
  resampling (a = -0.5 cubic, same support). The processors resize uint8 images: PIL (open_clip on PIL
  images, transformers' PIL backend) and torchvision.transforms.v2's uint8 kernel (transformers' default
  torchvision backend) both run two separable passes, horizontal then vertical, storing uint8 (rounded,
  clamped) in between. We run the same two passes in float and clamp in between (`two_pass`), which leaves
  only the rounding: measured max 1.06 levels of 1/255 per pixel (1.10 for DINOv2's 256 -> 224), mean
  0.30-0.32 levels (~0.004 after CLIP's std). With `quantize=True` we also round to 1/255 after each pass (a
  straight-through estimator, so gradients pass unchanged): max 1 level vs PIL, 2 levels vs torchvision's
  fixed-point uint8 kernel, mean <= 0.03 levels. A single-pass float resize (`two_pass=False`) is what
  torchvision does for float tensors (open_clip given a tensor): exact.
- the output size of a keep-ratio resize follows the library: torchvision / transformers `shortest_edge`
  floor the long side (`int(S * long / short)`), open_clip's `ResizeKeepRatio` rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

ResizeMode = Literal["shortest_edge", "fit_shortest", "fit_longest", "exact"]
Interpolation = Literal["nearest", "bilinear", "bicubic"]

# PIL resample codes (what transformers' processor configs store) -> torch interpolate modes. LANCZOS, BOX and
# HAMMING have no torch kernel; transformers' torchvision backend falls back to bicubic for LANCZOS as well.
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"expected a size (h, w), got {size}")
    return size[0], size[1]


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize -> center crop -> normalise, in torch, differentiable w.r.t. the input pixels.

    Build it from a processor with `from_hf_processor` or `from_open_clip`; call it on `[B,3,H,W]` in [0, 1].

    Attributes:
        resize: the resize target. For `"shortest_edge"` the length of the short side (an int); for the
            other modes `(h, w)`. `None` skips the resize.
        resize_mode: `"shortest_edge"`: short side -> `resize`, long side -> `int(resize * long / short)`
            (torchvision `Resize(int)`, transformers `size={"shortest_edge": S}`). `"fit_shortest"` /
            `"fit_longest"`: scale so the short / long side fits `(h, w)`, sides rounded (open_clip
            `ResizeKeepRatio`). `"exact"`: squash to `(h, w)`.
        crop: center crop `(h, w)`; an image smaller than the crop is padded with `fill` first. `None` skips.
        mean, std: per-channel normalisation, applied after the crop to pixels in [0, 1] (times
            `pixel_scale`).
        interpolation: `"bicubic"`, `"bilinear"` or `"nearest"`.
        antialias: low-pass before downsampling, as PIL and torchvision do (ignored for nearest).
        crop_offset: `"round"` (torchvision / open_clip) or `"floor"` (transformers) for odd crop margins.
        clamp: clamp resized pixels to [0, 1], as the uint8 / PIL pipelines of the processors do (bicubic
            overshoots at edges otherwise).
        fill: padding value in [0, 1] units for images smaller than the crop.
        pixel_scale: multiplies pixels before normalising (transformers `rescale_factor * 255`; 1 normally).
        two_pass: resize horizontally, clamp, then vertically, as PIL and torchvision's uint8 kernel do (the
            processors' path for images); `False` resizes in one float pass (torchvision on float tensors).
        quantize: round to 1/255 at the input and after each pass, as the uint8 pipelines do, with a
            straight-through gradient. Off by default: rewards then see the float image the policy made.
    """

    resize: int | tuple[int, int] | None
    resize_mode: ResizeMode = "shortest_edge"
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    interpolation: Interpolation = "bicubic"
    antialias: bool = True
    crop_offset: Literal["round", "floor"] = "round"
    clamp: bool = True
    fill: float = 0.0
    pixel_scale: float = 1.0
    two_pass: bool = True
    quantize: bool = False

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest_edge", "fit_shortest", "fit_longest", "exact"):
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}")
        if self.interpolation not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}; valid: nearest, bilinear, bicubic")
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"crop_offset must be 'round' or 'floor', got {self.crop_offset!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {self.mean} and {self.std}")

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_hf_processor(cls, processor: Any) -> ImagePreprocess:
        """From a transformers image processor (`CLIPImageProcessor`, `BitImageProcessor`, ...) or a
        `ProcessorMixin` holding one (`CLIPProcessor`). Reads size, crop_size, resample, mean/std and the
        do_* switches; crop margins follow transformers' floor convention."""
        proc = getattr(processor, "image_processor", processor)
        size = _get(proc, "size")
        resize: int | tuple[int, int] | None = None
        mode: ResizeMode = "shortest_edge"
        if getattr(proc, "do_resize", True) and size is not None:
            shortest, height, width = _get(size, "shortest_edge"), _get(size, "height"), _get(size, "width")
            if isinstance(size, int):
                resize = size
            elif _get(size, "longest_edge") or _get(size, "max_height"):
                raise ValueError(f"{type(proc).__name__}: size {size} (a longest-edge bound) is not supported")
            elif shortest:
                resize = int(shortest)
            elif height and width:
                resize, mode = (int(height), int(width)), "exact"
            else:
                raise ValueError(f"{type(proc).__name__}: cannot read the resize target from size={size}")
        crop = None
        crop_size = _get(proc, "crop_size")
        if getattr(proc, "do_center_crop", False) and crop_size is not None:
            if isinstance(crop_size, int):
                crop = _pair(crop_size)
            else:
                crop = (int(_get(crop_size, "height")), int(_get(crop_size, "width")))
        resample = getattr(proc, "resample", 3)
        resample = getattr(resample, "value", resample)
        interpolation = _PIL_RESAMPLE.get(int(resample), "bicubic") if isinstance(resample, int) else "bicubic"
        mean: tuple[float, ...] = (0.0, 0.0, 0.0)
        std: tuple[float, ...] = (1.0, 1.0, 1.0)
        if getattr(proc, "do_normalize", True):
            mean, std = _three(proc.image_mean), _three(proc.image_std)
        scale = float(proc.rescale_factor) * 255.0 if getattr(proc, "do_rescale", True) else 1.0
        return cls(
            resize=resize,
            resize_mode=mode,
            crop=crop,
            mean=mean,
            std=std,
            interpolation=interpolation,  # type: ignore[arg-type]
            antialias=interpolation != "nearest",
            crop_offset="floor",
            pixel_scale=scale,
        )

    @classmethod
    def from_open_clip(cls, cfg: Any) -> ImagePreprocess:
        """From an open_clip preprocess config (`model.visual.preprocess_cfg` dict or a `PreprocessCfg`),
        reproducing the inference branch of `open_clip.image_transform`."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        size = get("size", 224)
        h, w = _pair(size)
        interpolation = "bilinear" if get("interpolation", "bicubic") == "bilinear" else "bicubic"
        resize_mode = get("resize_mode", "shortest") or "shortest"
        fill = float(get("fill_color", 0) or 0) / 255.0
        common = dict(mean=_three(get("mean")), std=_three(get("std")), crop_offset="round", fill=fill)
        if resize_mode == "squash":
            return cls(resize=(h, w), resize_mode="exact", interpolation=interpolation, **common)  # type: ignore[arg-type]
        if resize_mode == "longest":
            return cls(resize=(h, w), resize_mode="fit_longest", crop=(h, w), interpolation=interpolation, **common)  # type: ignore[arg-type]
        if resize_mode != "shortest":
            raise ValueError(f"unknown open_clip resize_mode {resize_mode!r}")
        if h == w:  # torchvision Resize(int) + CenterCrop
            return cls(resize=h, resize_mode="shortest_edge", crop=(h, w), interpolation=interpolation, **common)  # type: ignore[arg-type]
        # open_clip builds ResizeKeepRatio(size) without passing the interpolation: bicubic.
        return cls(resize=(h, w), resize_mode="fit_shortest", crop=(h, w), interpolation="bicubic", **common)  # type: ignore[arg-type]

    # ---- the transform ------------------------------------------------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Output `(h, w)` of the resize step for an input of `height x width` (as the library computes it)."""
        if self.resize is None:
            return height, width
        if self.resize_mode == "shortest_edge":
            if not isinstance(self.resize, int):
                raise ValueError("resize_mode='shortest_edge' needs an int resize")
            short, long = min(height, width), max(height, width)
            new_short, new_long = self.resize, int(self.resize * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        th, tw = _pair(self.resize)
        if self.resize_mode == "exact":
            return th, tw
        ratio_h, ratio_w = height / th, width / tw
        ratio = min(ratio_h, ratio_w) if self.resize_mode == "fit_shortest" else max(ratio_h, ratio_w)
        return round(height / ratio), round(width / ratio)

    def _interpolate(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=self.antialias)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.clamp:
            x = x.clamp(0.0, 1.0)
        return _quantize(x) if self.quantize else x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images `[B,3,H,W]` in [0, 1] (any float dtype). Returns `[B,3,h,w]` fp32, normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ImagePreprocess: expected [B,3,H,W], got {tuple(images.shape)}")
        x = images.float()
        if self.quantize:
            x = _quantize(x)
        out_h, out_w = self.resized_size(x.shape[-2], x.shape[-1])
        height, width = x.shape[-2:]
        if (out_h, out_w) != (height, width):
            if self.interpolation == "nearest":
                x = F.interpolate(x, size=(out_h, out_w), mode="nearest")
            elif self.two_pass:
                # PIL order: the horizontal pass first, then the vertical one, each stored as pixels.
                if out_w != width:
                    x = self._finish(self._interpolate(x, (height, out_w)))
                if out_h != height:
                    x = self._finish(self._interpolate(x, (out_h, out_w)))
            else:
                x = self._finish(self._interpolate(x, (out_h, out_w)))
        if self.crop is not None:
            x = center_crop(x, self.crop, offset=self.crop_offset, fill=self.fill)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * self.pixel_scale - mean) / std


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Rounds to multiples of 1/255 in the forward pass; identity gradient (straight-through)."""
    return x + ((x * 255.0).round() / 255.0 - x).detach()


def center_crop(
    images: torch.Tensor, size: tuple[int, int], offset: Literal["round", "floor"] = "round", fill: float = 0.0
) -> torch.Tensor:
    """Center crop `[..., H, W]` to `size`, padding with `fill` first when the image is smaller.

    Padding splits as torchvision does (left/top get the floor half); `offset` places odd margins:
    `"round"` = `int(round(d / 2))` (torchvision / open_clip), `"floor"` = `int(d / 2)` (transformers).
    """
    crop_h, crop_w = size
    height, width = images.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        # F.pad order for the last two dims: (left, right, top, bottom)
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
        height, width = images.shape[-2:]
    if offset == "round":
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    else:
        top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    return images[..., top : top + crop_h, left : left + crop_w]


def _get(obj: Any, key: str) -> Any:
    if obj is None or isinstance(obj, int):
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    value = getattr(obj, key, None)
    if value is None and hasattr(obj, "get"):
        try:
            value = obj.get(key)
        except Exception:  # SizeDict-like objects without a dict get
            value = None
    return value


def _three(values: Any) -> tuple[float, float, float]:
    if values is None:
        raise ValueError("missing image mean/std in the processor config")
    if isinstance(values, (int, float)):
        return (float(values),) * 3  # type: ignore[return-value]
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * 3  # type: ignore[return-value]
    if len(values) != 3 or any(math.isnan(v) for v in values):
        raise ValueError(f"expected 3 channel values, got {values}")
    return values  # type: ignore[return-value]
