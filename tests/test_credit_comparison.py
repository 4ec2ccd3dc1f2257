"""bench/credit_comparison.py compares arms at equal cost: accuracy interpolated at the budget every run reached."""

import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).parents[1] / "bench" / "credit_comparison.py"
_spec = importlib.util.spec_from_file_location("credit_comparison", _path)
credit_comparison = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(credit_comparison)


def _run(points):
    return {
        "curve": [
            {"reward_calls": x, "seconds": x / 10, "step": x / 5, "strict": y, "partial": 2 * y} for x, y in points
        ]
    }


def test_arms_are_compared_at_the_budget_every_run_reached():
    report = {
        "arms": {
            "cheap": {"runs": [_run([(0, 0.0), (10, 0.2), (20, 0.4)]), _run([(0, 0.0), (40, 0.4)])]},
            "dear": {"runs": [_run([(0, 0.1), (30, 0.4)])]},
        }
    }
    out = credit_comparison.at_equal_budget(report)
    calls = out["reward_calls"]
    assert calls["budget"] == 20  # the shortest run's last point
    # cheap: 0.4 at 20 calls, and 0.2 halfway along the second seed's 0 -> 0.4 segment; dear: 0.1 + 0.3 * 20/30
    cheap = calls["cheap"]["strict"]
    assert (cheap["mean"], cheap["min"], cheap["max"]) == pytest.approx((0.3, 0.2, 0.4))
    assert calls["dear"]["strict"]["mean"] == pytest.approx(0.3)
    assert calls["dear"]["partial"]["mean"] == pytest.approx(0.6)
    assert out["seconds"]["budget"] == pytest.approx(2.0) and out["step"]["budget"] == pytest.approx(4.0)
    assert out["step"]["dear"]["strict"]["mean"] == pytest.approx(0.3)
