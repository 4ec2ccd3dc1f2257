"""Comparison grids: every image lands in its own cell, captions stay inside their column, the sidecar says what
the grid shows."""

import json

import pytest
import torch
from PIL import Image, ImageFont

from flowalign.grids import _wrap, comparison_grid


def test_captions_wrap_inside_their_column_and_keep_every_word():
    font = ImageFont.load_default(size=12)
    text = "a red circle to the left of a blue square and an unbreakablewordthatislongerthanthecolumn"
    lines = _wrap(text, font, 100)
    assert " ".join(lines) == text
    for line in lines:
        assert font.getlength(line) <= 100 or " " not in line  # only a single over-long word may overflow
    assert len(lines) > 2


def test_each_image_fills_its_cell_and_the_sidecar_lists_prompts_rows_and_scores(tmp_path):
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])  # one flat colour per image
    base, aligned = (colours[k : k + 2, :, None, None].expand(2, 3, 8, 8) for k in (0, 2))
    rows, prompts = {"base": base, "aligned": aligned}, ["a red circle", "two squares"]
    scores = {"base": [0.5, 1.0], "aligned": [0.25, 0.75]}
    path = comparison_grid(rows, prompts, tmp_path / "g.png", cell=32, scores=scores)
    img = Image.open(path).convert("RGB")
    found = {}
    for name, images in rows.items():
        for j in range(2):
            want = tuple(int(c) for c in (images[j, :, 0, 0] * 255).round())
            hits = [
                (x, y) for x in range(0, img.width, 4) for y in range(0, img.height, 4) if img.getpixel((x, y)) == want
            ]
            assert hits, f"{name} image {j} is missing"
            found[(name, j)] = (min(x for x, _ in hits), min(y for _, y in hits))
    # columns are prompts (same x for a prompt in both rows), rows are rows (same y along a row)
    assert found[("base", 0)][0] == found[("aligned", 0)][0] < found[("base", 1)][0]
    assert found[("base", 0)][1] == found[("base", 1)][1] < found[("aligned", 0)][1]
    assert json.loads(path.with_suffix(".json").read_text()) == {
        "prompts": prompts,
        "rows": list(rows),
        "scores": scores,
    }


def test_a_row_with_the_wrong_number_of_images_is_refused(tmp_path):
    with pytest.raises(ValueError, match="row 'aligned' has 1 images for 2 prompts"):
        comparison_grid(
            {"base": torch.zeros(2, 3, 8, 8), "aligned": torch.zeros(1, 3, 8, 8)}, ["a", "b"], tmp_path / "g"
        )


def test_a_prompt_the_reward_cannot_judge_leaves_the_grid_unscored_with_a_warning(tmp_path, caplog):
    from flowalign.api import write_grid

    class Judge:  # stands in for a trainer whose reward refuses one caption, as the shapes checker does
        def score(self, images, prompts, columns=None):
            raise ValueError("caption 'a cat' is outside the grammar of the built-in world")

    rows = {"base": torch.zeros(2, 3, 8, 8), "aligned": torch.ones(2, 3, 8, 8)}
    path = write_grid(Judge(), rows, ["a red circle", "a cat"], tmp_path / "g.png")
    assert path.exists() and "scores" not in json.loads(path.with_suffix(".json").read_text())
    assert "grid left unscored: caption 'a cat' is outside the grammar" in caplog.text


def test_the_metrics_plot_takes_evaluations_that_changed_prompt_sets_midway(tmp_path):
    """A run resumed with other evaluation prompts (a text file instead of shapes:eval) has evaluations without the
    checker's keys after the resume; the plot shows each metric where it exists."""
    from flowalign.plots import plot_metrics

    rows = [
        {"step": 0, "eval/reward_mean": 0.5, "eval/strict": 0.3, "eval/strict_se": 0.02, "eval/partial": 0.6},
        {"step": 1, "reward/mean": 0.5, "reward/std": 0.1},
        {"step": 2, "reward/mean": 0.6, "reward/std": 0.1, "eval/reward_mean": 0.55},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_metrics(tmp_path)
    assert out.exists() and Image.open(out).size[0] > 0
