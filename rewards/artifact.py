"""Artifact regularizer (a): a light head on frozen CLIP / DINO features, trained on curated images.

The seed paper's "lightweight, adaptive" artifact model (ALGORITHMS.md section 4): the user curates a small
set of artifact-free and artifact-containing images, the toolkit embeds them once with a frozen encoder and
fits logistic regression (or a 1-hidden-layer MLP) on the standardised features, reporting held-out
accuracy and ranking (AUC; pairwise accuracy over matched pairs, which the split keeps together). The file also
holds the encoder's features of a fixed probe image, so the reward refuses another encoder. The saved head then
serves as the `artifact_head` reward: p(clean), higher = fewer artifacts.

    flowalign artifact train --clean DIR --artifact DIR --out HEAD.safetensors [--encoder clip --model ID]

The head file is safetensors: tensors `mean [D]`, `std [D]` and the layers, plus string metadata
(`format`, `encoder`, `model`, `feature_dim`, `hidden`, `positive=clean`, the report numbers), so the reward
can rebuild the same encoder from the file alone.

Encoders are anything with `image_features(images [B,3,H,W] in [0,1]) -> [B, D]` (`FeatureEncoder`);
`load_encoder("clip" | "dino", model)` builds the toolkit's CLIP / DINOv2 encoders from a hub id or a
local directory, and every entry point also accepts an encoder object (tests inject a tiny one).
The VLM yes/no artifact question (kind (b)) is `vlm_artifact` in `rewards.vlm`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rewards.base import REWARDS, check_images

logger = logging.getLogger(__name__)

HEAD_FORMAT = "flowalign.artifact_head.v1"
HEAD_FILENAME = "artifact_head.safetensors"
DEFAULT_MODELS = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dinov2-base"}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class FeatureEncoder(Protocol):
    """A frozen image encoder: `[B,3,H,W]` in [0, 1] -> features `[B, D]`."""

    def image_features(self, images: Tensor) -> Tensor: ...


def load_encoder(
    kind: str, model: str | None = None, *, device: torch.device | str | None = None, dtype: Any = None
) -> FeatureEncoder:
    """The toolkit's CLIP (`rewards.clip`) or DINOv2 (`rewards.dino`) encoder from a hub id or local directory."""
    model = model or DEFAULT_MODELS.get(kind)
    if kind == "clip":
        from rewards.clip import ClipEncoder

        return ClipEncoder(model, device=device, dtype=dtype)
    if kind == "dino":
        from rewards.dino import DinoEncoder

        return DinoEncoder(model, device=device, dtype=dtype)
    raise ValueError(
        f"unknown encoder {kind!r}; valid: {', '.join(sorted(DEFAULT_MODELS))} (or pass an encoder object)"
    )


# ---------------------------------------------------------------------------------------------------------
# the head
# ---------------------------------------------------------------------------------------------------------


class ArtifactHead(nn.Module):
    """Standardise features, then logistic regression (`hidden=0`) or Linear-GELU-Linear: `[B, D] -> [B]` logit
    of "clean"."""

    def __init__(self, feature_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.feature_dim, self.hidden = int(feature_dim), int(hidden)
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(feature_dim, 1))

    def forward(self, features: Tensor) -> Tensor:
        x = (features.float() - self.mean) / self.std
        return self.net(x).squeeze(-1)


def probe_images() -> Tensor:
    """Two fixed images (seeded noise, a colour gradient) `[2,3,64,64]`: their features, stored with a head, tell
    at load whether the encoder is the one the head was trained on (same width is not enough: any CLIP ViT-L
    gives 768-d features, each its own)."""
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    ramp = torch.linspace(0, 1, 64)
    gradient = torch.stack([ramp[None].expand(64, 64), ramp[:, None].expand(64, 64), 1 - ramp[None].expand(64, 64)])
    return torch.stack([noise, gradient])


def check_encoder(encoder: FeatureEncoder, probe_features: Tensor, meta: dict[str, str], device: Any = None) -> None:
    """Refuses an encoder whose features of `probe_images` differ from those stored with the head (cosine < 0.98;
    another dtype or device of the same weights stays above 0.99)."""
    with torch.no_grad():  # as the probe features were stored: through encode_images
        got = encode_images(encoder, list(probe_images()), device=device)
    if got.shape != probe_features.shape:
        return  # the feature-width check in the reward names this case
    cos = float(torch.nn.functional.cosine_similarity(got, probe_features.float(), dim=1).min())
    if cos < 0.98:
        raise ValueError(
            f"the encoder given is not the one this artifact head was trained on ({meta.get('encoder')}: "
            f"{meta.get('model')}): its features of a fixed probe image differ (cosine {cos:.3f}); pass model= that "
            "encoder's weights"
        )


