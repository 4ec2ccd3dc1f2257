"""`flowalign bench`: held-out accuracy vs reward calls and vs seconds for a config, over several seeds.

The harness the credit-assignment comparison uses: every seed trains the same config until a budget (steps,
reward calls or training seconds) is spent, evaluating every `eval_every` steps; the JSON holds each seed's curve
and the mean/std of the final evaluation. Seconds exclude evaluation time (it is not part of training).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from flowalign.config import LEGACY_DEFAULTS, load_config, load_run_config
from flowalign.trainer import checkpoint_dir, holds_run, split_log


def _cost(rec: dict[str, float]) -> tuple[float, float]:
    """Reward calls and training seconds of one log record (evaluation time is not training)."""
    return rec.get("cost/reward_calls", 0.0), sum(
        v for k, v in rec.items() if k.startswith("time/") and k != "time/eval"
    )


def _curve(metrics_path: Path) -> list[dict[str, float]]:
    """Evaluation points with cumulative reward calls, model evaluations and training seconds."""
    calls = evals = seconds = 0.0
    curve = []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        rec_calls, rec_seconds = _cost(rec)
        calls += rec_calls
        evals += rec.get("cost/model_evals", 0.0)
        seconds += rec_seconds
        if any(k.startswith("eval/") for k in rec):
            point = {"step": rec["step"], "reward_calls": calls, "model_evals": evals, "seconds": seconds}
            point.update({k.removeprefix("eval/"): v for k, v in rec.items() if k.startswith("eval/")})
            curve.append(point)
    return curve


def report_from_runs(
    run_dirs: list[str | Path],
    *,
    config: str = "",
    overrides: dict[str, Any] | None = None,
    budget: dict | None = None,
) -> dict[str, Any]:
    """The bench report of finished training runs (each a directory with `metrics.jsonl` and `config.yaml`).

    `run_bench` trains seeds one after another; runs made otherwise (side by side, on several machines) are
    summarised here the same way. Every run must have evaluated at its first and last step."""
    runs = []
    for d in map(Path, run_dirs):
        metrics = d / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{metrics} not found: pass the output_dir of a training run")
        curve = _curve(metrics)
        if not curve:
            raise ValueError(f"{metrics} holds no evaluation: run with eval_every > 0")
        cfg = load_config(str(d / "config.yaml"))
        versions = sorted({int(p.get("checker", LEGACY_DEFAULTS["checker"])) for p in curve})
        runs.append({"seed": cfg.seed, "dir": str(d), "curve": curve, "checker": versions})
    if len({v for r in runs for v in r["checker"]}) > 1:  # accuracies of two checker versions do not average
        raise ValueError(
            "these runs were graded by different shapes checker versions: "
            + ", ".join(f"{r['dir']} v{'/v'.join(map(str, r['checker']))}" for r in runs)
            + "; summarise runs of one version (train the others again with --checker N)"
        )
    finals = [r["curve"][-1] for r in runs]
    keys = [k for k in finals[0] if isinstance(finals[0][k], (int, float))]
    summary = {
        k: {
            "mean": statistics.fmean(f[k] for f in finals),
            "std": statistics.pstdev(f[k] for f in finals) if len(finals) > 1 else 0.0,
        }
        for k in keys
    }
    initial = {k: statistics.fmean(r["curve"][0][k] for r in runs) for k in keys if k in runs[0]["curve"][0]}
    return {
        "config": config,
        "overrides": overrides or {},
        "budget": budget or {},
        "seeds": len(runs),
        "initial_mean": initial,
        "final": summary,
        "runs": runs,
    }


def _resume_point(run: Path, cfg: Any) -> int | None:
    """The step of a bench run's latest checkpoint (None: it has none), after checking that the run was made with
    this config: a seed resumed under other settings would mix two experiments in one curve."""
    saved = dataclasses.asdict(load_run_config(run))  # with the legacy defaults of keys the run predates
    # the budget is checked against budget.json; the directory may have moved or be named another way
    differ = [k for k, v in dataclasses.asdict(cfg).items() if k not in ("max_steps", "output_dir") and saved[k] != v]
    if differ:
        raise ValueError(
            f"{run} was trained with other settings ({', '.join(f'{k}: {saved.get(k)!r}' for k in differ[:4])}); "
            "--resume continues a bench with its own config and overrides (only the budget may grow)"
        )
    latest = run / "checkpoints" / "latest"
    return int(json.loads((checkpoint_dir(run) / "state.json").read_text())["step"]) if latest.exists() else None


def run_bench(
    config: str,
    overrides: dict[str, Any] | None = None,
    *,
    seeds: int = 3,
    budget_steps: int | None = None,
    budget_reward_calls: float | None = None,
    budget_seconds: float | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Trains `config` (+ overrides) for each seed 0..seeds-1 within the budget and writes the JSON report.
    `overwrite`: replace the runs of an earlier bench in the same directory (else refused before any training).
    `resume`: continue an interrupted bench: a seed that spent its budget is kept, one with a checkpoint goes on
    from it (its spend so far counted from its log), one without starts over."""
    if seeds < 1:
        raise ValueError(f"bench needs at least one seed, got --seeds {seeds}")
    if resume and overwrite:
        raise ValueError("--resume continues an earlier bench's runs and --overwrite replaces them: give one")
    for flag, value in (
        ("--steps", budget_steps),
        ("--reward-calls", budget_reward_calls),
        ("--seconds", budget_seconds),
    ):
        if value is not None and not value > 0:
            raise ValueError(f"bench {flag} must be > 0, got {value}")
    from accelerate import PartialState

    from flowalign.api import build_trainer, require_file_path

    require_file_path(out, "bench.json")

    overrides = dict(overrides or {})
    base = load_config(config, overrides)
    root = Path(overrides.get("output_dir", base.output_dir + "_bench"))
    used = [root / f"seed{seed}" for seed in range(seeds) if holds_run(root / f"seed{seed}")]
    if used and not (overwrite or resume):
        raise FileExistsError(
            f"{root} holds an earlier bench's runs ({', '.join(d.name for d in used)}): continue it with --resume,"
            " write this one elsewhere with --output-dir DIR, or replace them with --overwrite"
        )
    budget = {"steps": budget_steps, "reward_calls": budget_reward_calls, "seconds": budget_seconds}
    earlier = json.loads((root / "budget.json").read_text()) if resume and (root / "budget.json").is_file() else None
    if earlier and any(
        (earlier[k] is None) != (budget[k] is None) or (budget[k] or 0) < (earlier[k] or 0) for k in budget
    ):
        raise ValueError(
            f"{root} was benched with the budget {earlier}; --resume takes that budget or a larger one, got {budget}"
        )
    state = PartialState()
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        (root / "budget.json").write_text(json.dumps(budget))
    runs = []
    for seed in range(seeds):
        over = {**overrides, "seed": seed, "output_dir": str(root / f"seed{seed}"), "grid_prompts": 0}
        if budget_steps:
            over["max_steps"] = budget_steps
        elif budget_reward_calls or budget_seconds:
            over["max_steps"] = 10**9  # the budget stops the run
        cfg = load_config(config, over)
        spent = {"calls": 0.0, "seconds": 0.0}

        # Per process: each counts its own time/* (a resumed run's earlier seconds come from the main process's
        # log, so a seconds budget may stop a resumed seed a step apart from an uninterrupted one).
        def stop(rec: dict[str, float], spent=spent) -> bool:
            calls, seconds = _cost(rec)
            spent["calls"] += calls
            spent["seconds"] += seconds
            return bool(
                (budget_reward_calls and spent["calls"] >= budget_reward_calls)
                or (budget_seconds and spent["seconds"] >= budget_seconds)
            )

        run = Path(cfg.output_dir)
        at = _resume_point(run, cfg) if resume and (run / "config.yaml").exists() else None
        if at is not None:  # the log up to the checkpoint is what the resumed run keeps
            done = [stop(json.loads(line)) for line in split_log(run / "metrics.jsonl", at)[0].splitlines()]
            if at >= cfg.max_steps or (done and done[-1]):
                runs.append(cfg.output_dir)
                continue
        trainer = build_trainer(cfg)
        trainer.train(
            resume="auto" if at is not None else None, progress=progress, stop=stop, overwrite=overwrite or resume
        )
        runs.append(cfg.output_dir)
    report = report_from_runs(runs, config=config, overrides=overrides, budget=budget)
    path = Path(out) if out else root / "bench.json"
    if state.is_main_process:  # every process trained its share; one writes the report
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    state.wait_for_everyone()
    return path
