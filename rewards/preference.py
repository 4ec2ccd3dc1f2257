"""Human-preference reward models: PickScore, HPSv2 / HPSv2.1, and the LAION aesthetic predictor.

All three are CLIP models underneath and reuse `rewards.clip.ClipEncoder` (torch preprocessing, batching,
text cache, device / dtype placement, one clear error for missing weights):

- **PickScore** (Kirstain et al. 2023): `yuvalkirstain/PickScore_v1`, a transformers `CLIPModel` fine-tuned
  on Pick-a-Pic, with the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.
  Score = `logit_scale * cos(image, prompt)` (logit_scale = exp(learned) ~ 100), as its reference code.
- **HPSv2 / v2.1** (Wu et al. 2023): open_clip ViT-H-14 with the full fine-tuned state dict from
  `xswu/HPSv2` (`HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt`), read with `weights_only=True`.
  Score = `cos(image, prompt)` (the reference `hpsv2.score` returns the raw cosine, ~0.2-0.35; `scale=100`
  gives the percentages papers print).
- **LAION aesthetic** (improved-aesthetic-predictor): the L2-normalised CLIP ViT-L/14 image embedding through
  an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropout 0.2, 0.2, 0.1; no activations, as published). Weights:
  `trl-lib/ddpo-aesthetic-predictor` / `aesthetic-model.pth` (what TRL's DDPO uses), or any state dict with
  the same keys (`layers.{0,2,4,6,7}.*`) as safetensors or a weights_only checkpoint. Score ~ 1-10.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rewards.base import REWARDS
from rewards.clip import ClipEncoder, ClipScore
from rewards.hub import load_state_dict, resolve_file

logger = logging.getLogger(__name__)

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "aesthetic-model.pth"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"


@REWARDS.register("pickscore")
def pickscore(
    model: str = PICKSCORE_MODEL,
    processor: str = PICKSCORE_PROCESSOR,
    *,
    scale: float | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
) -> ClipScore:
    """PickScore: `logit_scale * cos(image, prompt)`, `[B]` (typically ~18-24).

    Args:
        model: hub id or local directory of PickScore_v1.
        processor: hub id or local directory holding its tokenizer + image processor.
        scale: overrides the model's own `logit_scale` (e.g. `1.0` for the raw cosine).
        device, dtype, batch_size: placement and batching (see `ClipEncoder`).
    """
    encoder = ClipEncoder.from_hf(
        model, processor, device=device, dtype=dtype, batch_size=batch_size, name="pickscore"
    )
    return ClipScore(encoder, scale=encoder.logit_scale if scale is None else scale, name="pickscore")


@REWARDS.register("hpsv2")
def hpsv2(
    version: str = "v2.1",
    checkpoint: str | None = None,
    *,
    model: str = "ViT-H-14",
    scale: float = 1.0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
) -> ClipScore:
    """HPSv2 / HPSv2.1: `scale * cos(image, prompt)` with the HPS fine-tuned open_clip ViT-H-14, `[B]`.

    Args:
        version: `"v2.1"` (default) or `"v2"`; picks the checkpoint file in `xswu/HPSv2`.
        checkpoint: a local checkpoint file, a directory holding it, or another hub repo with that file name.
            `None` fetches from `xswu/HPSv2` (or the Hugging Face cache).
        model: the open_clip architecture the checkpoint fits (`ViT-H-14`).
        scale: 1.0 = raw cosine as `hpsv2.score` returns; 100 for the percentages in papers.
    """
    if version not in HPS_FILES:
        raise ValueError(f"hpsv2: unknown version {version!r}; valid: v2, v2.1")
    path = resolve_file(checkpoint or HPS_REPO, HPS_FILES[version], what="hpsv2", kwarg="checkpoint")
    encoder = ClipEncoder.from_open_clip(
        model, str(path), device=device, dtype=dtype, batch_size=batch_size, name="hpsv2"
    )
    # HPSv2 scores through its own open_clip fork's evaluation transform (`light_augmentation`), not open_clip's:
    # the long side scaled to the input size in one float pass, the short side zero-padded (a letterbox), where
    # stock open_clip crops the long side. Square images see the same pixels either way.
    size = encoder.preprocess.crop
    encoder.preprocess = dataclasses.replace(
        encoder.preprocess, resize=size, resize_mode="fit_longest", crop=size, fill=0.0, two_pass=False, clamp=False
    )
    return ClipScore(encoder, scale=scale, name="hpsv2")


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head (written from its published architecture).

    Linear(D, 1024) -> Dropout(0.2) -> Linear(1024, 128) -> Dropout(0.2) -> Linear(128, 64) -> Dropout(0.1)
    -> Linear(64, 16) -> Linear(16, 1); no nonlinearities, as published. State-dict keys `layers.{0,2,4,6,7}`.
    """

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """Args: embeddings `[B, D]` (L2-normalised CLIP image features). Returns scores `[B]`."""
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> AestheticMLP:
        """Loads a state dict (safetensors or weights_only `.pth`); the input width comes from `layers.0`."""
        state = load_state_dict(path, what="aesthetic")
        if "layers.0.weight" not in state:
            raise ValueError(f"aesthetic: {str(path)!r} is not an aesthetic-predictor state dict (no layers.0.weight)")
        head = cls(int(state["layers.0.weight"].shape[1]))
        head.load_state_dict(state)
        return head


class AestheticScore:
    """Reward: the aesthetic MLP on normalised CLIP image features, `[B]` fp32 on the images' device."""

    def __init__(self, encoder: ClipEncoder, head: AestheticMLP) -> None:
        self.encoder = encoder
        self.head = head.to(encoder.device).float().eval().requires_grad_(False)
        self.name = "aesthetic"
        self._dim = head.input_dim

    def __call__(self, images: Tensor, prompts: Sequence[str], **columns: Any) -> Tensor:
        feats = self.encoder.image_features(images)
        if feats.shape[-1] != self._dim:
            raise ValueError(
                f"aesthetic: the CLIP model gives {feats.shape[-1]}-d features but the head expects {self._dim}-d "
                f"(the LAION head is for CLIP ViT-L/14)"
            )
        return self.head(feats).to(images.device)


@REWARDS.register("aesthetic")
def aesthetic(
    head: str = AESTHETIC_HEAD,
    clip: str = AESTHETIC_CLIP,
    *,
    head_file: str = AESTHETIC_HEAD_FILE,
    processor: str | None = None,
    pretrained: str | None = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
) -> AestheticScore:
    """LAION aesthetic score (~1-10) from CLIP ViT-L/14 image embeddings, `[B]`.

    Args:
        head: the MLP weights: a local file (`.safetensors`, or `.pth` read with weights_only), a directory
            holding `head_file`, or a hub repo holding `head_file`.
        clip: the CLIP model: transformers hub id / directory (default `openai/clip-vit-large-patch14`), or an
            open_clip name with `pretrained` (e.g. `clip="ViT-L-14", pretrained="openai"`).
        head_file: file name inside a `head` directory or repo.
        processor: transformers only: where the CLIP processor lives when not next to the model.
        pretrained, backend: passed to `ClipEncoder` (open_clip weights; `"auto" | "hf" | "open_clip"`).
    """
    path = resolve_file(head, head_file, what="aesthetic", kwarg="head")
    mlp = AestheticMLP.from_file(path)
    encoder = ClipEncoder(
        clip,
        pretrained,
        processor=processor,
        backend=backend,  # type: ignore[arg-type]
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        name="aesthetic",
        model_kwarg="clip",
    )
    return AestheticScore(encoder, mlp)
