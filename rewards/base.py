"""The reward interface: a callable `(images [B,3,H,W] in [0,1], prompts, **columns) -> Tensor[B]`.

Rewards import only `flowalign.types`, `flowalign.registry` and data-only modules (never the trainer).
`REWARDS` maps a name to a factory `(**kwargs) -> RewardFn`; the config layer builds them by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from flowalign.registry import Registry


class RewardFn(Protocol):
    """Scores a batch of images for their prompts. Extra per-sample data arrives as keyword columns."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns: Any) -> torch.Tensor: ...


REWARDS: Registry = Registry("reward")


def build_reward(name: str, **kwargs: Any) -> RewardFn:
    """Builds a registered reward by name (the config layer's door)."""
    return REWARDS.get(name)(**kwargs)


def check_images(images: torch.Tensor, who: str) -> None:
    """Raises a clear error for images that are not `[B,3,H,W]` floats in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who}: expected images as a float tensor [B,3,H,W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: expected float images in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{who}: got an empty batch of images")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{who}: expected images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
