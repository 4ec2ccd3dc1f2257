"""The world of the built-in model: captions about coloured shapes, scenes that satisfy them, and their renders.

A program grades this world exactly (`rewards.shapes`), the way GenEval grades object counts, colours and positions
for real models, so every alignment experiment here has a ground-truth reward that cannot be hacked by style.

Caption grammar (six GenEval-like categories; 993 captions in all):

| category      | form                                           | example                                   | colour |
|---------------|------------------------------------------------|-------------------------------------------|--------|
| single_object | a {shape}                                      | a circle                                  | free   |
| two_object    | a {shape} and a {shape}                        | a circle and a square                     | free   |
| counting      | {number} {shape}s                              | three triangles                           | free   |
| colors        | a {color} {shape}                              | a green square                            | stated |
| position      | a {color} {shape} {relation} a {color} {shape} | a red circle to the left of a blue square | stated |
| color_attr    | a {color} {shape} and a {color} {shape}        | a blue circle and a red triangle          | stated |

Shapes differ within two_object and color_attr, colours differ within color_attr, and the two objects of a
position caption differ in shape or colour, so every stated object names one thing in the image.
Relations: "to the left of", "to the right of", "above", "below"; numbers: two, three, four.

A scene holds exactly the stated objects and nothing else (counting: exactly that many objects of that shape);
the checker enforces this with its `no_extra` constraint. Free colours are drawn at random, independently per
object. Coordinates are pixels with y growing downward; an object's (cx, cy) is the centre of its bounding box.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from itertools import permutations, product
from typing import TypeVar

import numpy as np

_Num = TypeVar("_Num", float, np.ndarray)

IMAGE_SIZE = 32
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
# Pairwise RGB distances >= 154 (red-purple is closest), every colour >= 250 from the white background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 20, 20),
    "green": (0, 170, 40),
    "blue": (20, 80, 240),
    "yellow": (245, 205, 0),
    "purple": (150, 0, 150),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
# relation -> its caption phrase; a relation relates objects[0] to objects[1] ("objects[0] is left of objects[1]").
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}

# Geometry of scenes. Every shape fills a size x size box; 9-14 px shapes are learned fastest at 32x32 (DESIGN).
SIZES = (9, 11, 13)
SIZES_CROWDED = (9, 11)  # for scenes of 3-4 objects, so random placement succeeds quickly
BORDER = 1  # empty pixels kept between any object and the image edge
GAP = 2  # empty pixels kept between two objects' boxes, so their 8-connected components never touch
_CANDIDATES = 64  # candidate positions drawn per object per attempt
REL_MIN_OFFSET = 6.0  # a relation needs >= 6 px of centre offset along its axis ...
# ... and a smaller offset across it (|perpendicular| < along), the same rule in sampler and checker.

# The held-out split (deterministic rules, no randomness). A caption goes to eval iff its key is held out:
# - position, color_attr: any stated (colour, shape) pair is in HELD_OUT_PAIRS. These pairs never occur in a
#   two-object training caption, yet "a purple triangle" etc. stay in training (colors) so the pair is known.
# - colors: the pair is in HELD_OUT_COLOR_SHAPES (pairs that do occur in two-object training captions).
# - counting: (number, shape) is in HELD_OUT_COUNTS (one diagonal: every number and shape is still trained).
# - two_object: the ordered shape pair is in HELD_OUT_SHAPE_ORDERS (its reverse order is trained).
# - single_object: the shape is in HELD_OUT_SINGLE (triangles are still trained in every other category).
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("purple", "triangle"),
    ("yellow", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
)
HELD_OUT_COLOR_SHAPES: tuple[tuple[str, str], ...] = (("red", "circle"), ("blue", "square"), ("yellow", "triangle"))
HELD_OUT_COUNTS: tuple[tuple[int, str], ...] = ((2, "triangle"), (3, "square"), (4, "circle"))
HELD_OUT_SHAPE_ORDERS: tuple[tuple[str, str], ...] = (("square", "circle"), ("triangle", "square"))
HELD_OUT_SINGLE: tuple[str, ...] = ("triangle",)
EVAL_PER_CATEGORY = 40  # eval list entries per category (categories with fewer held-out captions repeat them)


@dataclass(frozen=True)
class ObjectSpec:
    """One object a caption states; `color` is None where the caption leaves it free."""

    shape: str
    color: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    """A parsed caption. Counting has one object (its shape) and `count`; position has `relation`."""

    category: str
    objects: tuple[ObjectSpec, ...]
    count: int | None = None
    relation: str | None = None  # objects[0] {relation} objects[1]


@dataclass(frozen=True)
class PlacedObject:
    """An object in a scene: its box is [cx - size/2, cx + size/2) x [cy - size/2, cy + size/2) in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: int


