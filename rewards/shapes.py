"""The exact checker of the built-in world: finds coloured shapes in an image and grades them against a caption.

Like GenEval it checks object presence, counts, colours and positions, but with a program instead of a
detector, so ground-truth renders score 100% and the reward cannot be fooled by style.

Detection: pixels are classified to the nearest of BACKGROUND and the palette, keeping a palette label only
within COLOR_TOLERANCE (so blended edge pixels are ignored); 8-connected components of one colour with at least
MIN_PIXELS pixels are objects; an object's shape is the template (circle, square, triangle drawn to fill its
bounding box) with the highest IoU, or "unknown" when the shape is not clearly one of them (the thresholds of the
checker version, `CHECKERS`); its position is the centre of its bounding box (for a render, exactly the scene's
cx, cy).

Versions (every figure names one; accuracies are comparable only under one version):
- 2, the default: every figure measured up to checker v3 used it. Unknown when the box is longer than 1.5x on one
  side or no template reaches IoU 0.65. Lenient by construction: an 8x12 rectangle passes as a square, and a blob
  between circle and square gets whichever template wins by a hair (21 of 180 shapes of base v2's samples by < 0.02).
- 3, stricter: also unknown when the two best templates score within 0.03 of each other (a coin flip in v2), when
  the box is longer than 1.3x, the IoU under 0.7 or the solidity (area / convex-hull area) under 0.75 (rings,
  crosses, Ls); and a blob of ink of no palette colour (black, grey, orange...) that touches no palette pixel is
  an object, so an extra (a blended edge or blur halo touches its object). On base v2's held-out samples
  (main-job settings, three seeds): 21.7% strict against v2's 29.9%.

Constraints per category (strict = 1 iff all hold; partial = the fraction that hold):

| category      | constraints                                                                        |
|---------------|------------------------------------------------------------------------------------|
| single_object | object0.present, no_extra                                                          |
| two_object    | object0.present, object1.present, no_extra                                         |
| counting      | object0.present, count, no_extra                                                   |
| colors        | object0.present, object0.color, no_extra                                           |
| position      | object0.present, object0.color, object1.present, object1.color, relation, no_extra |
| color_attr    | object0.present, object0.color, object1.present, object1.color, no_extra           |

- object{i}.present: a detected object has the stated shape (a shape stated k times needs k such objects).
- object{i}.color: a detected object has the stated shape *and* colour (same counting rule).
- count: exactly `count` detected objects have the stated shape.
- relation: some object matching objects[0] and some matching objects[1] satisfy `world.relation_holds`.
- no_extra: the image holds no more objects than stated; for counting, no object of another shape (so a wrong
  count fails `count` alone). Objects of "unknown" shape count as extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from flowalign.world import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    CaptionSpec,
    caption_of,
    parse_caption,
    relation_holds,
    shape_mask,
)
from rewards.base import REWARDS, RewardFn, check_images

COLOR_TOLERANCE = 75.0  # RGB distance; under half the closest palette pair (red-purple, 154), so labels never tie
MIN_PIXELS = 16  # smaller components are specks (the smallest rendered object, a 9 px triangle, has 49 pixels)

_REFS = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.int32)  # [1 + colours, 3]


@dataclass(frozen=True)
class Checker:
    """The shape thresholds of one checker version (see the module docstring)."""

    version: int
    max_aspect: float  # a box longer than this on one side is no shape of the world
    min_iou: float  # below this IoU with every template the shape is "unknown" (circle vs square templates: ~0.8)
    min_margin: float = 0.0  # the best template must beat the second by this much, else "unknown"
    min_solidity: float = 0.0  # area / convex-hull area (renders: >= 0.875, the 9 px triangle's staircase)
    off_palette: bool = False  # blobs of ink of no palette colour that touch no palette pixel are objects


CHECKERS: dict[int, Checker] = {
    2: Checker(2, max_aspect=1.5, min_iou=0.65),
    3: Checker(3, max_aspect=1.3, min_iou=0.7, min_margin=0.03, min_solidity=0.75, off_palette=True),
}
DEFAULT_CHECKER = 2  # v3 is opt-in (`checker: 3`) until the README's figures are measured under it


def checker_of(version: int) -> Checker:
    """The checker of a version number, or an error listing the versions."""
    if isinstance(version, bool) or version not in CHECKERS:
        raise ValueError(f"unknown checker version {version!r}; use one of {', '.join(map(str, CHECKERS))}")
    return CHECKERS[version]


@dataclass(frozen=True)
class Detection:
    """One object found in an image."""

    shape: str  # one of SHAPES, or "unknown"
    color: str  # one of PALETTE, or "unknown" (v3's off-palette ink)
    cx: float  # bounding-box centre, pixels, x to the right
    cy: float  # bounding-box centre, pixels, y downward
    n_pixels: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


@dataclass(frozen=True)
class CheckResult:
    """The grade of one image for one caption."""

    strict: float  # 1.0 iff every constraint holds
    partial: float  # fraction of constraints that hold
    constraints: dict[str, bool]  # constraint name -> held (names in the module docstring)
    detections: tuple[Detection, ...] = ()  # the objects the grade was computed from (for diagnosis)


def _as_uint8(image: Any) -> np.ndarray:
    """Returns an image as uint8 [IMAGE_SIZE, IMAGE_SIZE, 3], or raises naming what was expected and what came."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    expected = (
        f"expected one image of the built-in world's size, uint8 [{IMAGE_SIZE},{IMAGE_SIZE},3] or float "
        f"[3,{IMAGE_SIZE},{IMAGE_SIZE}] / [{IMAGE_SIZE},{IMAGE_SIZE},3] in [0, 1]"
    )
    if image.shape == (3, IMAGE_SIZE, IMAGE_SIZE):
        image = image.transpose(1, 2, 0)
    elif image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"{expected}, got shape {image.shape}; resize or sample at {IMAGE_SIZE}x{IMAGE_SIZE}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{expected}, got dtype {image.dtype}")
    lo, hi = float(np.min(image)), float(np.max(image))
    if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
        raise ValueError(f"{expected}, got values in [{lo:.3g}, {hi:.3g}]; map [-1, 1] outputs with (x + 1) / 2")
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


