"""DINO similarity: DINOv2 features of a generated image against reference images given per prompt.

"The Image as Its Own Reward" / Adv-GRPO (ALGORITHMS.md section 4) reward a sample by how close its DINOv2
features are to reference images of the same prompt. The references arrive as a per-sample column
(`reference_images`, one entry per sample: an image tensor `[3,H,W]` in [0, 1], an image path, or a list of
those); samples of one prompt share their entry, so each reference is encoded once per call (and once
ever for paths, which are cached).

    score_i = mean over the refs r of sample i of
              (1 - patch_weight) * cos(CLS_i, CLS_r) + patch_weight * cos(meanpatch_i, meanpatch_r)

CLS and patch tokens are the model's final (layer-normed) hidden states, as `Dinov2Model` returns them.

`DinoDiscriminator` is Adv-GRPO's small trainable head on those frozen tokens: a logit for the CLS token and
one for each of 64 patch cells (the patch grid average-pooled to 8 x 8), combined as
`0.7 * sigmoid(cls) + 0.3 * mean(sigmoid(patch cells))` for the reward; training uses the same weights on
the per-token BCE losses. It saves and loads as safetensors (shape hyper-parameters in the metadata).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rewards.base import REWARDS, check_images
from rewards.hub import from_pretrained, resolve_device, resolve_dtype, resolve_file
from rewards.preprocess import ImagePreprocess

logger = logging.getLogger(__name__)

DISCRIMINATOR_FORMAT = "flowalign.dino_discriminator.v1"


class DinoEncoder:
    """DINOv2 (transformers `Dinov2Model`, or `Dinov2WithRegistersModel`) with torch preprocessing.

    Attributes:
        model: the frozen module on `device` in `dtype`.
        preprocess: torch version of its `BitImageProcessor` (resize 256, center crop 224, ImageNet stats).
        patch_size: pixels per patch side (14 for DINOv2).
        kind, model_id: `"dino"` and the source it was loaded from.
    """

    kind = "dino"

    def __init__(
        self,
        model: str = "facebook/dinov2-base",
        processor: str | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        name: str = "dino",
        model_kwarg: str = "model",
    ) -> None:
        """Loads DINOv2 from a hub id or a local directory (`save_pretrained` / `hf download ID --local-dir DIR`).

        Args:
            model: hub id or local directory of the model.
            processor: hub id or local directory of its image processor (default: `model`).
            device, dtype: placement (`None`: CUDA if available; fp32). Similarities are fp32 regardless.
            batch_size: images per forward pass.
            name, model_kwarg: for error messages.
        """
        from transformers import AutoImageProcessor, AutoModel

        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        self.name, self.model_id, self.batch_size = name, str(model), batch_size
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        # Loaded in the checkpoint's dtype and cast below (`dtype=` / `torch_dtype=` differ across versions).
        net = from_pretrained(
            AutoModel.from_pretrained, str(model), what=name, kwarg=model_kwarg, require="config.json"
        )
        image_processor = from_pretrained(
            AutoImageProcessor.from_pretrained,
            str(processor or model),
            what=name,
            kwarg="processor" if processor else model_kwarg,
            require="preprocessor_config.json",
        )
        self.model = net.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.preprocess = ImagePreprocess.from_hf_processor(image_processor)
        self.patch_size = int(net.config.patch_size)
        self.num_prefix_tokens = 1 + int(getattr(net.config, "num_register_tokens", 0) or 0)

    def tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """CLS and patch tokens of the final layer.

        Args:
            images: `[B,3,H,W]` in [0, 1]; gradients flow back when it requires grad.
        Returns:
            cls `[B,D]` and patches `[B,N,D]` (N = h*w patches, row-major), fp32 on `self.device`.
        """
        check_images(images.detach(), self.name)
        cls_out, patch_out = [], []
        for start in range(0, images.shape[0], self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size].to(self.device)).to(self.dtype)
            hidden = self.model(pixel_values=pixels).last_hidden_state.float()
            cls_out.append(hidden[:, 0])
            patch_out.append(hidden[:, self.num_prefix_tokens :])
        return torch.cat(cls_out), torch.cat(patch_out)

    def patch_grid(self) -> tuple[int, int]:
        """`(h, w)` of the patch grid for the processor's crop size."""
        crop = self.preprocess.crop
        if crop is None:
            raise ValueError(f"{self.name}: the processor has no center crop, so the patch grid depends on the input")
        return crop[0] // self.patch_size, crop[1] // self.patch_size

    def image_features(self, images: Tensor, patch: bool = False) -> Tensor:
        """L2-normalised CLS features `[B,D]` fp32 (with `patch=True`: `[B,2D]`, CLS and mean patch token,
        each normalised, concatenated)."""
        cls, patches = self.tokens(images)
        feats = nn.functional.normalize(cls, dim=-1)
        if patch:
            feats = torch.cat([feats, nn.functional.normalize(patches.mean(1), dim=-1)], dim=-1)
        return feats


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """An image file as `[3,H,W]` fp32 in [0, 1] (RGB)."""
    import numpy as np
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference image {str(path)!r} does not exist")
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


