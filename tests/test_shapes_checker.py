"""The exact checker of the built-in world (rewards.shapes): renders score 100%, single faults fail alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import rewards.shapes as shapes
from flowalign import world as w
from flowalign.world import CaptionSpec, ObjectSpec, PlacedObject, Scene
from rewards.base import REWARDS, build_reward

CONSTRAINTS = {
    "single_object": ["object0.present", "no_extra"],
    "two_object": ["object0.present", "object1.present", "no_extra"],
    "counting": ["object0.present", "count", "no_extra"],
    "colors": ["object0.present", "object0.color", "no_extra"],
    "position": ["object0.present", "object0.color", "object1.present", "object1.color", "relation", "no_extra"],
    "color_attr": ["object0.present", "object0.color", "object1.present", "object1.color", "no_extra"],
}


def _specs_of(category: str) -> list[CaptionSpec]:
    return [s for s in map(w.parse_caption, w.all_captions()) if s.category == category]


def _failed(spec: CaptionSpec, image: np.ndarray, checker: int = shapes.DEFAULT_CHECKER) -> set[str]:
    return {k for k, ok in shapes.score(spec, image, checker).constraints.items() if not ok}


@pytest.mark.parametrize("checker", sorted(shapes.CHECKERS))
@pytest.mark.parametrize("category", w.CATEGORIES)
def test_ground_truth_renders_score_fully(category: str, checker: int) -> None:
    rng = np.random.default_rng(11)
    specs = _specs_of(category)
    for i in range(300):
        spec = specs[i % len(specs)]
        result = shapes.score(spec, w.render(w.sample_scene(spec, rng)), checker)
        assert list(result.constraints) == CONSTRAINTS[category]
        assert result.strict == 1.0 and result.partial == 1.0, (w.caption_of(spec), result)


@pytest.mark.parametrize("checker", sorted(shapes.CHECKERS))
def test_detections_recover_the_scene_exactly(checker: int) -> None:
    rng = np.random.default_rng(5)
    for caption in w.all_captions()[::7]:
        scene = w.sample_scene(w.parse_caption(caption), rng)
        want = sorted((o.shape, o.color, o.cx, o.cy, o.size) for o in scene.objects)
        # detect() and the grade's own record of what it saw
        image = w.render(scene)
        for found in (shapes.detect(image, checker), shapes.score(caption, image, checker).detections):
            assert sorted((d.shape, d.color, d.cx, d.cy, d.box[2] - d.box[0]) for d in found) == want


@pytest.mark.parametrize("checker", sorted(shapes.CHECKERS))
def test_float_layouts_and_mild_noise_score_like_the_uint8_render(checker: int) -> None:
    rng = np.random.default_rng(2)
    for caption in w.eval_captions()[::10]:
        img = w.render(w.sample_scene(w.parse_caption(caption), rng))
        hwc = img.astype(np.float32) / 255
        assert shapes.score(caption, hwc, checker).strict == 1.0
        assert shapes.score(caption, hwc.transpose(2, 0, 1), checker).strict == 1.0
        noisy = np.clip(hwc + rng.normal(0, 0.04, hwc.shape), 0, 1)  # ~10 grey levels of sensor-like noise
        assert shapes.score(caption, noisy, checker).strict == 1.0


@pytest.mark.parametrize("checker", sorted(shapes.CHECKERS))
def test_blank_and_noise_images_score_zero_strict(checker: int) -> None:
    rng = np.random.default_rng(0)
    blank = np.full((w.IMAGE_SIZE, w.IMAGE_SIZE, 3), w.BACKGROUND, dtype=np.uint8)
    assert shapes.detect(blank, checker) == []
    for caption in w.all_captions()[::5]:
        assert shapes.score(caption, blank, checker).strict == 0.0
        noise = rng.integers(0, 256, (w.IMAGE_SIZE, w.IMAGE_SIZE, 3), dtype=np.uint8)
        assert shapes.score(caption, noise, checker).strict == 0.0
        assert shapes.score(caption, rng.random((3, w.IMAGE_SIZE, w.IMAGE_SIZE)), checker).strict == 0.0


def test_a_blank_image_keeps_only_no_extra() -> None:
    blank = np.full((w.IMAGE_SIZE, w.IMAGE_SIZE, 3), w.BACKGROUND, dtype=np.uint8)
    result = shapes.score("a red circle to the left of a blue square", blank)
    assert result.partial == pytest.approx(1 / 6)
    assert {k for k, ok in result.constraints.items() if ok} == {"no_extra"}


def _other(options: tuple[str, ...], *avoid: str | None) -> str:
    return next(o for o in options if o not in avoid)


def _one_fault(spec: CaptionSpec) -> tuple[CaptionSpec, str]:
    """A spec for a scene that differs from `spec` in one thing, and the one constraint that must fail."""
    objs = spec.objects
    if spec.category == "single_object":  # wrong shape
        return replace(spec, objects=(ObjectSpec(_other(w.SHAPES, objs[0].shape)),)), "object0.present"
    if spec.category == "two_object":  # object1 drawn as the third shape
        third = _other(w.SHAPES, objs[0].shape, objs[1].shape)
        return replace(spec, objects=(objs[0], ObjectSpec(third))), "object1.present"
    if spec.category == "counting":  # one too few (or too many for two)
        return replace(spec, count=spec.count + (1 if spec.count == 2 else -1)), "count"
    if spec.category == "colors":  # wrong colour
        return replace(spec, objects=(replace(objs[0], color=_other(w.COLORS, objs[0].color)),)), "object0.color"
    if spec.category == "position":  # the opposite relation
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return replace(spec, relation=flip[spec.relation]), "relation"
    # color_attr: object1 in a colour neither object has
    recoloured = replace(objs[1], color=_other(w.COLORS, objs[0].color, objs[1].color))
    return replace(spec, objects=(objs[0], recoloured)), "object1.color"


@pytest.mark.parametrize("checker", sorted(shapes.CHECKERS))
@pytest.mark.parametrize("category", w.CATEGORIES)
def test_one_thing_wrong_fails_exactly_that_constraint(category: str, checker: int) -> None:
    rng = np.random.default_rng(3)
    specs = _specs_of(category)
    for i in range(60):
        spec = specs[(i * 7) % len(specs)]
        drawn, broken = _one_fault(spec)
        assert _failed(spec, w.render(w.sample_scene(drawn, rng)), checker) == {broken}, w.caption_of(spec)


def _with_extra(scene: Scene, shape: str, color: str, size: int = 9) -> Scene | None:
    """`scene` plus one object at the first free place (raster order), or None when there is no room."""
    for y0 in range(w.BORDER, w.IMAGE_SIZE - w.BORDER - size + 1):
        for x0 in range(w.BORDER, w.IMAGE_SIZE - w.BORDER - size + 1):
            cx, cy = x0 + size / 2, y0 + size / 2
            if all(
                abs(cx - o.cx) >= (o.size + size) / 2 + w.GAP or abs(cy - o.cy) >= (o.size + size) / 2 + w.GAP
                for o in scene.objects
            ):
                return Scene((*scene.objects, PlacedObject(shape, color, cx, cy, size)))
    return None


@pytest.mark.parametrize("checker", sorted(shapes.CHECKERS))
@pytest.mark.parametrize("category", w.CATEGORIES)
def test_an_extra_object_fails_exactly_no_extra(category: str, checker: int) -> None:
    rng = np.random.default_rng(4)
    specs = _specs_of(category)
    tried = 0
    for i in range(80):
        spec = specs[(i * 5) % len(specs)]
        # counting: an extra object of another shape (one more of the same shape is a count fault instead)
        shape = _other(w.SHAPES, spec.objects[0].shape) if category == "counting" else w.SHAPES[i % 3]
        scene = _with_extra(w.sample_scene(spec, rng), shape, w.COLORS[i % 5])
        if scene is None:
            continue
        tried += 1
        assert _failed(spec, w.render(scene), checker) == {"no_extra"}, w.caption_of(spec)
    assert tried >= 20


def test_the_extra_object_factor_scales_the_other_constraints() -> None:
    """shapes_partial(extra_object_factor=f): an extra object multiplies the share of the others met by f."""
    rng = np.random.default_rng(5)
    spec = _specs_of("color_attr")[0]  # five constraints: four besides no_extra
    drawn, _ = _one_fault(spec)  # object1 in the wrong colour: 3 of the 4 others hold
    scenes = [w.sample_scene(spec, rng), w.sample_scene(drawn, rng)]
    scenes += [_with_extra(s, w.SHAPES[0], w.COLORS[0]) for s in scenes]
    assert None not in scenes
    images = torch.from_numpy(np.stack([w.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    caps = [w.caption_of(spec)] * 4
    gated = build_reward("shapes_partial", extra_object_factor=0.25)(images, caps)
    assert gated.tolist() == pytest.approx([1.0, 3 / 4, 0.25, 0.25 * 3 / 4])
    assert build_reward("shapes_partial")(images, caps).tolist() == pytest.approx([1.0, 4 / 5, 4 / 5, 3 / 5])
    with pytest.raises(ValueError, match=r"lies in \[0, 1\], got 1.5"):
        build_reward("shapes_partial", extra_object_factor=1.5)


def test_a_stated_shape_twice_needs_two_detections() -> None:
    spec = w.parse_caption("a red circle to the left of a blue circle")
    scene = Scene((PlacedObject("circle", "red", 8.5, 16.5, 11),))
    assert _failed(spec, w.render(scene)) == {"object1.present", "object1.color", "relation"}


def test_scoring_is_deterministic() -> None:
    caps, imgs = w.sample_batch(np.random.default_rng(9), 16, split="eval")
    first = [shapes.score(c, im) for c, im in zip(caps, imgs, strict=True)]
    assert first == [shapes.score(c, im) for c, im in zip(caps, imgs, strict=True)]
    assert shapes.evaluate(imgs, caps) == shapes.evaluate(imgs, caps)


def _template_ious(mask: np.ndarray) -> dict[str, float]:
    """IoU of a mask with each template drawn to its box, computed here rather than by the checker."""
    h, wd = mask.shape
    return {s: float((mask & w.shape_mask(s, wd, h)).sum() / (mask | w.shape_mask(s, wd, h)).sum()) for s in w.SHAPES}


def _image_with(mask: np.ndarray, color: tuple[int, int, int] = w.PALETTE["red"], at: int = 4) -> np.ndarray:
    img = np.full((w.IMAGE_SIZE, w.IMAGE_SIZE, 3), w.BACKGROUND, np.uint8)
    img[at : at + mask.shape[0], at : at + mask.shape[1]][mask] = color
    return img


def test_hull_area_of_pixel_squares() -> None:
    ell = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 1]], bool)  # hull (0,0) (1,0) (3,2) (3,3) (0,3): area 7
    diagonal = np.eye(2, dtype=bool)  # a 2x2 square less two half-pixel corners
    assert shapes._hull_area(ell) == 7.0 and shapes._hull_area(diagonal) == 3.0
    assert shapes._hull_area(np.ones((4, 7), bool)) == 28.0 and shapes._hull_area(np.ones((1, 1), bool)) == 1.0


def test_checker_v3_calls_unclear_shapes_unknown_where_v2_guesses() -> None:
    ys, xs = np.mgrid[0:11, 0:11] + 0.5
    rounded = (xs - np.clip(xs, 4, 7)) ** 2 + (ys - np.clip(ys, 4, 7)) ** 2 <= 16  # an 11 px square, corners r 4
    ring = w.shape_mask("circle", 13) & ~np.pad(w.shape_mask("circle", 7), 3)  # a circle's 3 px outline
    rectangle = np.ones((9, 12), bool)
    # Why each is unclear, measured here: circle and square templates tie; the box is elongated; the ring matches
    # the circle template well and clearly, but is hollow: its hull is the full disc's, at least the disc's area.
    tie = sorted(_template_ious(rounded).values())
    assert tie[-1] - tie[-2] < shapes.CHECKERS[3].min_margin
    assert 12 / 9 > shapes.CHECKERS[3].max_aspect
    ring_ious = sorted(_template_ious(ring).values())
    assert ring_ious[-1] >= shapes.CHECKERS[3].min_iou and ring_ious[-1] - ring_ious[-2] > 0.1
    assert ring.sum() / w.shape_mask("circle", 13).sum() < shapes.CHECKERS[3].min_solidity
    for mask, v2_says in ((rounded, "square"), (rectangle, "square"), (ring, "circle")):
        (old,), (new,) = (shapes.detect(_image_with(mask), v) for v in (2, 3))
        assert (old.shape, new.shape) == (v2_says, "unknown")


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    k = np.exp(-(np.arange(-3, 4) ** 2) / (2 * sigma**2))
    out = img.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(3, 3) if a == axis else (0, 0) for a in range(3)], mode="edge")
        out = sum(k[i] / k.sum() * np.take(padded, range(i, i + img.shape[axis]), axis=axis) for i in range(7))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_checker_v3_counts_off_palette_blobs_but_not_blurred_edges_as_objects() -> None:
    rng = np.random.default_rng(8)
    tried = 0
    for i, caption in enumerate(w.eval_captions()[::9]):
        spec = w.parse_caption(caption)
        scene = w.sample_scene(spec, rng)
        bigger = _with_extra(scene, "square", "red", size=5)
        if bigger is None:
            continue
        tried += 1
        img = w.render(scene)
        ink = [(0, 0, 0), (128, 128, 128), (240, 120, 10)][i % 3]  # black, grey, orange
        img[(w.render(bigger) != img).any(-1)] = ink
        # and with mild noise, which turns some orange pixels "yellow" and some grey ones "purple": specks, not objects
        noisy = np.clip(img / 255 + rng.normal(0, 0.04, img.shape), 0, 1)
        for image in (img, noisy):
            assert _failed(spec, image, 2) == set()  # v2 sees nothing of another colour
            assert _failed(spec, image, 3) == {"no_extra"}, caption
            assert [d.color for d in shapes.detect(image, 3)].count("unknown") == 1
        # a blur's halo is ink of no palette colour too, but it touches its object
        assert all(d.color != "unknown" for d in shapes.detect(_gaussian_blur(w.render(scene), 1.0), 3))
    assert tried >= 15


def test_checker_v3_solidity_ignores_pinholes_but_not_concavity() -> None:
    square = np.ones((13, 13), bool)
    ys, xs = np.mgrid[0:13, 0:13]
    square[(ys % 2 == 1) & (xs % 3 > 0) & (ys < 12) & (xs < 12)] = False  # 48 two-pixel holes, as noise leaves them
    ell = np.zeros((11, 11), bool)
    ell[:, :4] = ell[-4:, :] = True  # an L with arms 4 of 11 wide
    # the L's hull cuts its notch diagonally: the box less a right triangle of legs 7
    assert ell.sum() / (121 - 7 * 7 / 2) < shapes.CHECKERS[3].min_solidity
    assert [d.shape for d in shapes.detect(_image_with(ell), 3)] == ["unknown"]
    # the holes would fail solidity as concavity (the square's hull is its box), and the square template still fits
    assert square.sum() / 169 < shapes.CHECKERS[3].min_solidity and _template_ious(square)["square"] >= 0.7
    assert [d.shape for d in shapes.detect(_image_with(square), 3)] == ["square"]
    assert shapes._pinholes(square) == 169 - square.sum() and shapes._pinholes(ell) == 0


def test_unknown_checker_versions_are_refused_with_the_versions() -> None:
    blank = np.full((w.IMAGE_SIZE, w.IMAGE_SIZE, 3), w.BACKGROUND, np.uint8)
    for bad in (1, 4, True, "3"):
        with pytest.raises(ValueError, match="unknown checker version .*use one of 2, 3"):
            shapes.detect(blank, bad)
    with pytest.raises(ValueError, match="unknown checker version 4"):
        build_reward("shapes_strict", checker=4)
    with pytest.raises(ValueError, match="unknown checker version 4"):
        shapes.evaluate(blank[None], ["a circle"], checker=4)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((16, 16, 3), np.uint8), r"expected one image .* uint8 \[32,32,3\].*got shape \(16, 16, 3\)"),
        (np.zeros((32, 32), np.uint8), r"got shape \(32, 32\)"),
        (np.zeros((32, 32, 3), np.int64), "got dtype int64"),
        (np.full((32, 32, 3), 2.0), r"in \[0, 1\], got values in \[2, 2\]"),
        (np.full((3, 32, 32), -1.0), r"got values in \[-1, -1\].*\(x \+ 1\) / 2"),
        (np.full((32, 32, 3), np.nan), "got values in"),
    ],
)
def test_bad_images_are_rejected_with_what_was_expected(image: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shapes.detect(image)


def test_bad_captions_are_rejected_with_the_accepted_forms() -> None:
    with pytest.raises(ValueError, match="Accepted caption forms"):
        shapes.score("a photo of a dog", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="Accepted caption forms"):
        shapes.score(CaptionSpec("counting", (ObjectSpec("circle"),), count=9), np.zeros((32, 32, 3), np.uint8))


# ---------------------------------------------------------------------------------------------- reward edge


def _batch(n: int, split: str = "train", seed: int = 0) -> tuple[list[str], torch.Tensor]:
    caps, imgs = w.sample_batch(np.random.default_rng(seed), n, split=split)
    return caps, torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255


def test_rewards_are_registered_and_score_renders_fully() -> None:
    assert "shapes_strict" in REWARDS and "shapes_partial" in REWARDS
    caps, images = _batch(12)
    for name in ("shapes_strict", "shapes_partial"):
        out = build_reward(name)(images, caps, extra_column=[0] * 12)
        assert out.dtype == torch.float32 and out.shape == (12,)
        assert torch.equal(out, torch.ones(12))


def test_rewards_on_wrong_captions() -> None:
    caps, images = _batch(6, seed=1)
    blank = torch.ones_like(images)  # white is the background
    strict = build_reward("shapes_strict")(blank, caps)
    partial = build_reward("shapes_partial")(blank, caps)
    assert torch.equal(strict, torch.zeros(6))
    assert ((partial > 0) & (partial < 1)).all()  # no_extra holds on a blank image
    swapped = caps[1:] + caps[:1]
    assert build_reward("shapes_partial")(images, swapped).mean() < 1


def test_reward_rejects_bad_input() -> None:
    caps, images = _batch(2)
    reward = build_reward("shapes_strict")
    with pytest.raises(ValueError, match=r"expected 32x32 images.*got 64x64"):
        reward(torch.zeros(2, 3, 64, 64), caps)
    with pytest.raises(ValueError, match=r"expected images in \[0, 1\]"):
        reward(images * 2 - 1, caps)
    with pytest.raises(ValueError, match="got 2 images for 1 prompts"):
        reward(images, caps[:1])
    with pytest.raises(ValueError, match="takes only"):
        build_reward("shapes_partial", threshold=0.5)


def test_evaluate_reports_overall_and_per_category_means() -> None:
    caps, images = _batch(60, split="eval", seed=2)
    report = shapes.evaluate(images, caps)
    assert report["strict"] == 1.0 and report["partial"] == 1.0 and report["n"] == 60
    assert report["checker"] == shapes.DEFAULT_CHECKER and shapes.evaluate(images, caps, 3)["checker"] == 3
    present = {w.parse_caption(c).category for c in caps}
    for cat in present:
        assert report[f"{cat}/strict"] == 1.0 and report[f"{cat}/partial"] == 1.0
    assert sum(report[f"{c}/n"] for c in present) == 60

    # half the images blank: the overall mean is the mean of the category means
    arr = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy().copy()
    arr[::2] = w.BACKGROUND
    report = shapes.evaluate(arr, caps)
    cats = [c for c in w.CATEGORIES if c in present]
    assert report["strict"] == pytest.approx(np.mean([report[f"{c}/strict"] for c in cats]))
    assert 0 < report["strict"] < 1
    assert report["strict_se"] > 0

    # standard errors, recomputed from the per-image reward (another path to the same scores) and the binomial
    # variance p(1-p) n/(n-1) of 0/1 outcomes; the overall one is that of a mean of category means
    strict = build_reward("shapes_strict")(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255, caps).numpy()
    cat_of = [w.parse_caption(c).category for c in caps]
    variances = []  # of each category mean, from the independent scores
    for cat in cats:
        vals = [float(v) for v, c in zip(strict, cat_of, strict=True) if c == cat]
        n, p = len(vals), float(np.mean(vals))
        variances.append(p * (1 - p) / (n - 1))
        assert report[f"{cat}/strict"] == pytest.approx(p)
        assert report[f"{cat}/strict_se"] == pytest.approx(np.sqrt(variances[-1]))
    assert report["strict_se"] == pytest.approx(np.sqrt(sum(variances)) / len(cats))
    # every render met every constraint: no sample spread, so each category's error is the pseudo-count one,
    # sqrt(p(1-p)/(n+1)) with p = (n + 1/2)/(n + 1), not a claim of certainty
    report = shapes.evaluate(images, caps)
    floors = []
    for cat in cats:
        n = report[f"{cat}/n"]
        p = (n + 0.5) / (n + 1)
        floors.append(p * (1 - p) / (n + 1))
        assert report[f"{cat}/strict_se"] == report[f"{cat}/partial_se"] == pytest.approx(np.sqrt(floors[-1]))
    assert report["partial_se"] == pytest.approx(np.sqrt(sum(floors)) / len(cats)) and 0 < report["partial_se"] < 0.05
    single = shapes.evaluate(arr[:1], caps[:1])  # one blank image: a failure known with little certainty
    assert single["strict"] == 0.0 and single["strict_se"] == pytest.approx(np.sqrt(0.25 * 0.75 / 2))
    with pytest.raises(ValueError, match="pass one caption per image"):
        shapes.evaluate(arr, caps[:-1])


def test_a_config_reward_with_options_reaches_the_reward_and_names_that_variant() -> None:
    """The config form reaches the option, and the run's header names it (plain partial would look the same)."""
    from flowalign.api import build_reward as build_config_reward

    caps, images = _batch(8, seed=6)
    images[:4] = 1.0  # blank: 0 gated (nothing else met), 1/len(constraints) plain
    spec = {"name": "shapes_partial", "kwargs": {"extra_object_factor": 0.5}}
    for form in (spec, [{**spec, "weight": 1.0}]):
        fn, name = build_config_reward(form)
        assert name == "shapes_partial(extra_object_factor=0.5)"
        out = fn(images, caps)
        total = out.total if hasattr(out, "total") else out
        assert torch.allclose(total, build_reward("shapes_partial", extra_object_factor=0.5)(images, caps))
        assert not torch.allclose(total, build_reward("shapes_partial")(images, caps))