@dataclass(frozen=True)
class Scene:
    """Everything that is drawn; the render of a scene is a pure function of it."""

    objects: tuple[PlacedObject, ...]


# ---------------------------------------------------------------------------------------------- grammar

_ACCEPTED_FORMS = (
    "single_object: 'a {shape}', e.g. 'a circle'",
    "two_object: 'a {shape} and a {other shape}', e.g. 'a circle and a square'",
    "counting: '{two|three|four} {shape}s', e.g. 'three triangles'",
    "colors: 'a {color} {shape}', e.g. 'a green square'",
    "position: 'a {color} {shape} {to the left of|to the right of|above|below} a {color} {shape}' "
    "(the two objects differ), e.g. 'a red circle to the left of a blue square'",
    "color_attr: 'a {color} {shape} and a {other color} {other shape}', e.g. 'a blue circle and a red triangle'",
)


def _grammar_error(what: str) -> ValueError:
    forms = "\n  ".join(_ACCEPTED_FORMS)
    return ValueError(
        f"{what}. Accepted caption forms (shapes: {', '.join(SHAPES)}; colors: {', '.join(COLORS)}):\n  {forms}"
    )


def _validate(spec: CaptionSpec) -> None:
    """Raises a ValueError naming the broken rule when `spec` is outside the grammar."""
    if spec.category not in CATEGORIES:
        raise _grammar_error(f"unknown category {spec.category!r}; use one of {', '.join(CATEGORIES)}")
    objs = spec.objects
    n_objects = {"single_object": 1, "counting": 1, "colors": 1}.get(spec.category, 2)
    if len(objs) != n_objects:
        raise _grammar_error(f"{spec.category} states {n_objects} object(s), got {len(objs)}")
    for o in objs:
        if o.shape not in SHAPES:
            raise _grammar_error(f"unknown shape {o.shape!r}")
        if o.color is not None and o.color not in PALETTE:
            raise _grammar_error(f"unknown color {o.color!r}")
    coloured = spec.category in ("colors", "position", "color_attr")
    if any((o.color is None) == coloured for o in objs):
        need = "a color on every object" if coloured else "no colors"
        raise _grammar_error(f"{spec.category} captions state {need}")
    if (spec.count is not None) != (spec.category == "counting"):
        raise _grammar_error("count is set exactly for counting captions")
    if spec.count is not None and spec.count not in NUMBERS:
        raise _grammar_error(f"count must be one of {sorted(NUMBERS)}, got {spec.count}")
    if (spec.relation is not None) != (spec.category == "position"):
        raise _grammar_error("relation is set exactly for position captions")
    if spec.relation is not None and spec.relation not in RELATIONS:
        raise _grammar_error(f"relation must be one of {list(RELATIONS)}, got {spec.relation!r}")
    if spec.category in ("two_object", "color_attr") and objs[0].shape == objs[1].shape:
        raise _grammar_error(f"{spec.category} captions name two different shapes")
    if spec.category == "color_attr" and objs[0].color == objs[1].color:
        raise _grammar_error("color_attr captions name two different colors")
    if spec.category == "position" and objs[0] == objs[1]:
        raise _grammar_error("position captions relate two objects that differ in shape or color")


def _phrase(o: ObjectSpec) -> str:
    return f"a {o.color} {o.shape}" if o.color else f"a {o.shape}"


