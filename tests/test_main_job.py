"""The README's main job (`flowalign train shapes`) end to end, and a short alignment that must help."""

import json
import os
import subprocess
import sys

import pytest

from flowalign.api import train


def test_main_job_runs_end_to_end_and_reports(tmp_path):
    """A few steps of the exact preset the README runs, through the installed CLI entry point's module."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["train", "shapes", "--max-steps", "2", "--output-dir", "out", "--num-eval-prompts", "24",
            "--grid-prompts", "6", "--no-progress"]
    res = subprocess.run([sys.executable, "-m", "flowalign.cli", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out evaluation" in res.stdout and "position/strict" in res.stdout
    out = tmp_path / "out"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval/strict", "eval/partial", "eval/counting/strict", "eval/color_attr/partial"):
        assert 0.0 <= summary["base"][key] <= 1.0 and 0.0 <= summary["final"][key] <= 1.0
    assert (out / "grid.png").stat().st_size > 1000
    assert len(json.loads((out / "grid.json").read_text())["prompts"]) == 6


@pytest.mark.slow
def test_short_alignment_raises_held_out_partial_accuracy(tmp_path):
    """Two seeds of a short run, each seed's gain larger than the seed-to-seed spread of the final accuracy.

    The run focuses on one category (the four two-object training captions) and is scored on that category's
    held-out captions, the shape orders it never trains on, with 200 images (5 per entry, each its own noise; the
    standard error of a partial mean is then ~2 points). Spread over all 530 training captions, the same 120 steps
    stay within noise (README "Figures"): the budget buys ~1,900 samples per caption here, ~15 there. Measured:
    56.8% -> 61.8% / 63.3% on 2 threads (45 min while other runs shared the machine), 66.8% / 67.8% in the same
    runs at one thread each (float differences make a rerun at another thread count effectively another seed). The
    same two seeds run side by side in one process pool at one thread each gained 5.0 and 14.8 points (61.8% /
    71.7%, 22 min) and so failed the spread criterion although both gained: with two seeds the spread is itself noisy.
    """
    gains, finals = [], []
    for seed in (0, 1):
        s = train(
            "shapes",
            prompts="shapes:train/two_object",
            eval_prompts="shapes:eval/two_object",
            num_eval_prompts=200,
            max_steps=120,
            eval_every=0,
            save_every=0,
            grid_prompts=0,
            seed=seed,
            output_dir=str(tmp_path / f"s{seed}"),
            progress=False,
        )
        gains.append(s.final["eval/partial"] - s.base["eval/partial"])
        finals.append(s.final["eval/partial"])
    spread = abs(finals[0] - finals[1])
    assert min(gains) > max(spread, 0.03), (gains, finals)
