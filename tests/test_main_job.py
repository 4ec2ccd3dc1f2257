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
    """Two seeds of a short run: each seed's gain must exceed the seed-to-seed spread of the final accuracy."""
    gains, finals = [], []
    for seed in (0, 1):
        s = train("shapes", max_steps=12, seed=seed, output_dir=str(tmp_path / f"s{seed}"), num_eval_prompts=96,
                  eval_every=0, grid_prompts=0, progress=False)
        gains.append(s.final["eval/partial"] - s.base["eval/partial"])
        finals.append(s.final["eval/partial"])
    spread = abs(finals[0] - finals[1])
    assert min(gains) > spread, (gains, finals)