@cache
def _neighbours(h: int, w: int) -> tuple[tuple[int, ...], ...]:
    # 8-connected neighbours of each flat pixel index.
    out = []
    for y in range(h):
        for x in range(w):
            out.append(
                tuple(
                    (y + dy) * w + x + dx
                    for dy in (-1, 0, 1)
                    for dx in (-1, 0, 1)
                    if (dy or dx) and 0 <= y + dy < h and 0 <= x + dx < w
                )
            )
    return tuple(out)


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of a mask's pixel squares (monotone chain over the pixel corners)."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    pts = sorted(set(map(tuple, corners.tolist())))

    def half(points: list) -> list:
        out: list = []
        for p in points:
            while len(out) >= 2 and (
                (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0
            ):
                out.pop()
            out.append(p)
        return out[:-1]

    hull = half(pts) + half(pts[::-1])
    return 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1], strict=True)))


def _classify_shape(mask: np.ndarray, checker: Checker) -> str:
    """The template shape of a cropped component mask [h, w] by best IoU, or "unknown"."""
    h, w = mask.shape
    if max(h, w) > checker.max_aspect * min(h, w):
        return "unknown"
    area = int(mask.sum())
    ious = []
    for shape in SHAPES:
        t = shape_mask(shape, w, h)
        inter = int(np.count_nonzero(mask & t))
        ious.append((inter / (area + int(t.sum()) - inter), shape))
    (best_iou, best), (second_iou, _) = sorted(ious, reverse=True)[:2]
    if best_iou < checker.min_iou or best_iou - second_iou < checker.min_margin:
        return "unknown"
    if checker.min_solidity and area + _pinholes(mask) < checker.min_solidity * _hull_area(mask):
        return "unknown"
    return best


