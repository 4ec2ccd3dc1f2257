"""flowalign.bench's summary of finished runs."""

from __future__ import annotations

import json

import pytest

from flowalign.bench import report_from_runs


def _run(path, seed: int, checker: int, strict: tuple[float, float]) -> str:
    path.mkdir()
    (path / "config.yaml").write_text(f"model: shapes\nseed: {seed}\nchecker: {checker}\n")
    lines = [
        {"step": 0, "eval/strict": strict[0], "eval/checker": checker},
        {"step": 1, "cost/reward_calls": 64, "time/train": 2.0},
        {"step": 2, "cost/reward_calls": 64, "time/train": 2.0, "eval/strict": strict[1], "eval/checker": checker},
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_runs_are_summarised_over_seeds_and_only_within_one_checker_version(tmp_path) -> None:
    a, b = _run(tmp_path / "a", 0, 3, (0.2, 0.3)), _run(tmp_path / "b", 1, 3, (0.2, 0.4))
    report = report_from_runs([a, b])
    assert report["final"]["strict"] == pytest.approx({"mean": 0.35, "std": 0.05})
    assert (
        report["initial_mean"]["strict"] == pytest.approx(0.2)
        and report["runs"][1]["curve"][-1]["reward_calls"] == 128
    )
    old = _run(tmp_path / "old", 2, 2, (0.3, 0.35))
    with pytest.raises(ValueError, match=r"different shapes checker versions: .*a v3, .*old v2.*--checker N"):
        report_from_runs([a, old])
    # one run whose log changed version part-way (resumed under another checker before that was refused)
    mixed = tmp_path / "mixed"
    _run(mixed, 3, 3, (0.2, 0.3))
    lines = (mixed / "metrics.jsonl").read_text().replace('"eval/checker": 3}', '"eval/checker": 2}', 1)
    (mixed / "metrics.jsonl").write_text(lines)
    with pytest.raises(ValueError, match=r"mixed v2/v3"):
        report_from_runs([a, str(mixed)])
