"""The built-in world: caption grammar, held-out split, scene sampling and rendering."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np
import pytest

from flowalign import world as w
from flowalign.world import CaptionSpec, ObjectSpec, PlacedObject, Scene


def _specs(captions: list[str]) -> list[CaptionSpec]:
    return [w.parse_caption(c) for c in captions]


# ---------------------------------------------------------------------------------------------- grammar


def test_every_caption_round_trips() -> None:
    caps = w.all_captions()
    assert len(caps) == len(set(caps)) == 993  # 3 + 6 + 9 + 15 + 840 + 120
    for c in caps:
        assert w.caption_of(w.parse_caption(c)) == c


def test_category_sizes_and_examples_from_the_brief() -> None:
    counts = Counter(s.category for s in _specs(w.all_captions()))
    assert counts == {
        "single_object": 3,
        "two_object": 6,
        "counting": 9,
        "colors": 15,
        "position": 840,
        "color_attr": 120,
    }
    assert w.parse_caption("a circle") == CaptionSpec("single_object", (ObjectSpec("circle"),))
    assert w.parse_caption("a circle and a square").category == "two_object"
    assert w.parse_caption("three triangles") == CaptionSpec("counting", (ObjectSpec("triangle"),), count=3)
    assert w.parse_caption("a green square") == CaptionSpec("colors", (ObjectSpec("square", "green"),))
    pos = w.parse_caption("a red circle to the left of a blue square")
    assert pos == CaptionSpec(
        "position", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), relation="left of"
    )
    assert w.parse_caption("a red circle to the right of a blue square").relation == "right of"
    assert w.parse_caption("a red circle above a blue square").relation == "above"
    assert w.parse_caption("a red circle below a blue square").relation == "below"
    attr = w.parse_caption("a blue circle and a red triangle")
    assert attr == CaptionSpec("color_attr", (ObjectSpec("circle", "blue"), ObjectSpec("triangle", "red")))


def test_parse_forgives_case_spacing_and_a_final_period() -> None:
    assert w.parse_caption("  A Red  circle above a blue square. ") == w.parse_caption(
        "a red circle above a blue square"
    )


@pytest.mark.parametrize(
    "caption",
    [
        "a dog",
        "",
        "a circle and a circle",  # two_object needs two different shapes
        "a red circle and a red square",  # color_attr needs two different colours
        "a red circle above a red circle",  # position relates two different objects
        "five circles",
        "one circle",
        "a circle to the left of a square",  # position states colours
        "a orange circle",
        "three red triangles",
    ],
)
def test_out_of_grammar_captions_list_the_accepted_forms(caption: str) -> None:
    with pytest.raises(ValueError) as err:
        w.parse_caption(caption)
    msg = str(err.value)
    assert "Accepted caption forms" in msg
    for category in w.CATEGORIES:
        assert f"{category}:" in msg
    for example in ("'a circle'", "'a circle and a square'", "'three triangles'", "'a green square'"):
        assert example in msg
    assert "'a red circle to the left of a blue square'" in msg and "'a blue circle and a red triangle'" in msg


@pytest.mark.parametrize(
    "spec",
    [
        CaptionSpec("nonsense", (ObjectSpec("circle"),)),
        CaptionSpec("single_object", (ObjectSpec("hexagon"),)),
        CaptionSpec("single_object", (ObjectSpec("circle", "red"),)),
        CaptionSpec("counting", (ObjectSpec("circle"),)),
        CaptionSpec("counting", (ObjectSpec("circle"),), count=7),
        CaptionSpec("colors", (ObjectSpec("circle", "red"),), relation="above"),
        CaptionSpec("position", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), relation="near"),
        CaptionSpec("color_attr", (ObjectSpec("circle", "red"),)),
    ],
)
def test_caption_of_rejects_specs_outside_the_grammar(spec: CaptionSpec) -> None:
    with pytest.raises(ValueError, match="Accepted caption forms"):
        w.caption_of(spec)
    with pytest.raises(ValueError, match="Accepted caption forms"):
        w.sample_scene(spec, np.random.default_rng(0))


def test_grammar_words_are_exactly_the_words_of_the_captions() -> None:
    words = w.grammar_words()
    assert words == sorted(set(words))
    assert set(words) == {t for c in w.all_captions() for t in c.split()}
    assert {"circles", "squares", "triangles", "left", "right", "above", "below", "to", "the", "of"} <= set(words)


# ---------------------------------------------------------------------------------------------- split


def test_train_and_eval_are_disjoint_and_cover_the_grammar() -> None:
    train, evals = w.train_captions(), w.eval_captions()
    assert not set(train) & set(evals)
    assert len(train) == len(set(train))
    held = {c for c in w.all_captions() if w.is_held_out(c)}
    assert set(train) == set(w.all_captions()) - held
    assert set(evals) <= held
    assert all(w.is_held_out(c) for c in evals)


def test_eval_is_balanced_over_all_categories_and_deterministic() -> None:
    evals = w.eval_captions()
    assert 100 <= len(evals) <= 300
    counts = Counter(w.parse_caption(c).category for c in evals)
    assert counts == {c: w.EVAL_PER_CATEGORY for c in w.CATEGORIES}
    assert evals == w.eval_captions()
    positions = [w.parse_caption(c) for c in evals if w.parse_caption(c).category == "position"]
    assert {s.relation for s in positions} == set(w.RELATIONS)  # the stride keeps every relation
    # every held-out colour-shape pair is tested by some eval caption
    used = {(o.color, o.shape) for s in positions for o in s.objects}
    attr = [w.parse_caption(c) for c in evals if w.parse_caption(c).category == "color_attr"]
    used |= {(o.color, o.shape) for s in attr for o in s.objects}
    assert set(w.HELD_OUT_PAIRS) <= used


def test_train_eval_list_is_balanced_training_captions_and_follows_its_seed() -> None:
    caps = w.train_eval_captions(0)
    train = set(w.train_captions())
    assert all(c in train for c in caps)
    cats = [w.parse_caption(c).category for c in caps]
    assert Counter(cats) == {c: w.EVAL_PER_CATEGORY for c in w.CATEGORIES}
    assert cats == sorted(cats, key=w.CATEGORIES.index)  # category order, like eval_captions()
    for cat in w.CATEGORIES:  # no caption repeats until its category's distinct captions run out
        got = [c for c in caps if w.parse_caption(c).category == cat]
        n_train = sum(w.parse_caption(c).category == cat for c in train)
        assert len(set(got)) == min(n_train, w.EVAL_PER_CATEGORY)
    assert w.train_eval_captions(0) == caps and w.train_eval_captions(1) != caps
    assert len(w.train_eval_captions(0, per_category=16)) == 16 * len(w.CATEGORIES)


def test_built_in_prompt_sets_resolve_and_unknown_ones_list_the_valid_names() -> None:
    from flowalign.config import load_prompts

    balanced = {c: w.EVAL_PER_CATEGORY for c in w.CATEGORIES}
    for source, held_out in (("shapes:train_eval", False), ("shapes:eval", True)):
        specs = [w.parse_caption(c) for c in load_prompts(source)]
        assert Counter(s.category for s in specs) == balanced
        assert all(w.is_held_out(s) == held_out for s in specs)
    train = load_prompts("shapes:train")
    assert not any(w.is_held_out(c) for c in train) and len(set(train)) == len(train) > len(w.CATEGORIES) * 40
    # A category suffix keeps that category's entries, in order: the lists are in category order, so the per-category
    # sets laid end to end give the whole set back.
    for split in ("train", "eval"):
        parts = [load_prompts(f"shapes:{split}/{cat}") for cat in w.CATEGORIES]
        assert [c for part in parts for c in part] == load_prompts(f"shapes:{split}")
        for part, cat in zip(parts, w.CATEGORIES, strict=True):
            assert {w.parse_caption(c).category for c in part} == {cat}
    assert len(load_prompts("shapes:eval/counting")) == w.EVAL_PER_CATEGORY
    balanced = load_prompts("shapes:train_balanced")  # every category equally often, every caption of it equally
    assert set(balanced) == set(train)
    per_cat = Counter(w.parse_caption(c).category for c in balanced)
    assert len(set(per_cat.values())) == 1 and set(per_cat) == set(w.CATEGORIES)
    for cat in w.CATEGORIES:
        assert len(set(Counter(c for c in balanced if w.parse_caption(c).category == cat).values())) == 1
    for bad in ("shapes:nope", "shapes:eval/colours"):
        with pytest.raises(ValueError, match="shapes:train, shapes:train_balanced, .*single_object"):
            load_prompts(bad)


def test_held_out_pairs_never_occur_in_two_object_training_captions() -> None:
    held = set(w.HELD_OUT_PAIRS)
    for spec in _specs(w.train_captions()):
        if spec.category in ("position", "color_attr"):
            assert not {(o.color, o.shape) for o in spec.objects} & held, w.caption_of(spec)
    for spec in _specs(w.eval_captions()):
        if spec.category in ("position", "color_attr"):
            assert {(o.color, o.shape) for o in spec.objects} & held, w.caption_of(spec)


def test_held_out_pairs_are_still_known_as_single_objects() -> None:
    train = set(w.train_captions())
    for color, shape in w.HELD_OUT_PAIRS:
        assert f"a {color} {shape}" in train


def test_the_held_out_keys_of_the_other_categories_never_occur_in_training() -> None:
    train = _specs(w.train_captions())
    evals = _specs(w.eval_captions())
    for cat, key in [
        ("colors", lambda s: (s.objects[0].color, s.objects[0].shape)),
        ("counting", lambda s: (s.count, s.objects[0].shape)),
        ("two_object", lambda s: (s.objects[0].shape, s.objects[1].shape)),
        ("single_object", lambda s: s.objects[0].shape),
    ]:
        eval_keys = {key(s) for s in evals if s.category == cat}
        train_keys = {key(s) for s in train if s.category == cat}
        assert eval_keys and not eval_keys & train_keys
    # each held-out colour-shape of `colors` is trained inside two-object captions
    two = {(o.color, o.shape) for s in train if s.category in ("position", "color_attr") for o in s.objects}
    assert set(w.HELD_OUT_COLOR_SHAPES) <= two


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", range(5, 16))
@pytest.mark.parametrize("shape", w.SHAPES)
def test_shape_masks_fill_their_box_exactly(shape: str, size: int) -> None:
    m = w.shape_mask(shape, size)
    assert m.shape == (size, size) and m.dtype == bool
    assert m.any(axis=0).all() and m.any(axis=1).all()  # touches all four sides: box centre == (cx, cy)
    assert not m.flags.writeable


def test_shape_masks_have_their_expected_fill_ratios() -> None:
    for size in w.SIZES:
        fill = {s: w.shape_mask(s, size).mean() for s in w.SHAPES}
        assert fill["square"] == 1.0
        assert 0.75 < fill["circle"] < 0.87  # ~pi/4
        assert 0.5 < fill["triangle"] < 0.62  # ~1/2


def test_relation_rule_by_hand() -> None:
    assert w.relation_holds("left of", (5.0, 10.0), (11.0, 10.0))  # dx = 6: just enough
    assert not w.relation_holds("left of", (5.0, 10.0), (10.5, 10.0))  # dx = 5.5 < 6
    assert not w.relation_holds("left of", (5.0, 10.0), (13.0, 18.0))  # |dy| = dx = 8: not dominant
    assert w.relation_holds("right of", (20.0, 10.0), (5.0, 12.0))
    assert w.relation_holds("above", (10.0, 3.0), (12.0, 20.0))  # y grows downward
    assert not w.relation_holds("below", (10.0, 3.0), (12.0, 20.0))
    assert w.relation_holds("below", (12.0, 20.0), (10.0, 3.0))
    with pytest.raises(ValueError, match="relation must be one of"):
        w.relation_holds("near", (0.0, 0.0), (9.0, 0.0))


def _check_scene(spec: CaptionSpec, scene: Scene) -> None:
    objs = scene.objects
    if spec.category == "counting":
        assert len(objs) == spec.count and all(o.shape == spec.objects[0].shape for o in objs)
    else:
        assert len(objs) == len(spec.objects)
        for stated, o in zip(spec.objects, objs, strict=True):
            assert o.shape == stated.shape and stated.color in (None, o.color)
    for o in objs:
        assert o.color in w.PALETTE and o.size in w.SIZES
        x0, y0 = o.cx - o.size / 2, o.cy - o.size / 2
        assert x0 == int(x0) and y0 == int(y0)
        assert w.BORDER <= x0 and x0 + o.size <= w.IMAGE_SIZE - w.BORDER
        assert w.BORDER <= y0 and y0 + o.size <= w.IMAGE_SIZE - w.BORDER
    for a, b in combinations(objs, 2):
        apart_x = abs(a.cx - b.cx) >= (a.size + b.size) / 2 + w.GAP
        apart_y = abs(a.cy - b.cy) >= (a.size + b.size) / 2 + w.GAP
        assert apart_x or apart_y
    if spec.relation is not None:
        assert w.relation_holds(spec.relation, (objs[0].cx, objs[0].cy), (objs[1].cx, objs[1].cy))


@pytest.mark.parametrize("category", w.CATEGORIES)
def test_sampled_scenes_satisfy_their_spec(category: str) -> None:
    rng = np.random.default_rng(7)
    specs = [s for s in _specs(w.all_captions()) if s.category == category]
    for i in range(300):
        spec = specs[i % len(specs)]
        _check_scene(spec, w.sample_scene(spec, rng))


def test_free_colours_and_sizes_vary() -> None:
    rng = np.random.default_rng(0)
    scenes = [w.sample_scene(w.parse_caption("four circles"), rng) for _ in range(200)]
    assert {o.color for s in scenes for o in s.objects} == set(w.PALETTE)
    assert {o.size for s in scenes for o in s.objects} == set(w.SIZES_CROWDED)
    scenes = [w.sample_scene(w.parse_caption("a square"), rng) for _ in range(200)]
    assert {o.size for s in scenes for o in s.objects} == set(w.SIZES)


def test_render_draws_flat_palette_shapes_on_the_background() -> None:
    scene = Scene((PlacedObject("square", "red", 6.5, 6.5, 9), PlacedObject("circle", "blue", 20.5, 20.5, 11)))
    img = w.render(scene)
    assert img.shape == (w.IMAGE_SIZE, w.IMAGE_SIZE, 3) and img.dtype == np.uint8
    assert (img[2:11, 2:11] == w.PALETTE["red"]).all()
    circle = img[15:26, 15:26]
    assert ((circle == w.PALETTE["blue"]).all(-1) == w.shape_mask("circle", 11)).all()
    n_bg = (img == w.BACKGROUND).all(-1).sum()
    assert n_bg == w.IMAGE_SIZE**2 - 81 - w.shape_mask("circle", 11).sum()
    assert set(map(tuple, img.reshape(-1, 3).tolist())) == {w.BACKGROUND, w.PALETTE["red"], w.PALETTE["blue"]}


def test_render_rejects_objects_outside_the_image() -> None:
    with pytest.raises(ValueError, match="leaves the 32x32 image"):
        w.render(Scene((PlacedObject("square", "red", 30.5, 6.5, 9),)))
    with pytest.raises(ValueError, match="unknown color"):
        w.render(Scene((PlacedObject("square", "pink", 6.5, 6.5, 9),)))


# ---------------------------------------------------------------------------------------------- data


def test_sample_batch_is_deterministic_and_shaped() -> None:
    caps_a, imgs_a = w.sample_batch(np.random.default_rng(3), 64)
    caps_b, imgs_b = w.sample_batch(np.random.default_rng(3), 64)
    assert caps_a == caps_b and np.array_equal(imgs_a, imgs_b)
    assert imgs_a.shape == (64, w.IMAGE_SIZE, w.IMAGE_SIZE, 3) and imgs_a.dtype == np.uint8
    caps, imgs = w.sample_batch(np.random.default_rng(3), 0)
    assert caps == [] and imgs.shape == (0, w.IMAGE_SIZE, w.IMAGE_SIZE, 3)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_sample_batch_draws_its_split_balanced_over_categories(split: str) -> None:
    caps, _ = w.sample_batch(np.random.default_rng(0), 1200, split=split)
    allowed = set(w.train_captions()) if split == "train" else {c for c in w.all_captions() if w.is_held_out(c)}
    assert set(caps) <= allowed
    counts = Counter(w.parse_caption(c).category for c in caps)
    assert set(counts) == set(w.CATEGORIES)
    assert all(140 <= n <= 260 for n in counts.values())  # 200 expected each


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="split must be 'train', 'eval' or 'all'"):
        w.sample_pair(np.random.default_rng(0), split="test")