def caption_of(spec: CaptionSpec) -> str:
    """The canonical caption of `spec` (the inverse of `parse_caption`)."""
    _validate(spec)
    objs = spec.objects
    if spec.category == "counting":
        return f"{NUMBERS[spec.count]} {objs[0].shape}s"  # type: ignore[index]
    if spec.category == "position":
        return f"{_phrase(objs[0])} {RELATIONS[spec.relation]} {_phrase(objs[1])}"  # type: ignore[index]
    return " and ".join(_phrase(o) for o in objs)


def _all_specs() -> list[CaptionSpec]:
    """Every caption spec of the grammar, in a fixed order (relation outermost for position)."""
    specs: list[CaptionSpec] = []
    specs += [CaptionSpec("single_object", (ObjectSpec(s),)) for s in SHAPES]
    specs += [CaptionSpec("two_object", (ObjectSpec(a), ObjectSpec(b))) for a, b in permutations(SHAPES, 2)]
    specs += [CaptionSpec("counting", (ObjectSpec(s),), count=n) for n in NUMBERS for s in SHAPES]
    pairs = [ObjectSpec(s, c) for c, s in product(COLORS, SHAPES)]
    specs += [CaptionSpec("colors", (o,)) for o in pairs]
    specs += [CaptionSpec("position", (a, b), relation=r) for r in RELATIONS for a, b in permutations(pairs, 2)]
    specs += [
        CaptionSpec("color_attr", (a, b))
        for a, b in permutations(pairs, 2)
        if a.shape != b.shape and a.color != b.color
    ]
    return specs


@lru_cache(maxsize=1)
def _table() -> dict[str, CaptionSpec]:
    return {caption_of(s): s for s in _all_specs()}


def _normalize(caption: str) -> str:
    return re.sub(r"\s+", " ", caption.strip().lower()).rstrip(".").strip()


def parse_caption(caption: str) -> CaptionSpec:
    """Parses a caption of the grammar (case, extra spaces and a final period are forgiven)."""
    if not isinstance(caption, str):
        raise _grammar_error(f"expected a caption string, got {type(caption).__name__}")
    spec = _table().get(_normalize(caption))
    if spec is None:
        raise _grammar_error(f"caption {caption!r} is outside the grammar of the built-in world")
    return spec


def all_captions() -> list[str]:
    """The whole finite grammar, in a fixed order."""
    return list(_table())


def grammar_words() -> list[str]:
    """Every word any caption can contain, sorted (to build a reduced tokenizer vocabulary)."""
    return sorted({w for c in _table() for w in c.split()})


def is_held_out(spec: CaptionSpec | str) -> bool:
    """Whether a caption belongs to the eval split (the rules are documented at `HELD_OUT_PAIRS`)."""
    spec = parse_caption(spec) if isinstance(spec, str) else spec
    objs, cat = spec.objects, spec.category
    if cat in ("position", "color_attr"):
        return any((o.color, o.shape) in HELD_OUT_PAIRS for o in objs)
    if cat == "colors":
        return (objs[0].color, objs[0].shape) in HELD_OUT_COLOR_SHAPES
    if cat == "counting":
        return (spec.count, objs[0].shape) in HELD_OUT_COUNTS
    if cat == "two_object":
        return (objs[0].shape, objs[1].shape) in HELD_OUT_SHAPE_ORDERS
    return objs[0].shape in HELD_OUT_SINGLE


