"""bench/base_failures.py grades the main job's own evaluation draw, so its per-constraint counts pair with it."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from flowalign import world
from flowalign.api import build_trainer
from flowalign.config import load_config
from rewards import shapes

BENCH = Path(__file__).parents[1] / "bench"


@pytest.fixture(scope="module")
def base_failures():
    sys.path.insert(0, str(BENCH))  # the script imports its bench/ neighbours as a script would
    try:
        import base_failures

        yield base_failures
    finally:
        sys.path.remove(str(BENCH))


def test_constraint_counts_reproduce_the_main_jobs_per_category_accuracy(base_failures, tmp_path):
    # Every caption of a category has the same constraints, so a category's partial accuracy (the mean fraction met)
    # is 1 - failed/total summed over its constraints: the counts must give the trainer's step-0 evaluation exactly.
    report = base_failures.failures(seed=1234, eval_sampler="renoise")
    cfg = load_config("shapes", {"eval_seed": 1234, "output_dir": str(tmp_path)})
    metrics = build_trainer(cfg).evaluate()
    per_cat: dict[str, list[int]] = {}
    for key, (failed, total) in report["constraint_failed_of_total"].items():
        acc = per_cat.setdefault(key.split("/")[0], [0, 0])
        acc[0], acc[1] = acc[0] + failed, acc[1] + total
    assert report["captions"] == metrics["eval/n"] == 240
    assert len(per_cat) == 6
    for cat, (failed, total) in per_cat.items():
        assert 1 - failed / total == pytest.approx(metrics[f"eval/{cat}/partial"], abs=1e-9), cat
        assert report["strict_passed"].get(cat, 0) / world.EVAL_PER_CATEGORY == pytest.approx(
            metrics[f"eval/{cat}/strict"], abs=1e-9
        ), cat


def test_binding_tells_swapped_colours_from_right_and_missing_objects(base_failures):
    rng = np.random.default_rng(0)
    applied = 0
    for caption in world.eval_captions():
        spec = world.parse_caption(caption)
        scene = world.sample_scene(spec, rng)
        graded = shapes.score(spec, world.render(scene))
        if base_failures.binding(spec, graded.detections) is None:
            continue
        # the caption's render binds; the same scene with the two colours exchanged is swapped (and fails the
        # checker); with one object left out it is neither
        a, b = scene.objects
        swapped = shapes.score(
            spec,
            world.render(world.Scene((dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)))),
        )
        one = shapes.score(spec, world.render(world.Scene((a,))))
        results = {
            kind: base_failures.binding(spec, g.detections)
            for kind, g in (("bound", graded), ("swapped", swapped), ("other", one))
        }
        assert results == {"bound": "bound", "swapped": "swapped", "other": "other"}, caption
        assert graded.strict == 1.0 and swapped.strict == 0.0
        applied += 1
    assert applied >= 60  # most of the 80 held-out position and colour attribution entries name two pairs


def test_train_twins_are_training_captions_told_apart_only_by_word_order(base_failures):
    twins = base_failures.train_twins()
    train = set(world.train_captions())
    assert len(twins) >= 50 and len(set(twins)) == len(twins) and set(twins) <= train
    for caption in twins:
        spec = world.parse_caption(caption)
        twin = world.caption_of(base_failures.exchanged(spec))
        assert twin in twins and twin != caption
        assert sorted(twin.split()) == sorted(caption.split())  # the same words in another order
        a, b = spec.objects
        assert world.parse_caption(twin).objects == (
            dataclasses.replace(a, color=b.color),
            dataclasses.replace(b, color=a.color),
        )
    # and none is missed: exchanging the two colour words of any other training caption that names two different
    # colours on two different shapes gives a caption outside the training set (counted here from the words alone)
    colors, shapes_ = set(world.COLORS), set(world.SHAPES)
    for caption in train - set(twins):
        words = caption.split()
        named = [(i, w) for i, w in enumerate(words) if w in colors]
        shown = [w for w in words if w in shapes_]
        if len(named) != 2 or named[0][1] == named[1][1] or len(shown) != 2 or shown[0] == shown[1]:
            continue
        (i, c1), (j, c2) = named
        words[i], words[j] = c2, c1
        assert " ".join(words) not in train, caption
