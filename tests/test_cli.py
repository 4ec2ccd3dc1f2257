"""The CLI through a subprocess, as a user runs it, on a tiny pipeline saved to disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flowalign.testing import tiny_sd3_pipeline


def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "flowalign.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _tiny_setup(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_sd3_pipeline(seed=0).save_pretrained(model_dir)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    cfg = {
        "model": str(model_dir),
        "prompts": "prompts.txt",
        "eval_prompts": "prompts.txt",
        "reward": "brightness",
        "num_steps": 3,
        "eval_num_steps": 3,
        "prompts_per_step": 2,
        "group_size": 2,
        "train_batch_size": 4,
        "lora_rank": 2,
        "max_steps": 5,
        "max_sequence_length": 8,
        "guidance_scale": 1.0,
        "device": "cpu",
        "grid_prompts": 2,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))


def test_cli_train_then_sample(tmp_path):
    _tiny_setup(tmp_path)
    res = _run(["train", "cfg.yaml", "--max-steps", "2", "--output-dir", "out", "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "B = 2 prompts x 2 per group = 4" in res.stdout
    out = tmp_path / "out"
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "checkpoints" / "latest").read_text() == "step_000002"
    assert (out / "grid.png").exists() and json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "metrics.png").stat().st_size > 1000
    seed = str(yaml.safe_load((out / "config.yaml").read_text())["eval_seed"])
    res = _run(
        ["sample", "--checkpoint", "out", "--prompts", "prompts.txt", "--seed", seed, "--out", "samples"], tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "samples" / "grid.png").exists()

    # --compare in a new process: the run's base model above its aligned weights, from the same noise. At the eval
    # seed on the eval prompts it must reproduce the grid training wrote at its end, scores included, and its
    # aligned row must be what plain sampling of the checkpoint draws.
    res = _run(
        ["sample", "--checkpoint", "out", "--compare", "--prompts", "prompts.txt", "--seed", seed, "--out", "cmp"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    run_grid, cmp_grid = (json.loads((d / "grid.json").read_text()) for d in (out, tmp_path / "cmp"))
    assert cmp_grid["rows"] == run_grid["rows"] == ["base", "aligned"]
    assert cmp_grid["prompts"] == run_grid["prompts"] == ["a red circle", "a blue square"]
    for row in ("base", "aligned"):
        assert cmp_grid["scores"][row] == pytest.approx(run_grid["scores"][row], abs=1e-6)
    assert cmp_grid["scores"]["base"] != pytest.approx(cmp_grid["scores"]["aligned"], abs=1e-6)  # two policies
    for j in range(2):
        aligned = np.asarray(Image.open(tmp_path / "cmp" / f"{j:03d}_seed{seed}_aligned.png"))
        assert np.array_equal(aligned, np.asarray(Image.open(tmp_path / "samples" / f"{j:03d}_seed{seed}.png")))
        assert (tmp_path / "cmp" / f"{j:03d}_seed{seed}_base.png").exists()

    res = _run(["sample", "--prompt", "a red circle", "--compare", "--out", "nothing"], tmp_path)
    assert res.returncode == 2 and "give --checkpoint RUN_DIR" in res.stderr and not (tmp_path / "nothing").exists()


def test_cli_eval_reproduces_the_runs_own_base_and_final_evaluations(tmp_path):
    # An independent process must rebuild the model, load the checkpoint's EMA weights and reuse the eval seed:
    # only then does it score exactly what training logged at step 0 (base) and at the end (aligned).
    _tiny_setup(tmp_path)
    res = _run(["train", "cfg.yaml", "--max-steps", "3", "--output-dir", "out", "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    res = _run(["eval", "--checkpoint", "out", "--out", "final.json"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "reward_mean" in res.stdout
    final = json.loads((tmp_path / "final.json").read_text())
    # the reward's standard error is logged and printed beside the mean
    assert 0 <= final["eval/reward_mean_se"] and f"{final['eval/reward_mean_se']:.3f}" in res.stdout
    assert final["eval/reward_mean"] == pytest.approx(summary["final"]["eval/reward_mean"], abs=1e-6)
    res = _run(["eval", "--config", "cfg.yaml", "--out", "base.json"], tmp_path)
    assert res.returncode == 0, res.stderr
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["eval/reward_mean"] == pytest.approx(summary["base"]["eval/reward_mean"], abs=1e-6)
    assert base["eval/reward_mean"] != pytest.approx(final["eval/reward_mean"], abs=1e-6)  # training moved it
    # Another prompt set by override: one prompt, so a different mean than over both.
    (tmp_path / "one.txt").write_text("a blue square\n")
    res = _run(["eval", "--checkpoint", "out", "--eval-prompts", "one.txt", "--out", "one.json"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "one.json").read_text())["eval/reward_mean"] != final["eval/reward_mean"]
    res = _run(["eval", "--config", "cfg.yaml", "--checkpoint", "out"], tmp_path)
    assert res.returncode == 2 and "not both" in res.stderr and "Traceback" not in res.stderr


def test_cli_errors_are_one_line(tmp_path):
    res = _run(["train", "shapes", "--learning-rat", "1"], tmp_path)
    assert res.returncode == 2 and "unknown config key 'learning_rat'" in res.stderr and "Traceback" not in res.stderr
    res = _run(["train", "shapes", "--model", "no-such-org/no-such-model", "--max-steps", "1"], tmp_path)
    assert res.returncode == 2 and "no-such-org/no-such-model" in res.stderr and "Traceback" not in res.stderr


def test_config_overrides_are_never_read_as_abbreviated_options():
    """`--reward` and `--seed` are config keys; argparse's prefix matching would take them for bench's
    `--reward-calls` and `--seeds` (a bench of 7 seeds for `--seed 7`)."""
    from flowalign.cli import build_parser

    args, extra = build_parser().parse_known_args(["bench", "shapes", "--reward", "shapes_strict", "--seed", "7"])
    assert (args.seeds, args.reward_calls) == (3, None) and extra == ["--reward", "shapes_strict", "--seed", "7"]
    args, extra = build_parser().parse_known_args(["train", "shapes", "--res", "auto"])
    assert args.resume is None and extra == ["--res", "auto"]  # an unknown key then, named as such


def test_cli_bench_resume_keeps_finished_seeds_and_continues_the_others_exactly(tmp_path):
    _tiny_setup(tmp_path)
    common = ["bench", "cfg.yaml", "--seeds", "2", "--eval-every", "1", "--save-every", "1", "--no-progress"]
    assert _run([*common, "--steps", "4", "--output-dir", "fresh"], tmp_path).returncode == 0
    # an interrupted bench: seed 0 stopped after step 2, seed 1 never started
    assert _run([*common, "--steps", "2", "--seeds", "1", "--output-dir", "b"], tmp_path).returncode == 0
    first = (tmp_path / "b" / "seed0" / "metrics.jsonl").read_text()
    res = _run([*common, "--steps", "4", "--output-dir", "b"], tmp_path)
    assert res.returncode == 2 and "continue it with --resume" in res.stderr
    res = _run([*common, "--steps", "4", "--output-dir", "b", "--resume"], tmp_path)
    assert res.returncode == 0, res.stderr

    def curves(name: str) -> list[list[dict]]:
        runs = json.loads((tmp_path / name / "bench.json").read_text())["runs"]
        return [[{k: v for k, v in p.items() if k != "seconds" and "time" not in k} for p in r["curve"]] for r in runs]

    # seed 0 went on from its checkpoint (its first lines, timings included, kept), and logs what a whole run does
    assert (tmp_path / "b" / "seed0" / "metrics.jsonl").read_text().startswith(first)
    assert curves("b") == curves("fresh")
    assert [p["step"] for p in curves("b")[0]] == [0, 1, 2, 3, 4]
    # a finished bench resumed trains nothing; other settings are refused
    log = (tmp_path / "b" / "seed0" / "metrics.jsonl").read_text()
    assert _run([*common, "--steps", "4", "--output-dir", "b", "--resume"], tmp_path).returncode == 0
    assert (tmp_path / "b" / "seed0" / "metrics.jsonl").read_text() == log
    res = _run([*common, "--steps", "4", "--output-dir", "b", "--resume", "--learning-rate", "0.1"], tmp_path)
    assert res.returncode == 2 and "trained with other settings (learning_rate" in res.stderr
    res = _run([*common, "--steps", "3", "--output-dir", "b", "--resume"], tmp_path)
    assert res.returncode == 2 and "takes that budget or a larger one" in res.stderr
    # the same directory named another way is the same bench; a run resumed under another checker is refused
    assert _run([*common, "--steps", "4", "--output-dir", str(tmp_path / "b"), "--resume"], tmp_path).returncode == 0
    res = _run(
        ["train", "cfg.yaml", "--output-dir", "b/seed0", "--seed", "0", "--resume", "auto", "--checker", "3"], tmp_path
    )
    assert res.returncode == 2 and "trained and evaluated with shapes checker v2" in res.stderr
    assert (tmp_path / "b" / "seed0" / "metrics.jsonl").read_text() == log


def test_cli_bench_stops_at_the_reward_call_budget(tmp_path):
    _tiny_setup(tmp_path)
    res = _run(
        [
            "bench",
            "cfg.yaml",
            "--seeds",
            "2",
            "--reward-calls",
            "10",
            "--output-dir",
            "b",
            "--eval-every",
            "1",
            "--no-progress",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    for run in report["runs"]:
        # 4 reward calls per step (outcome credit): the budget of 10 is spent after the 3rd step.
        assert [p["reward_calls"] for p in run["curve"]] == [0, 4, 8, 12]
        assert [p["step"] for p in run["curve"]] == [0, 1, 2, 3]
        assert all("reward_mean" in p and p["seconds"] >= 0 for p in run["curve"])
    assert report["final"]["reward_calls"]["mean"] == 12
    # The credit comparison summarises the finished run directories without training: their seeds from their
    # configs, their reward calls (4 per step) from their metrics.
    script = Path(__file__).parents[1] / "bench" / "credit_comparison.py"
    res = subprocess.run(
        [sys.executable, str(script), "--out", "c", "--from-runs", "outcome=b/seed0,b/seed1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    compared = json.loads((tmp_path / "c" / "credit_comparison.json").read_text())["arms"]["outcome"]
    assert [r["seed"] for r in compared["runs"]] == [0, 1]
    assert [[p["reward_calls"] for p in r["curve"]] for r in compared["runs"]] == [[0, 4, 8, 12]] * 2
    assert (tmp_path / "c" / "credit_comparison.png").stat().st_size > 0
    # At equal cost: every run spent 12 reward calls, so the comparison there is the mean final evaluation.
    equal = json.loads(res.stdout)["at_equal_budget"]["reward_calls"]
    finals = [r["curve"][-1]["reward_mean"] for r in report["runs"]]
    assert equal["budget"] == 12
    assert equal["outcome"]["reward_mean"]["mean"] == pytest.approx(sum(finals) / 2)
    assert equal["outcome"]["reward_mean"]["min"] == pytest.approx(min(finals))
    res = subprocess.run(
        [sys.executable, str(script), "--from-runs", "outcome=b/nowhere"], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 2 and "b/nowhere/metrics.jsonl not found" in res.stderr and "Traceback" not in res.stderr


def test_cli_artifact_train_is_wired(tmp_path):
    res = _run(["artifact", "train", "--clean", "nope", "--artifact", ".", "--out", "h.safetensors"], tmp_path)
    assert res.returncode == 2 and "--clean directory" in res.stderr and "Traceback" not in res.stderr
    res = _run(["artifact", "fit"], tmp_path)
    assert res.returncode == 2 and "usage: flowalign artifact train" in res.stderr


def test_evaluate_without_evaluation_prompts_is_an_error_before_loading_anything():
    from flowalign.api import evaluate

    with pytest.raises(ValueError, match="num_eval_prompts must be >= 1"):
        evaluate("shapes", num_eval_prompts=0)


def test_train_table_calls_a_change_under_two_standard_errors_noise():
    from flowalign.cli import _table

    n = {"eval/n": 240.0}
    base = {"eval/strict": 0.30, "eval/strict_se": 0.03, "eval/partial": 0.66, "eval/partial_se": 0.01, **n}
    final = {"eval/strict": 0.38, "eval/strict_se": 0.04, "eval/partial": 0.70, "eval/partial_se": 0.01, **n}
    rows = {line.split()[0]: line for line in _table(base, final).splitlines()[1:]}
    assert set(rows) == {"strict", "partial"}  # no row for a count or a standard error
    # strict: +0.080 against sqrt(0.03^2 + 0.04^2) = 0.050, under 2 SE; partial: +0.040 against 0.014
    assert "0.300 ± 0.030" in rows["strict"] and "+0.080 ± 0.050  within noise" in rows["strict"]
    assert rows["partial"].endswith("+0.040 ± 0.014")


def test_sampling_the_built_in_model_uses_its_cards_settings_unless_overridden(tmp_path):
    # Base v2 scored 33% strict at its card's settings (40 re-noising steps, guidance 2.5) against 22% at the
    # config's generic 20 ODE steps and 4.5, so a bare `sample --model shapes` must use the card's (read here, so a
    # new card's sweep may choose others).
    from flowalign import zoo

    side = json.loads((zoo.model_dir("shapes") / "flowalign.json").read_text())
    steps, guidance = side["num_inference_steps"], f"{side['guidance_scale']:g}"
    sampler = "renoise" if side["stochastic_sampling"] else "ode"
    card = ["--eval-num-steps", str(steps), "--eval-sampler", sampler, "--guidance-scale", guidance]
    generic = ["--eval-num-steps", "20", "--eval-sampler", "ode", "--guidance-scale", "4.5"]
    assert card != generic
    images, said = {}, {}
    for name, extra in {"default": [], "card": card, "generic": generic}.items():
        res = _run(["sample", "--model", "shapes", "--prompt", "a red circle", "--out", name, *extra], tmp_path)
        assert res.returncode == 0, res.stderr
        images[name], said[name] = np.asarray(Image.open(tmp_path / name / "000_seed0.png")), res.stdout
    assert f"sampling shapes: {steps} steps ({sampler}), CFG {guidance}" in said["default"]
    assert "sampling shapes: 20 steps (ode), CFG 4.5" in said["generic"]
    assert np.array_equal(images["default"], images["card"])
    assert not np.array_equal(images["default"], images["generic"])


TARGET = {"a red circle": 0.3, "a blue square": 0.7}


def _target_brightness(images, prompts, target=None, **_):
    """A reward that reads a per-prompt column, as DINO similarity reads reference images."""
    if target is None:
        raise ValueError("needs a 'target' column")
    assert list(target) == [TARGET[p] for p in prompts], "columns out of step with prompts"
    return -(images.mean(dim=(1, 2, 3)) - torch.tensor(target)).abs()


def test_compare_on_a_prompt_file_scores_with_its_columns(tmp_path, monkeypatch):
    from flowalign import api
    from rewards.base import REWARDS

    if "target_brightness_test" not in REWARDS:
        REWARDS.register("target_brightness_test")(lambda: _target_brightness)
    _tiny_setup(tmp_path)
    lines = [json.dumps({"prompt": p, "target": t}) for p, t in TARGET.items()]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    cfg = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    cfg.update(reward="target_brightness_test", prompts="prompts.jsonl", eval_prompts="prompts.jsonl", max_steps=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    api.train("cfg.yaml", output_dir="out", progress=False)
    seed = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["eval_seed"]
    path = api.compare("out", "prompts.jsonl", seeds=[seed], path="cmp.png")
    run_grid, cmp_grid = (
        json.loads(p.read_text()) for p in (tmp_path / "out" / "grid.json", path.with_suffix(".json"))
    )
    assert cmp_grid["prompts"] == run_grid["prompts"] == list(TARGET)
    for row in ("base", "aligned"):  # scored with each prompt's own target, in training's grid and in compare's
        assert cmp_grid["scores"][row] == pytest.approx(run_grid["scores"][row], abs=1e-6)
    # and the aligned scores are the reward of the checkpoint's images against each prompt's own target
    images = api.load_run("out").generate(list(TARGET), seed)
    expected = [-abs(float(im.mean()) - t) for im, t in zip(images, TARGET.values(), strict=True)]
    assert cmp_grid["scores"]["aligned"] == pytest.approx(expected, abs=1e-6)


def test_a_run_with_a_relative_prompt_file_is_evaluated_and_exported_from_anywhere(tmp_path):
    """eval / export / sample --checkpoint never read the training prompts, so a run made with `--prompts
    mine.txt` works from another directory; training without them says what is missing."""
    from flowalign.api import evaluate, export, load_run

    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("a red circle\na blue square\n")
    run = tmp_path / "run"
    train = ["train", "shapes", "--prompts", "mine.txt", "--max-steps", "1", "--prompts-per-step", "1"]
    train += ["--group-size", "4", "--train-batch-size", "4", "--num-eval-prompts", "2", "--grid-prompts", "0"]
    res = _run([*train, "--output-dir", str(run), "--no-progress"], work)
    assert res.returncode == 0, res.stderr[-2000:]
    assert evaluate(checkpoint=run)["eval/n"] == 2  # from this test's working directory: no mine.txt here
    assert export(run, tmp_path / "exported").kind == "lora"
    with pytest.raises(ValueError, match="no training prompts: this trainer was built without them"):
        load_run(run, max_steps=2).train(resume="auto", progress=False)


def test_bad_input_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    """Each of these used to load a model first (or run to the end) and then fail, or not fail at all."""
    from flowalign import api, cli
    from flowalign.bench import run_bench

    monkeypatch.chdir(tmp_path)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "000_seed0.png").write_bytes(b"an earlier call's image")
    assert cli.main(["sample", "--prompt", "a red circle", "--out", "used"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert cli.main(["sample", "--prompt", "a red circle", "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
    for model in ("other", "shapes"):  # naming the default model too: the checkpoint's run has its own
        assert cli.main(["sample", "--checkpoint", "run", "--model", model, "--prompt", "x"]) == 2
        assert "a checkpoint samples its run's own model" in capsys.readouterr().err
    for budget in ({"budget_seconds": 0}, {"budget_reward_calls": 0}, {"budget_steps": 0}):
        with pytest.raises(ValueError, match="must be > 0"):
            run_bench("shapes", **budget)
    with pytest.raises(ValueError, match="is a directory"):
        run_bench("shapes", budget_steps=1, out=tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        api.export("no-such-run", tmp_path / "afile")
    with pytest.raises(ValueError, match="seeds must be a list"):
        api.compare("no-such-run", ["a red circle"], seeds=3)
    with pytest.raises(FileNotFoundError, match="no flowalign checkpoint"):  # numpy seeds pass, then the run is sought
        api.compare("no-such-run", ["a red circle"], seeds=np.arange(2))
    with pytest.raises(ValueError, match="not valid YAML"):
        cli.parse_overrides(["--reward", "[{name: x"])
    (tmp_path / "p.txt").write_text("a red circle\na purple hexagon\n")
    with pytest.raises(ValueError, match="hexagon"):  # the checker's grammar, not at the step it is first drawn
        api.build_trainer(api.load_config("shapes", {"prompts": "p.txt"}))
    assert cli.main(["eval", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_folders_that_are_not_pipelines_say_what_to_pass(tmp_path):
    from flowalign.adapters import load_pipeline

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline.*save_pretrained"):
        load_pipeline(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000001")
    with pytest.raises(FileNotFoundError, match="flowalign run: pass it as --checkpoint"):
        load_pipeline(tmp_path / "run")
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_pipeline(tmp_path / "f.bin")


def test_ctrl_c_ends_with_a_line_not_a_traceback(monkeypatch, capsys):
    from flowalign import cli

    def interrupted(args, extra):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    assert cli.main(["train", "shapes"]) == 130
    assert "interrupted (what it checkpointed continues with --resume auto)" in capsys.readouterr().err