@cache
def _split_by_category(split: str) -> dict[str, tuple[str, ...]]:
    """Unique captions of a split, grouped by category, in grammar order."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    out: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for caption, spec in _table().items():
        if split == "all" or is_held_out(spec) == (split == "eval"):
            out[spec.category].append(caption)
    return {c: tuple(v) for c, v in out.items()}


def train_captions() -> list[str]:
    """Every caption not held out (the captions pretraining and RL training may use)."""
    return [c for caps in _split_by_category("train").values() for c in caps]


def train_balanced_captions() -> list[str]:
    """Every training caption, each category's repeated to one common length (the least common multiple of the
    category sizes), so drawing uniformly from this list draws a category uniformly, then a caption of it uniformly
    (as pretraining does). From `train_captions()` itself 83% of draws would be position captions."""
    by_cat = _split_by_category("train")
    n = math.lcm(*(len(caps) for caps in by_cat.values()))
    return [c for caps in by_cat.values() for c in caps * (n // len(caps))]


def eval_captions() -> list[str]:
    """The held-out eval list: EVAL_PER_CATEGORY entries per category (240), in category order.

    Large categories are subsampled with an even stride over grammar order; categories with fewer held-out
    captions (single_object 1, two_object 2, counting 3, colors 3) repeat them cyclically, so score each entry
    with its own seed. Every entry is held out, so the list is disjoint from `train_captions()`.
    """
    out: list[str] = []
    for caps in _split_by_category("eval").values():
        k, m = EVAL_PER_CATEGORY, len(caps)
        out += [caps[i * m // k] if m >= k else caps[i % m] for i in range(k)]
    return out


def train_eval_captions(seed: int = 0, per_category: int = EVAL_PER_CATEGORY) -> list[str]:
    """`per_category` training captions of each category (a seeded shuffle, repeated cyclically where a category is
    smaller), in category order: the balanced list on which the model card, and the prompt set `shapes:train_eval`,
    score training captions with every category weighted as in `eval_captions()`."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for caps in _split_by_category("train").values():
        caps = [caps[i] for i in rng.permutation(len(caps))]
        out += [caps[i % len(caps)] for i in range(per_category)]
    return out


# ---------------------------------------------------------------------------------------------- geometry


