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


def _failed(spec: CaptionSpec, image: np.ndarray) -> set[str]:
    return {k for k, ok in shapes.score(spec, image).constraints.items() if not ok}


@pytest.mark.parametrize("category", w.CATEGORIES)
def test_ground_truth_renders_score_fully(category: str) -> None:
    rng = np.random.default_rng(11)
    specs = _specs_of(category)
    for i in range(300):
        spec = specs[i % len(specs)]
        result = shapes.score(spec, w.render(w.sample_scene(spec, rng)))
        assert list(result.constraints) == CONSTRAINTS[category]
        assert result.strict == 1.0 and result.partial == 1.0, (w.caption_of(spec), result)


def test_detections_recover_the_scene_exactly() -> None:
    rng = np.random.default_rng(5)
    for caption in w.all_captions()[::7]:
        scene = w.sample_scene(w.parse_caption(caption), rng)
        want = sorted((o.shape, o.color, o.cx, o.cy, o.size) for o in scene.objects)
        # detect() and the grade's own record of what it saw
        for found in (shapes.detect(w.render(scene)), shapes.score(caption, w.render(scene)).detections):
            assert sorted((d.shape, d.color, d.cx, d.cy, d.box[2] - d.box[0]) for d in found) == want


def test_float_layouts_and_mild_noise_score_like_the_uint8_render() -> None:
    rng = np.random.default_rng(2)
    for caption in w.eval_captions()[::10]:
        img = w.render(w.sample_scene(w.parse_caption(caption), rng))
        hwc = img.astype(np.float32) / 255
        assert shapes.score(caption, hwc).strict == 1.0
        assert shapes.score(caption, hwc.transpose(2, 0, 1)).strict == 1.0
        noisy = np.clip(hwc + rng.normal(0, 0.04, hwc.shape), 0, 1)  # ~10 grey levels of sensor-like noise
        assert shapes.score(caption, noisy).strict == 1.0


def test_blank_and_noise_images_score_zero_strict() -> None:
    rng = np.random.default_rng(0)
    blank = np.full((w.IMAGE_SIZE, w.IMAGE_SIZE, 3), w.BACKGROUND, dtype=np.uint8)
    assert shapes.detect(blank) == []
    for caption in w.all_captions()[::5]:
        assert shapes.score(caption, blank).strict == 0.0
        noise = rng.integers(0, 256, (w.IMAGE_SIZE, w.IMAGE_SIZE, 3), dtype=np.uint8)
        assert shapes.score(caption, noise).strict == 0.0
        assert shapes.score(caption, rng.random((3, w.IMAGE_SIZE, w.IMAGE_SIZE))).strict == 0.0


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


@pytest.mark.parametrize("category", w.CATEGORIES)
def test_one_thing_wrong_fails_exactly_that_constraint(category: str) -> None:
    rng = np.random.default_rng(3)
    specs = _specs_of(category)
    for i in range(60):
        spec = specs[(i * 7) % len(specs)]
        drawn, broken = _one_fault(spec)
        assert _failed(spec, w.render(w.sample_scene(drawn, rng))) == {broken}, w.caption_of(spec)


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


@pytest.mark.parametrize("category", w.CATEGORIES)
def test_an_extra_object_fails_exactly_no_extra(category: str) -> None:
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
        assert _failed(spec, w.render(scene)) == {"no_extra"}, w.caption_of(spec)
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
    with pytest.raises(ValueError, match="takes no options"):
        build_reward("shapes_partial", threshold=0.5)


def test_evaluate_reports_overall_and_per_category_means() -> None:
    caps, images = _batch(60, split="eval", seed=2)
    report = shapes.evaluate(images, caps)
    assert report["strict"] == 1.0 and report["partial"] == 1.0 and report["n"] == 60
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
