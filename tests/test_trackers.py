"""Experiment trackers (`log_with`): every metrics.jsonl record reaches them, and a missing one is one clear error."""

import json
import subprocess
import sys

import pytest

from flowalign.config import make_config
from flowalign.testing import tiny_trainer
from flowalign.trainer import check_trackers

PROMPTS = ["a red circle", "a blue square"]


def test_tensorboard_receives_every_logged_metric_at_its_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_trainer(tmp_path, PROMPTS, log_with=("tensorboard",), max_steps=1).train(progress=False)  # overwritten
    trainer = tiny_trainer(tmp_path, PROMPTS, log_with=("tensorboard",), max_steps=3, eval_every=2)
    trainer.train(progress=False, overwrite=True)
    # resumed from step 2 of the 3 it ran: step 3 is logged again, and TensorBoard, like metrics.jsonl, keeps one
    resumed = tiny_trainer(tmp_path, PROMPTS, log_with=("tensorboard",), max_steps=3, eval_every=2)
    resumed.train(resume=tmp_path / "checkpoints" / "step_000002", progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    events = EventAccumulator(str(tmp_path / "flowalign"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    assert all(len({e.step for e in s}) == len(s) for s in scalars.values())  # no step twice
    logged = {tag: {e.step: e.value for e in s} for tag, s in scalars.items()}
    expected = {(k, r["step"]): v for r in records for k, v in r.items() if k != "step"}
    assert {"eval/reward_mean", "reward/mean", "time/sample"} <= {k for k, _ in expected}
    assert {(k, s) for k, steps in logged.items() for s in steps} == set(expected)  # every record, nothing else
    for (key, step), value in expected.items():
        assert logged[key][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)
    # the steps evaluated are the ones the log says: 0 (base), 2 (eval_every), 3 (last)
    assert sorted(logged["eval/reward_mean"]) == [0, 2, 3]
    assert not resumed.accelerator.trackers  # finished, so a second train() starts its own


def test_unknown_and_missing_trackers_are_named_before_anything_loads(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'.*tensorboard"):
        make_config({"log_with": "tensorbord"})
    assert make_config({"log_with": "tensorboard,wandb"}).log_with == ("tensorboard", "wandb")
    assert make_config({"log_with": ""}).log_with == ()

    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ValueError, match="wandb not installed here; pip install wandb"):
        check_trackers(["wandb"])
    trainer = tiny_trainer(tmp_path, PROMPTS, log_with=("wandb",))
    with pytest.raises(ValueError, match="pip install wandb"):
        trainer.train(progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the first evaluation

    # the CLI refuses before the model loads, with the same message and no traceback
    env_code = (
        "import accelerate.utils, sys; accelerate.utils.is_comet_ml_available = lambda: False;"
        "from flowalign.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", env_code, "train", "shapes", "--log-with", "comet_ml", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "pip install comet-ml" in res.stderr and "Traceback" not in res.stderr