RefItem = Tensor | str | os.PathLike  # one reference image


class DinoSimilarity:
    """Reward: DINOv2 similarity of each sample to its prompt's reference image(s) (see the module doc).

    Call as `reward(images [B,3,H,W], prompts, reference_images=[ref_0, ..., ref_{B-1}])`; returns `[B]` fp32
    on the images' device, in [-1, 1], differentiable w.r.t. the images.
    """

    def __init__(
        self,
        encoder: DinoEncoder,
        *,
        column: str = "reference_images",
        patch_weight: float = 0.0,
        reduce: str = "mean",
        cache_size: int = 1024,
    ) -> None:
        if not 0.0 <= patch_weight <= 1.0:
            raise ValueError(f"dino_similarity: patch_weight must be in [0, 1], got {patch_weight}")
        if reduce not in ("mean", "max"):
            raise ValueError(f"dino_similarity: reduce must be 'mean' or 'max', got {reduce!r}")
        self.encoder, self.column, self.patch_weight, self.reduce = encoder, column, patch_weight, reduce
        self.cache_size = cache_size
        self._path_cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()

    def _features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        cls, patches = self.encoder.tokens(images)
        return nn.functional.normalize(cls, dim=-1), nn.functional.normalize(patches.mean(1), dim=-1)

    @torch.no_grad()
    def _reference_features(self, refs: list[RefItem]) -> list[tuple[Tensor, Tensor]]:
        """Features of each distinct reference (tensors by identity, paths by name, cached)."""
        out: list[tuple[Tensor, Tensor] | None] = [None] * len(refs)
        todo: dict[tuple[int, ...], list[int]] = {}  # image shape -> indices, so equal sizes batch together
        images: dict[int, Tensor] = {}
        for i, ref in enumerate(refs):
            if isinstance(ref, Tensor):
                if ref.ndim == 4 and ref.shape[0] == 1:
                    ref = ref[0]
                if ref.ndim != 3 or ref.shape[0] != 3:
                    raise ValueError(f"dino_similarity: reference tensors must be [3,H,W], got {tuple(ref.shape)}")
                images[i] = ref.detach().float()
            else:
                key = str(Path(ref).expanduser())
                if key in self._path_cache:
                    self._path_cache.move_to_end(key)
                    out[i] = self._path_cache[key]
                    continue
                images[i] = load_image(key)
        for i, img in images.items():
            todo.setdefault(tuple(img.shape), []).append(i)
        for idx in todo.values():
            cls, patch = self._features(torch.stack([images[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = (cls[j], patch[j])
                if not isinstance(refs[i], Tensor):
                    self._path_cache[str(Path(refs[i]).expanduser())] = out[i]  # type: ignore[assignment]
        while len(self._path_cache) > self.cache_size:
            self._path_cache.popitem(last=False)
        return out  # type: ignore[return-value]

    def __call__(self, images: Tensor, prompts: Sequence[str], **columns: Any) -> Tensor:
        if self.column not in columns or columns[self.column] is None:
            raise ValueError(
                f"dino_similarity: needs a {self.column!r} column (one reference image, path or list of them per "
                f"sample); got columns {sorted(columns)}. Add it to the prompt dataset or set column=..."
            )
        per_sample = list(columns[self.column])
        if len(per_sample) != images.shape[0]:
            n_images, n_refs = images.shape[0], len(per_sample)
            raise ValueError(f"dino_similarity: {n_images} images but {n_refs} {self.column!r} entries")
        # Flatten to distinct references; a shared entry (same object for a prompt's G samples) is encoded once.
        flat: list[RefItem] = []
        slots: list[list[int]] = []
        seen: dict[Any, int] = {}
        for entry in per_sample:
            items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            if not items:
                raise ValueError(f"dino_similarity: a sample has an empty {self.column!r} entry")
            row = []
            for item in items:
                key = ("t", id(item)) if isinstance(item, Tensor) else ("p", str(item))
                if key not in seen:
                    seen[key] = len(flat)
                    flat.append(item)
                row.append(seen[key])
            slots.append(row)
        ref_feats = self._reference_features(flat)
        gen_cls, gen_patch = self._features(images)
        scores = []
        for i, row in enumerate(slots):
            ref_cls = torch.stack([ref_feats[k][0] for k in row])  # [R, D]
            sim = ref_cls @ gen_cls[i]
            if self.patch_weight > 0:
                ref_patch = torch.stack([ref_feats[k][1] for k in row])
                sim = (1 - self.patch_weight) * sim + self.patch_weight * (ref_patch @ gen_patch[i])
            scores.append(sim.mean() if self.reduce == "mean" else sim.max())
        return torch.stack(scores).to(images.device)


class DinoDiscriminator(nn.Module):
    """Adv-GRPO's discriminator head on frozen DINOv2 tokens (see the module doc).

    Args:
        dim: token width D of the DINOv2 model.
        hidden: hidden width of the two small MLPs (CLS head and patch head).
        grid: patch tokens are average-pooled to `grid x grid` cells (8 -> 64 patch scores).
        cls_weight: weight of the CLS score; the patch cells share `1 - cls_weight`.
    """

    def __init__(self, dim: int, hidden: int = 256, grid: int = 8, cls_weight: float = 0.7) -> None:
        super().__init__()
        self.dim, self.hidden, self.grid, self.cls_weight = dim, hidden, grid, float(cls_weight)
        self.cls_head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.patch_head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def logits(self, cls: Tensor, patches: Tensor, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Args: cls `[B,D]`, patches `[B,h*w,D]`, grid_hw `(h, w)`. Returns CLS logits `[B]` and patch-cell
        logits `[B, grid*grid]`."""
        b, n, d = patches.shape
        h, w = grid_hw
        if h * w != n:
            raise ValueError(f"DinoDiscriminator: {n} patch tokens do not form a {h}x{w} grid")
        cells = patches.transpose(1, 2).reshape(b, d, h, w)
        cells = nn.functional.adaptive_avg_pool2d(cells, self.grid).flatten(2).transpose(1, 2)  # [B, g*g, D]
        return self.cls_head(cls).squeeze(-1), self.patch_head(cells).squeeze(-1)

    def forward(self, cls: Tensor, patches: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Reward in [0, 1]: `cls_weight * sigmoid(cls logit) + (1 - cls_weight) * mean sigmoid(cell logits)`."""
        cls_logit, cell_logits = self.logits(cls, patches, grid_hw)
        return self.cls_weight * torch.sigmoid(cls_logit) + (1 - self.cls_weight) * torch.sigmoid(cell_logits).mean(-1)

    def loss(self, real: tuple[Tensor, Tensor], fake: tuple[Tensor, Tensor], grid_hw: tuple[int, int]) -> Tensor:
        """BCE with reference (real = 1) vs generated (fake = 0) tokens, weighted like the reward.

        Args: real / fake: `(cls [B,D], patches [B,N,D])`. Returns a scalar loss.
        """
        bce = nn.functional.binary_cross_entropy_with_logits
        total = torch.zeros((), device=real[0].device)
        for (cls, patches), target in ((real, 1.0), (fake, 0.0)):
            cls_logit, cell_logits = self.logits(cls.float(), patches.float(), grid_hw)
            total = total + self.cls_weight * bce(cls_logit, torch.full_like(cls_logit, target))
            total = total + (1 - self.cls_weight) * bce(cell_logits, torch.full_like(cell_logits, target))
        return total / 2

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes safetensors with the shape hyper-parameters in the metadata."""
        from safetensors.torch import save_file

        meta = {
            "format": DISCRIMINATOR_FORMAT,
            "dim": str(self.dim),
            "hidden": str(self.hidden),
            "grid": str(self.grid),
            "cls_weight": repr(self.cls_weight),
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DinoDiscriminator:
        """Reads a head written by `save` (safetensors only)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"DinoDiscriminator.load: expected a .safetensors file, got {str(path)!r}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != DISCRIMINATOR_FORMAT:
            raise ValueError(f"{str(path)!r} is not a DINO discriminator head (format {meta.get('format')!r})")
        head = cls(int(meta["dim"]), int(meta["hidden"]), int(meta["grid"]), float(meta["cls_weight"]))
        head.load_state_dict(load_file(str(path)))
        return head


@REWARDS.register("dino_similarity")
def dino_similarity(
    model: str = "facebook/dinov2-base",
    *,
    processor: str | None = None,
    column: str = "reference_images",
    patch_weight: float = 0.0,
    reduce: str = "mean",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
) -> DinoSimilarity:
    """DINOv2 similarity to per-prompt reference images (column `column`); see `DinoSimilarity`.

    Args:
        model: DINOv2 hub id or local directory (`facebook/dinov2-small|base|large|giant`).
        patch_weight: weight of the mean-patch-token cosine (0 = CLS only).
        reduce: how several references of one sample combine: `"mean"` or `"max"`.
    """
    encoder = DinoEncoder(model, processor, device=device, dtype=dtype, batch_size=batch_size, name="dino_similarity")
    return DinoSimilarity(encoder, column=column, patch_weight=patch_weight, reduce=reduce)


@REWARDS.register("dino_discriminator")
def dino_discriminator(
    head: str,
    model: str = "facebook/dinov2-base",
    *,
    processor: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
) -> Any:
    """Adv-GRPO reward from a trained `DinoDiscriminator` (a `.safetensors` file or a directory holding
    `dino_discriminator.safetensors`): `[B]` in [0, 1], higher = more like the references."""
    path = resolve_file(head, "dino_discriminator.safetensors", what="dino_discriminator", kwarg="head")
    encoder = DinoEncoder(
        model, processor, device=device, dtype=dtype, batch_size=batch_size, name="dino_discriminator"
    )
    net = DinoDiscriminator.load(path).to(encoder.device).eval().requires_grad_(False)
    grid = encoder.patch_grid()

    def reward(images: Tensor, prompts: Sequence[str], **columns: Any) -> Tensor:
        cls, patches = encoder.tokens(images)
        return net(cls, patches, grid).to(images.device)

    reward.head, reward.encoder = net, encoder  # type: ignore[attr-defined]
    return reward