def save_head(
    head: ArtifactHead, path: str | Path, metadata: dict[str, Any], *, probe_features: Tensor | None = None
) -> Path:
    """Writes the head's tensors and string metadata to a safetensors file (parent dirs created); with
    `probe_features`, the encoder's features of `probe_images` (checked when the head is used)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": HEAD_FORMAT,
        "feature_dim": str(head.feature_dim),
        "hidden": str(head.hidden),
        "positive": "clean",
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if probe_features is not None:
        state["probe_features"] = probe_features.detach().float().cpu().contiguous()
    save_file(state, str(path), metadata=meta)
    return path


def load_head(path: str | Path) -> tuple[ArtifactHead, dict[str, str]]:
    """Reads a head written by `save_head` / `train_artifact_head` (safetensors only): `(head, metadata)`; the
    stored probe features, if any, are `head.probe_features` (else None)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact head {str(path)!r} not found; train one with `flowalign artifact train`")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{str(path)!r} is not a flowalign artifact head (format {meta.get('format')!r})")
    head = ArtifactHead(int(meta["feature_dim"]), int(meta["hidden"]))
    state = load_file(str(path))
    head.probe_features = state.pop("probe_features", None)
    head.load_state_dict(state)
    return head.eval(), meta


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------


def list_images(directory: str | Path, flag: str) -> list[Path]:
    """Image files under `directory` (recursive, sorted, hidden files skipped); clear errors when there are none."""
    d = Path(directory).expanduser()
    if not d.exists():
        raise FileNotFoundError(f"{flag} directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{flag} {str(d)!r} is not a directory")
    files = sorted(
        p
        for p in d.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(d).parts)
    )
    if not files:
        raise ValueError(f"{flag} directory {str(d)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_image(path: Path) -> Tensor:
    """An image file -> `[3,H,W]` float in [0, 1] (RGB); a clear error naming the file when unreadable."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # as viewers show it (phone photos are often stored rotated)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / integer / float greyscale
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                grey = torch.from_numpy(np.clip(arr / (1.0 if img.mode == "F" and arr.max() <= 1 else top), 0, 1))
                return grey.float()[None].expand(3, -1, -1).clone()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)  # transparent pixels as on a white page, not black
            arr = np.asarray(img.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


@torch.no_grad()
def encode_images(
    encoder: FeatureEncoder, images: Sequence[Tensor], *, batch_size: int = 32, device: Any = None
) -> Tensor:
    """Features of `[3,H,W]` images, batched among images of equal size: `[N, D]` fp32 on CPU."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(i)
    out: list[Tensor | None] = [None] * len(images)
    for idx in by_shape.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            batch = torch.stack([images[i] for i in chunk])
            feats = encoder.image_features(batch if device is None else batch.to(device)).float().cpu()
            if feats.ndim != 2 or feats.shape[0] != len(chunk):
                raise ValueError(f"encoder returned features of shape {tuple(feats.shape)} for {len(chunk)} images")
            for i, f in zip(chunk, feats, strict=True):
                out[i] = f
    return torch.stack(out)  # type: ignore[arg-type]


def split_indices(n: int, val_fraction: float, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Random (train, val) split of `range(n)` keeping >= 1 of each when `val_fraction > 0`."""
    perm = torch.randperm(n, generator=generator).tolist()
    n_val = 0 if val_fraction <= 0 else min(n - 1, max(1, round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def pair_keys(files: Sequence[Path], root: str | Path) -> list[str]:
    """Each file's path under `root` without its suffix: `clean/0007.png` and `artifact/0007.jpg` are one pair."""
    root = Path(root).expanduser()
    return [str(f.relative_to(root).with_suffix("")) for f in files]


def split_pairs(
    clean_keys: Sequence[str], artifact_keys: Sequence[str], val_fraction: float, generator: torch.Generator
) -> tuple[list[int], list[int], list[int], list[int], list[tuple[int, int]]]:
    """(train clean, val clean, train artifact, val artifact, held-out pairs) as indices into each class.

    A clean image and the artifact image made from it (same name in both folders, as in ArtifactReward's 202
    pairs) go to the same side: split apart, the held-out images' near-copies sit in the training set and the
    held-out figures mean little. Unpaired images split per class."""
    for flag, keys in (("--clean", clean_keys), ("--artifact", artifact_keys)):
        twice = sorted(k for k, n in Counter(keys).items() if n > 1)
        if twice:  # 0001.png and 0001.jpg: which one is the pair of artifact/0001?
            raise ValueError(f"{flag} holds several images named {twice[0]!r} (other suffixes); rename one")
    a_index = {k: i for i, k in enumerate(artifact_keys)}
    pairs = [(i, a_index[k]) for i, k in enumerate(clean_keys) if k in a_index]
    paired_c, paired_a = {c for c, _ in pairs}, {a for _, a in pairs}
    tr_p, va_p = split_indices(len(pairs), val_fraction, generator)
    lone_c = [i for i in range(len(clean_keys)) if i not in paired_c]
    lone_a = [i for i in range(len(artifact_keys)) if i not in paired_a]
    tr_c, va_c = split_indices(len(lone_c), val_fraction, generator)
    tr_a, va_a = split_indices(len(lone_a), val_fraction, generator)
    held = [pairs[i] for i in va_p]
    return (
        [pairs[i][0] for i in tr_p] + [lone_c[i] for i in tr_c],
        [c for c, _ in held] + [lone_c[i] for i in va_c],
        [pairs[i][1] for i in tr_p] + [lone_a[i] for i in tr_a],
        [a for _, a in held] + [lone_a[i] for i in va_a],
        held,
    )


def ranking_accuracy(clean_scores: Tensor, artifact_scores: Tensor, *, paired: bool = False) -> float | None:
    """P(a clean image scores above an artifact image), ties half: over every (clean, artifact) combination, the
    ROC AUC; `paired`, over matched pairs one by one (clean i with artifact i), ArtifactReward's pairwise accuracy."""
    if clean_scores.numel() == 0 or artifact_scores.numel() == 0:
        return None
    if paired:
        diff = clean_scores.reshape(-1) - artifact_scores.reshape(-1)
    else:
        diff = clean_scores.reshape(-1, 1) - artifact_scores.reshape(1, -1)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactReport:
    """What `train_artifact_head` measured. Accuracies in [0, 1]; `None` without a held-out split."""

    n_clean: int
    n_artifact: int
    n_train: int
    n_val: int
    train_accuracy: float
    val_accuracy: float | None
    val_accuracy_clean: float | None
    val_accuracy_artifact: float | None
    val_auc: float | None  # P(held-out clean scores above held-out artifact), every combination
    val_pair_accuracy: float | None  # the same over held-out matched pairs only (None without pairs)
    n_val_pairs: int
    encoder: str
    model: str
    feature_dim: int
    out_path: str

    def summary(self) -> str:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        return (
            f"artifact head ({self.encoder}: {self.model}, {self.feature_dim}-d features) -> {self.out_path}\n"
            f"  images: {self.n_clean} clean, {self.n_artifact} artifact; "
            f"train {self.n_train}, held-out {self.n_val}\n"
            f"  held-out accuracy {pct(self.val_accuracy)} (clean {pct(self.val_accuracy_clean)}, "
            f"artifact {pct(self.val_accuracy_artifact)}); train accuracy {pct(self.train_accuracy)}\n"
            f"  held-out ranking: clean above artifact {pct(self.val_auc)} (AUC); over {self.n_val_pairs} matched "
            f"pairs {pct(self.val_pair_accuracy)}"
        )


def fit_head(
    features: Tensor,
    labels: Tensor,
    *,
    hidden: int = 0,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> ArtifactHead:
    """Fits the head on `features [N, D]`, `labels [N]` (1 = clean): full-batch AdamW on class-balanced BCE.

    Standardisation statistics come from these (training) features only.
    """
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG stream
        torch.manual_seed(seed)
        head = ArtifactHead(features.shape[1], hidden)
    x, y = features.float(), labels.float()
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
    n_pos, n_neg = float(y.sum()), float((1 - y).sum())
    # class-balanced: each class contributes half of the loss, whatever the curated counts are
    weights = torch.where(y > 0.5, 0.5 / max(n_pos, 1.0), 0.5 / max(n_neg, 1.0))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    for _ in range(epochs):
        loss = (nn.functional.binary_cross_entropy_with_logits(head(x), y, reduction="none") * weights).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval().requires_grad_(False)


def _accuracy(logits: Tensor, y: Tensor) -> float | None:
    """Threshold accuracy of logits of "clean" against labels (1 = clean); None for no images."""
    return float(((logits > 0).float() == y).float().mean()) if len(y) else None


def train_artifact_head(
    clean_dir: str | Path,
    artifact_dir: str | Path,
    out_path: str | Path,
    *,
    encoder: str | FeatureEncoder = "clip",
    model: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    epochs: int = 300,
    hidden: int = 0,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    dtype: Any = None,
) -> ArtifactReport:
    """Trains the artifact head on two image folders and saves it; returns the held-out report.

    Args:
        clean_dir: artifact-free images (label "clean", the positive class).
        artifact_dir: artifact-containing images.
        out_path: where the `.safetensors` head goes.
        encoder: `"clip"` / `"dino"` (loaded from `model`, a hub id or local dir) or an encoder object.
        model: encoder weights; default `openai/clip-vit-large-patch14` / `facebook/dinov2-base`.
        val_fraction: fraction of each class held out for the report (stratified); 0 disables it.
        seed: split and initialisation seed.
        epochs, hidden, lr, weight_decay: the head and its full-batch optimisation.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: missing or empty folders, unreadable images,
        fewer than 2 images in a class (needed for a split).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if Path(out_path).expanduser().is_dir():
        raise ValueError(
            f"--out {str(out_path)!r} is a directory; name the head file, e.g. DIR/artifact_head.safetensors"
        )
    clean_files = list_images(clean_dir, "--clean")
    artifact_files = list_images(artifact_dir, "--artifact")
    c_root, a_root = Path(clean_dir).expanduser().resolve(), Path(artifact_dir).expanduser().resolve()
    if c_root == a_root or c_root in a_root.parents or a_root in c_root.parents:
        raise ValueError(
            f"--clean {str(clean_dir)!r} and --artifact {str(artifact_dir)!r} overlap (one holds the other, and"
            " images are listed recursively): give two separate folders"
        )
    for flag, files in (("--clean", clean_files), ("--artifact", artifact_files)):
        if val_fraction > 0 and len(files) < 2:
            raise ValueError(f"{flag} has {len(files)} image; a held-out split needs at least 2 per class")
    if isinstance(encoder, str):
        from rewards.hub import resolve_device

        kind, model_id = encoder, model or DEFAULT_MODELS.get(encoder, "")
        if Path(model_id).expanduser().is_dir():  # a local copy: recorded so the reward finds it from anywhere
            model_id = str(Path(model_id).expanduser().resolve())
        device = resolve_device(device)
        enc = load_encoder(kind, model_id, device=device, dtype=dtype)
    else:  # an encoder object: images stay on CPU unless `device` is given
        enc = encoder
        kind = str(getattr(encoder, "kind", type(encoder).__name__))
        model_id = str(model or getattr(encoder, "model_id", ""))

    files = clean_files + artifact_files
    # read and encode a batch at a time: only the features of all images are kept, not the images
    feats = torch.cat(
        [
            encode_images(
                enc, [read_image(p) for p in files[i : i + batch_size]], batch_size=batch_size, device=device
            )
            for i in range(0, len(files), batch_size)
        ]
    )
    labels = torch.cat([torch.ones(len(clean_files)), torch.zeros(len(artifact_files))])

    g = torch.Generator().manual_seed(seed)
    keys_c, keys_a = pair_keys(clean_files, clean_dir), pair_keys(artifact_files, artifact_dir)
    tr_c, va_c, tr_a, va_a, held_pairs = split_pairs(keys_c, keys_a, val_fraction, g)
    off = len(clean_files)
    train_idx = tr_c + [off + i for i in tr_a]
    val_c, val_a = torch.tensor(va_c, dtype=torch.long), torch.tensor([off + i for i in va_a], dtype=torch.long)
    val_idx = torch.cat([val_c, val_a])

    head = fit_head(
        feats[train_idx], labels[train_idx], hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed
    )
    with torch.no_grad():
        logits = head(feats)
    pair_c = torch.tensor([c for c, _ in held_pairs], dtype=torch.long)
    pair_a = torch.tensor([off + a for _, a in held_pairs], dtype=torch.long)
    report = ArtifactReport(
        n_clean=len(clean_files),
        n_artifact=len(artifact_files),
        n_train=len(train_idx),
        n_val=len(val_idx),
        train_accuracy=float(_accuracy(logits[train_idx], labels[train_idx])),
        val_accuracy=_accuracy(logits[val_idx], labels[val_idx]),
        val_accuracy_clean=_accuracy(logits[val_c], labels[val_c]),
        val_accuracy_artifact=_accuracy(logits[val_a], labels[val_a]),
        val_auc=ranking_accuracy(logits[val_c], logits[val_a]),
        val_pair_accuracy=ranking_accuracy(logits[pair_c], logits[pair_a], paired=True),
        n_val_pairs=len(held_pairs),
        encoder=kind,
        model=model_id,
        feature_dim=int(feats.shape[1]),
        out_path=str(out_path),
    )
    meta = {k: v for k, v in asdict(report).items() if k not in ("out_path", "feature_dim")}
    probe = encode_images(enc, list(probe_images()), device=device)
    save_head(head, out_path, {k: ("" if v is None else v) for k, v in meta.items()}, probe_features=probe)
    logger.info("%s", report.summary())
    return report


# ---------------------------------------------------------------------------------------------------------
# the reward
# ---------------------------------------------------------------------------------------------------------


@REWARDS.register("artifact_head")
def artifact_head(
    head: str = HEAD_FILENAME,
    *,
    encoder: FeatureEncoder | None = None,
    model: str | None = None,
    device: torch.device | str | None = None,
    dtype: Any = None,
    **_: Any,
):
    """p(clean) from a trained artifact head on its frozen encoder's features (higher = fewer artifacts).

    Args:
        head: the `.safetensors` file from `flowalign artifact train`, a directory holding
            `artifact_head.safetensors`, or a hub repo with that file.
        encoder: an encoder object to use instead of the one named in the head's metadata.
        model: a local copy of the metadata's encoder weights (when the hub id is unreachable). An encoder whose
            features of a fixed probe image differ from the training encoder's is refused.

    CLIP encoders see the central square of a non-square image (their preprocessing's centre crop): an artifact
    at the long sides goes unseen.

    Returns:
        reward `(images [B,3,H,W] in [0,1], prompts) -> [B]` fp32 in (0, 1); differentiable w.r.t. the pixels
        when the encoder is.
    """
    from rewards.hub import resolve_device, resolve_file

    path = resolve_file(head, HEAD_FILENAME, what="artifact_head", kwarg="head")
    net, meta = load_head(path)
    dev = resolve_device(device)
    if encoder is None:
        encoder = load_encoder(meta.get("encoder", ""), model or meta.get("model") or None, device=dev, dtype=dtype)
    if net.probe_features is not None:
        check_encoder(encoder, net.probe_features, meta, dev)
    net = net.to(dev).requires_grad_(False)  # a frozen judge: gradients reach the pixels, not its weights

    def reward(images: Tensor, prompts: Sequence[str], **columns: Any) -> Tensor:
        check_images(images.detach() if isinstance(images, Tensor) else images, "artifact_head")
        feats = encoder.image_features(images.to(dev))
        if feats.shape[-1] != net.feature_dim:
            raise ValueError(
                f"artifact_head: encoder gives {feats.shape[-1]}-d features but the head {str(path)!r} was trained on "
                f"{net.feature_dim}-d ({meta.get('encoder')}: {meta.get('model')})"
            )
        return torch.sigmoid(net(feats.float()))

    reward.head, reward.metadata = net, meta  # type: ignore[attr-defined]
    return reward


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowalign artifact train",
        description="Train the artifact head on frozen CLIP/DINO features of clean vs artifact images.",
    )
    p.add_argument("--clean", required=True, help="folder of artifact-free images")
    p.add_argument("--artifact", required=True, help="folder of images with artifacts")
    p.add_argument("--out", required=True, help="output head, e.g. HEAD.safetensors")
    p.add_argument("--encoder", choices=sorted(DEFAULT_MODELS), default="clip", help="frozen feature encoder")
    p.add_argument("--model", default=None, help=f"encoder hub id or local dir (default: {DEFAULT_MODELS})")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--hidden", type=int, default=0, help="MLP hidden width; 0 = logistic regression")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`flowalign artifact train ...`: trains, saves and prints the report. Returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        report = train_artifact_head(
            args.clean,
            args.artifact,
            args.out,
            encoder=args.encoder,
            model=args.model,
            val_fraction=args.val_fraction,
            seed=args.seed,
            epochs=args.epochs,
            hidden=args.hidden,
            lr=args.lr,
            batch_size=args.batch_size,
            device=args.device,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"flowalign artifact train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(report), indent=2) if args.json else report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