def test_a_runs_checker_version_reaches_its_shapes_rewards_unless_they_name_one() -> None:
    from flowalign.api import build_reward as build_config_reward
    from flowalign.api import with_checker

    caps, images = _batch(8, seed=6)
    ys, xs = np.mgrid[0:11, 0:11] + 0.5
    rounded = (xs - np.clip(xs, 4, 7)) ** 2 + (ys - np.clip(ys, 4, 7)) ** 2 <= 16  # square in v2, unknown in v3
    images[0] = torch.from_numpy(_image_with(rounded)).permute(2, 0, 1).float() / 255
    caps[0] = "a square"
    v2, v3 = (build_reward("shapes_strict", checker=v)(images, caps) for v in (2, 3))
    assert v2[0] == 1.0 and v3[0] == 0.0
    assert with_checker("shapes_strict", 2) == "shapes_strict"  # the default leaves the plain name
    for spec in ("shapes_strict", {"name": "shapes_strict"}, [{"name": "shapes_strict", "weight": 1.0}]):
        fn, name = build_config_reward(with_checker(spec, 3))
        assert name == "shapes_strict(checker=3)"
        out = fn(images, caps)
        assert torch.equal(out.total if hasattr(out, "total") else out, v3)
    kept = with_checker([{"name": "shapes_strict", "kwargs": {"checker": 2}}, {"name": "brightness"}], 3)
    assert kept == [{"name": "shapes_strict", "kwargs": {"checker": 2}}, {"name": "brightness"}]