def _pinholes(mask: np.ndarray) -> int:
    """Pixels of the holes inside a mask smaller than MIN_PIXELS: speckle, which solidity should not count as the
    concavity of a ring, cross or L."""
    h, w = mask.shape
    outside = np.pad(~mask, 1, constant_values=True)  # a frame joining every gap open to the border into one
    holes = _components(np.where(outside, 0, -1).ravel().tolist(), h + 2, w + 2)
    return sum(len(px) for _, px in holes if px[0] != 0 and len(px) < MIN_PIXELS)


def _components(labels: list[int], h: int, w: int) -> list[tuple[int, list[int]]]:
    """(label, flat pixel indices) of each 8-connected component of equal labels >= 0, in raster order."""
    neighbours = _neighbours(h, w)
    seen = [False] * (h * w)
    out = []
    for start, label in enumerate(labels):
        if label < 0 or seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:  # depth-first flood fill over same-label 8-neighbours
            p = stack.pop()
            pixels.append(p)
            for q in neighbours[p]:
                if not seen[q] and labels[q] == label:
                    seen[q] = True
                    stack.append(q)
        out.append((label, pixels))
    return out


def _touching(mask: np.ndarray) -> np.ndarray:
    """The pixels in or 8-adjacent to `mask`: bool [H, W]."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def detect(image: np.ndarray, checker: int = DEFAULT_CHECKER) -> list[Detection]:
    """Finds the objects in an image (uint8 [H,W,3], or float [3,H,W] / [H,W,3] in [0, 1]; H = W = IMAGE_SIZE)
    with a checker version's thresholds.

    Returns detections in raster order of their first pixel (v3's off-palette objects after the palette ones).
    """
    rules = checker_of(checker)
    img = _as_uint8(image).astype(np.int32)
    h, w, _ = img.shape
    d2 = ((img[:, :, None, :] - _REFS) ** 2).sum(-1)  # [H, W, 1 + colours]
    nearest = d2.argmin(-1)
    ok = (nearest > 0) & (d2.min(-1) <= COLOR_TOLERANCE**2)
    labels = np.where(ok, nearest - 1, -1).ravel().tolist()  # colour index per pixel, -1 for none
    found: list[Detection] = []
    components = _components(labels, h, w)
    if rules.off_palette:  # ink far from the background and every palette colour, in blobs touching no palette object
        off = (d2.min(-1) > COLOR_TOLERANCE**2).ravel()  # (a blended edge or blur halo touches its object; a stray
        objects = np.zeros(h * w, dtype=bool)  # near-palette speck inside a blob does not hide the blob)
        for _, px in components:
            objects[px] = len(px) >= MIN_PIXELS
        near = _touching(objects.reshape(h, w)).ravel()
        for _, px in _components(np.where(off, 0, -1).tolist(), h, w):
            if not near[px].any():
                components.append((len(COLORS), px))
    for colour, pixels in components:
        if len(pixels) < MIN_PIXELS:
            continue
        ys, xs = np.divmod(np.asarray(pixels), w)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        crop = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        crop[ys - y0, xs - x0] = True
        shape, name = (
            ("unknown", "unknown") if colour == len(COLORS) else (_classify_shape(crop, rules), COLORS[colour])
        )
        found.append(Detection(shape, name, (x0 + x1) / 2, (y0 + y1) / 2, len(pixels), (x0, y0, x1, y1)))
    return found


def _constraints(spec: CaptionSpec, found: Sequence[Detection]) -> dict[str, bool]:
    """The constraint table of the module docstring, evaluated on detections."""
    out: dict[str, bool] = {}
    objs = spec.objects
    for i, o in enumerate(objs):
        # The k-th mention of a shape (or shape-colour pair) needs k matching detections.
        k_shape = sum(p.shape == o.shape for p in objs[: i + 1])
        out[f"object{i}.present"] = sum(d.shape == o.shape for d in found) >= k_shape
        if o.color is not None:
            k_pair = sum(p == o for p in objs[: i + 1])
            out[f"object{i}.color"] = sum(d.shape == o.shape and d.color == o.color for d in found) >= k_pair
    if spec.category == "counting":
        out["count"] = sum(d.shape == objs[0].shape for d in found) == spec.count
    if spec.relation is not None:
        a = [(d.cx, d.cy) for d in found if d.shape == objs[0].shape and d.color == objs[0].color]
        b = [(d.cx, d.cy) for d in found if d.shape == objs[1].shape and d.color == objs[1].color]
        out["relation"] = any(relation_holds(spec.relation, p, q) for p in a for q in b)
    if spec.category == "counting":
        out["no_extra"] = all(d.shape == objs[0].shape for d in found)
    else:
        out["no_extra"] = len(found) <= len(objs)
    return out


def score(spec_or_caption: CaptionSpec | str, image: np.ndarray, checker: int = DEFAULT_CHECKER) -> CheckResult:
    """Grades one image against a caption (or its parsed spec); see the constraint table above."""
    # A spec goes through its caption too, so one outside the grammar fails with the grammar's error.
    spec = parse_caption(spec_or_caption if isinstance(spec_or_caption, str) else caption_of(spec_or_caption))
    found = tuple(detect(image, checker))
    cons = _constraints(spec, found)
    held = sum(cons.values())
    return CheckResult(strict=float(held == len(cons)), partial=held / len(cons), constraints=cons, detections=found)


def _images_uint8(images: Any) -> list[np.ndarray]:
    """A batch (Tensor [B,3,H,W] in [0,1], array [B,H,W,3] uint8 / [B,3,H,W], or a sequence) as uint8 HWC images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images [B,3,H,W], got shape {tuple(images.shape)}")
        images = images.detach().to("cpu", torch.float32).numpy()
    return [_as_uint8(im) for im in images]


def _se(values: list[float]) -> float:
    """Standard error of a mean of scores in [0, 1] (sample std, ddof 1).

    When every value is the same (one image, or a category at 0% or 100%) the sample std is 0, which would claim
    certainty ("0.000 ± 0.000" for 40 failures); then the Agresti-Coull-style sqrt(p(1 - p) / (n + 1)) with
    p = (sum + 1/2) / (n + 1) stands in: 0.017 for 40 zeros, 0.31 for a single image. Other samples are unchanged.
    """
    n = len(values)
    if n > 1 and np.ptp(values) > 0:
        return float(np.std(values, ddof=1) / np.sqrt(n))
    p = (float(np.sum(values)) + 0.5) / (n + 1)
    return float(np.sqrt(p * (1 - p) / (n + 1)))


def evaluate(images: Any, captions: Sequence[str], checker: int = DEFAULT_CHECKER) -> dict[str, float]:
    """Strict and partial means for an eval report: overall and per category, each with its standard error.

    Keys: "checker" (the version), "strict", "partial", "n", and "{category}/strict", "{category}/partial",
    "{category}/n" for each category present, and "<key>_se" beside every mean. The overall means average the
    per-category means (GenEval's convention), so a category's weight does not depend on how many captions it has;
    their standard error combines the categories' (a stratified mean's). It is the evaluation's own noise (which
    images were drawn), the yardstick for "did this run change accuracy"; seed-to-seed spread of training comes on
    top.
    """
    checker_of(checker)
    imgs = _images_uint8(images)
    if len(imgs) != len(captions):
        raise ValueError(f"got {len(imgs)} images for {len(captions)} captions; pass one caption per image")
    per: dict[str, list[CheckResult]] = {}
    for im, cap in zip(imgs, captions, strict=True):
        spec = parse_caption(cap)
        per.setdefault(spec.category, []).append(score(spec, im, checker))
    out: dict[str, float] = {"checker": float(checker), "n": float(len(imgs))}
    cats = [c for c in CATEGORIES if c in per]
    for cat in cats:
        for kind in ("strict", "partial"):
            values = [float(getattr(r, kind)) for r in per[cat]]
            out[f"{cat}/{kind}"] = float(np.mean(values))
            out[f"{cat}/{kind}_se"] = _se(values)
        out[f"{cat}/n"] = float(len(per[cat]))
    for kind in ("strict", "partial"):
        out[kind] = float(np.mean([out[f"{c}/{kind}"] for c in cats])) if cats else float("nan")
        out[f"{kind}_se"] = float(np.sqrt(sum(out[f"{c}/{kind}_se"] ** 2 for c in cats)) / len(cats)) if cats else 0.0
    return out


def _gated(result: CheckResult, extra_object_factor: float) -> float:
    """The fraction of the constraints other than no_extra that hold, times the factor when an extra object appears.

    Plain partial charges an extra object one constraint's share (0.2 of a colour-attribution caption), which more
    "present"/"colour" hits can buy back; the factor makes it cost a share of everything else. On the main job
    (f = 0.5, four seeds) it changed neither accuracy nor extra objects beyond noise
    (bench/results/v2_extra_object_gate.json), so the preset keeps plain partial.
    """
    others = [held for name, held in result.constraints.items() if name != "no_extra"]
    frac = sum(others) / len(others)
    return frac if result.constraints["no_extra"] else extra_object_factor * frac


class ShapesReward:
    """Reward callable: the checker's strict or partial score per image, float32 [B] on the images' device."""

    def __init__(self, kind: str, extra_object_factor: float | None = None, checker: int = DEFAULT_CHECKER) -> None:
        checker_of(checker)
        if kind not in ("strict", "partial"):
            raise ValueError(f"kind must be 'strict' or 'partial', got {kind!r}")
        if extra_object_factor is not None and (kind != "partial" or not 0.0 <= extra_object_factor <= 1.0):
            raise ValueError(
                f"extra_object_factor is an option of the partial reward and lies in [0, 1], got "
                f"{extra_object_factor!r} for kind {kind!r}"
            )
        self.kind = kind
        self.extra_object_factor = extra_object_factor
        self.checker = checker

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **columns: Any) -> torch.Tensor:
        who = f"shapes_{self.kind}"
        check_images(images, who)
        if tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"{who}: expected {IMAGE_SIZE}x{IMAGE_SIZE} images (the built-in world's size), "
                f"got {images.shape[-2]}x{images.shape[-1]}; sample the built-in model at {IMAGE_SIZE}x{IMAGE_SIZE}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{who}: got {images.shape[0]} images for {len(prompts)} prompts; pass one per image")
        results = [score(p, im, self.checker) for p, im in zip(prompts, _images_uint8(images), strict=True)]
        if self.extra_object_factor is None:
            scores = [getattr(r, self.kind) for r in results]
        else:
            scores = [_gated(r, self.extra_object_factor) for r in results]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def _no_kwargs(name: str, kwargs: dict[str, Any], takes: str) -> None:
    if kwargs:
        raise ValueError(f"reward {name!r} takes only {takes}, got {sorted(kwargs)}")


@REWARDS.register("shapes_strict")
def shapes_strict(checker: int = DEFAULT_CHECKER, **kwargs: Any) -> RewardFn:
    """1.0 where the image satisfies every constraint of its caption, else 0.0 (GenEval-style accuracy), under
    `checker` (a version of `CHECKERS`)."""
    _no_kwargs("shapes_strict", kwargs, "checker")
    return ShapesReward("strict", checker=checker)


@REWARDS.register("shapes_partial")
def shapes_partial(
    extra_object_factor: float | None = None, checker: int = DEFAULT_CHECKER, **kwargs: Any
) -> RewardFn:
    """The fraction of the caption's constraints the image satisfies (a denser reward than strict), under `checker`.

    With `extra_object_factor` f: the fraction of the other constraints, times f when an extra object appears.
    """
    _no_kwargs("shapes_partial", kwargs, "extra_object_factor and checker")
    return ShapesReward("partial", extra_object_factor, checker)