@cache
def shape_mask(shape: str, width: int, height: int | None = None) -> np.ndarray:
    """The pixels of `shape` drawn to fill a width x height box: bool [height, width], read-only.

    Pixel (x, y) covers [x, x+1) x [y, y+1). Circle: pixel centres inside the inscribed ellipse. Triangle: apex
    up at the top-centre, base the full bottom row; a row is filled where its lower edge lies inside. Square:
    the whole box. At width == height each shape touches all four sides of its box, so the box centre of a
    rendered object is exactly its (cx, cy).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    h = width if height is None else height
    w = width
    if w < 1 or h < 1:
        raise ValueError(f"shape boxes need a positive width and height, got {w}x{h}")
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    if shape == "square":
        m = np.ones((h, w), dtype=bool)
    elif shape == "circle":
        m = ((xs + 0.5 - w / 2) / (w / 2)) ** 2 + ((ys + 0.5 - h / 2) / (h / 2)) ** 2 <= 1.0
    else:
        m = np.abs(xs + 0.5 - w / 2) <= (ys + 1) / h * (w / 2) + 1e-9
    m.setflags(write=False)
    return m


def _along_across(relation: str, dx: _Num, dy: _Num) -> tuple[_Num, _Num]:
    """(offset along the relation's axis, offset across it) for b - a = (dx, dy)."""
    if relation == "left of":
        return dx, dy
    if relation == "right of":
        return -dx, dy
    if relation == "above":
        return dy, dx
    if relation == "below":
        return -dy, dx
    raise ValueError(f"relation must be one of {list(RELATIONS)}, got {relation!r}")


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether the object centred at `a` is {relation} the one centred at `b` (image y grows downward).

    Rule: the offset along the relation's axis is >= REL_MIN_OFFSET in the stated direction and larger than
    the offset across it. The sampler and the checker share this rule.
    """
    along, across = _along_across(relation, b[0] - a[0], b[1] - a[1])
    return bool(along >= REL_MIN_OFFSET and abs(across) < along)


def sample_scene(spec: CaptionSpec, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies `spec`: the stated objects only, non-overlapping, inside the image.

    Sizes come from SIZES (SIZES_CROWDED for 3-4 objects); free colours are uniform over the palette.
    """
    _validate(spec)
    if spec.category == "counting":
        items = [(spec.objects[0].shape, None)] * int(spec.count)  # type: ignore[arg-type]
    else:
        items = [(o.shape, o.color) for o in spec.objects]
    n, sizes = len(items), SIZES_CROWDED if len(items) >= 3 else SIZES
    for _ in range(1000):  # whole-scene restarts (rare); one random draw per attempt keeps this fast
        r = rng.random(n * (2 + 2 * _CANDIDATES))
        picks = r[n : 2 * n].tolist()
        colors = [c if c is not None else COLORS[int(u * len(COLORS))] for (_, c), u in zip(items, picks, strict=True)]
        cand = r[2 * n :].reshape(n, 2, _CANDIDATES)
        placed: list[tuple[int, int, int]] = []
        for i in range(n):
            s = sizes[int(r[i] * len(sizes))]
            xy = BORDER + (cand[i] * (IMAGE_SIZE - 2 * BORDER - s + 1)).astype(np.int64)  # uniform box corners
            x, y = xy[0], xy[1]
            ok = np.ones(_CANDIDATES, dtype=bool)
            for px, py, ps in placed:  # boxes must be GAP empty pixels apart along at least one axis
                ok &= (x >= px + ps + GAP) | (px >= x + s + GAP) | (y >= py + ps + GAP) | (py >= y + s + GAP)
            if spec.relation is not None and placed:
                px, py, ps = placed[0]
                along, across = _along_across(spec.relation, x + s / 2 - (px + ps / 2), y + s / 2 - (py + ps / 2))
                ok &= (along >= REL_MIN_OFFSET) & (np.abs(across) < along)
            k = int(ok.argmax())  # the first valid candidate: uniform over the valid placements
            if not ok[k]:
                break
            placed.append((int(x[k]), int(y[k]), s))
        if len(placed) == n:
            return Scene(
                tuple(
                    PlacedObject(shape, color, x0 + s / 2, y0 + s / 2, s)
                    for (shape, _), color, (x0, y0, s) in zip(items, colors, placed, strict=True)
                )
            )
    raise RuntimeError(f"could not place a scene for {caption_of(spec)!r}; the geometry constants are too tight")


_PALETTE_ARRAY = {name: np.array(rgb, dtype=np.uint8) for name, rgb in PALETTE.items()}


def render(scene: Scene) -> np.ndarray:
    """Draws `scene`: uint8 [IMAGE_SIZE, IMAGE_SIZE, 3], flat palette colours on BACKGROUND, no antialiasing."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        if o.color not in _PALETTE_ARRAY:
            raise ValueError(f"unknown color {o.color!r}; use one of {', '.join(COLORS)}")
        x0, y0 = int(round(o.cx - o.size / 2)), int(round(o.cy - o.size / 2))
        if x0 < 0 or y0 < 0 or x0 + o.size > IMAGE_SIZE or y0 + o.size > IMAGE_SIZE:
            raise ValueError(f"object {o} leaves the {IMAGE_SIZE}x{IMAGE_SIZE} image; keep its box inside")
        img[y0 : y0 + o.size, x0 : x0 + o.size][shape_mask(o.shape, o.size)] = _PALETTE_ARRAY[o.color]
    return img


# ---------------------------------------------------------------------------------------------- data


def sample_pair(rng: np.random.Generator, split: str = "train") -> tuple[str, np.ndarray]:
    """A caption of `split` ("train", "eval" or "all"; category uniform, then caption uniform) and a render."""
    groups = _split_by_category(split)
    caps = groups[CATEGORIES[int(rng.integers(len(CATEGORIES)))]]
    caption = caps[int(rng.integers(len(caps)))]
    return caption, render(sample_scene(_table()[caption], rng))


def sample_batch(rng: np.random.Generator, n: int, split: str = "train") -> tuple[list[str], np.ndarray]:
    """`n` pairs from `sample_pair`: (captions, images uint8 [n, IMAGE_SIZE, IMAGE_SIZE, 3])."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    for i in range(n):
        caption, images[i] = sample_pair(rng, split)
        captions.append(caption)
    return captions, images
