"""Weight-free rewards: fast, deterministic, and enough to test training end to end."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewards.base import REWARDS, check_images


@REWARDS.register("brightness")
def brightness(**_: Any):
    """Mean pixel value in [0, 1] (a toy objective that any model can move)."""

    def reward(images: torch.Tensor, prompts: Sequence[str], **columns: Any) -> torch.Tensor:
        check_images(images, "brightness")
        return images.float().mean(dim=(1, 2, 3))

    return reward


@REWARDS.register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95, **_: Any):
    """Negative JPEG size in kB (DDPO's compressibility objective): simpler images score higher."""

    def reward(images: torch.Tensor, prompts: Sequence[str], **columns: Any) -> torch.Tensor:
        check_images(images, "jpeg_compressibility")
        arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for arr in arrays:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
            sizes.append(buf.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float32)

    return reward
