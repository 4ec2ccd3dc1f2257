"""The README's main job (`flowalign train shapes`) end to end, and a short alignment that must help."""

import json
import os
import subprocess
import sys

import pytest


def test_main_job_runs_end_to_end_and_reports(tmp_path):
    """A few steps of the exact preset the README runs, through the installed CLI entry point's module."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = "train shapes --max-steps 2 --output-dir out --num-eval-prompts 24 --grid-prompts 6 --no-progress".split()
    res = subprocess.run(
        [sys.executable, "-m", "flowalign.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
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


SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_short_alignment_raises_held_out_partial_accuracy(tmp_path):
    """Three seeds of a focused run, each seed's gain larger than the seed-to-seed spread of the final accuracy.

    The run focuses on one category (the four two-object training captions, at the preset's learning rate) and is
    scored on that category's held-out captions, the shape orders it never trains on, with 200 images (5 per entry,
    each its own noise; the standard error of a partial mean is then ~2 points). The three seeds run side by side
    through the CLI at one thread each. The spread is the range of the three final accuracies: with two seeds (this
    test until the seventeenth session) it was one difference, itself as noisy as a gain. Spread over all 530
    training captions, 120 steps stay within noise (docs/EXPERIMENTS.md). Measured on base v3 with these arguments
    (thirty-second session): partial 68.5% -> 89.3% / 89.8% / 90.7% (+20.8 / +21.3 / +22.2, spread 1.3), strict
    23.0% -> 68.0% / 69.5% / 72.0% (bench/results/v3_slow_test_lr5e4.json). Until then it ran 480 steps, where seed 2
    had fallen back to 85.2% (spread 5.8); at half this rate, which base v2 needed, base v3 passed by one point.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = (
        "train shapes --prompts shapes:train/two_object --eval-prompts shapes:eval/two_object --num-eval-prompts 200"
        " --learning-rate 5e-4 --max-steps 360 --eval-every 120 --save-every 0 --grid-prompts 0 --no-progress"
    ).split()
    runs = []
    try:
        for seed in SEEDS:
            with (tmp_path / f"s{seed}.log").open("w") as log:  # a file, not a pipe: a full pipe would stall a run
                cmd = [sys.executable, "-m", "flowalign.cli", *args, "--seed", str(seed)]
                cmd += ["--output-dir", str(tmp_path / f"s{seed}")]
                runs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for seed, run in zip(SEEDS, runs, strict=True):
            assert run.wait(timeout=3 * 3600) == 0, (tmp_path / f"s{seed}.log").read_text()[-3000:]
    finally:
        for run in runs:  # a failed or timed-out seed must not leave the others running for an hour
            run.kill()
    summaries = [json.loads((tmp_path / f"s{seed}" / "summary.json").read_text()) for seed in SEEDS]
    gains = [s["final"]["eval/partial"] - s["base"]["eval/partial"] for s in summaries]
    finals = [s["final"]["eval/partial"] for s in summaries]
    spread = max(finals) - min(finals)
    assert min(gains) > max(spread, 0.03), (gains, finals)
