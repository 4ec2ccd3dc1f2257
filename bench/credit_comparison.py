"""Outcome vs incremental vs turning-point credit on the built-in shapes task, at equal reward-call budget.

    python bench/credit_comparison.py --seeds 3 --reward-calls 2400 --out runs/credit
    python bench/credit_comparison.py --plot-only --out runs/credit     # redraw from the JSON
    python bench/credit_comparison.py --out runs/credit --from-runs outcome=runs/o0,runs/o1 \
        --from-runs turning_point=runs/t0,runs/t1      # compare training runs made separately (side by side)

Writes <out>/credit_comparison.json (every run's curve, from `flowalign bench`) and credit_comparison.png:
held-out strict and partial accuracy vs reward calls and vs training seconds, mean ± std over seeds. Extra
arguments are config overrides applied to every arm (e.g. --num-eval-prompts 48). With --from-runs nothing is
trained: the arms are finished training runs (their own configs), for runs made in parallel at one thread each,
whose seconds are comparable with each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from flowalign.bench import report_from_runs, run_bench
from flowalign.cli import parse_overrides
from flowalign.trainer import holds_run

X_KEYS = ("reward_calls", "seconds", "step")  # the costs arms are compared at
ARMS = {
    "outcome": {"credit": "outcome"},
    "incremental": {"credit": "incremental", "step_reward_mode": "ode"},
    "turning_point": {"credit": "turning_point", "step_reward_mode": "ode"},
}


def _metrics(report: dict) -> list[str]:
    """The checker's accuracies when the evaluation reported them, else the evaluation's mean reward."""
    first = next(iter(report["arms"].values()))["runs"][0]["curve"][0]
    return [m for m in ("strict", "partial") if m in first] or ["reward_mean"]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metrics(report)
    fig, axes = plt.subplots(len(metrics), 3, figsize=(14, 3.6 * len(metrics)), squeeze=False)
    for row, metric in zip(axes, metrics, strict=True):
        for name, arm in report["arms"].items():
            curves = [r["curve"] for r in arm["runs"]]
            for ax, x_key in zip(row, X_KEYS, strict=True):
                # Interpolate each seed onto a common grid so mean and spread are well defined.
                xmax = min(c[-1][x_key] for c in curves)
                grid = np.linspace(0, xmax, 50)
                ys = np.stack([np.interp(grid, [p[x_key] for p in c], [p[metric] for p in c]) for c in curves])
                ax.plot(grid, ys.mean(0), label=f"{name} ({len(curves)} seed{'s' if len(curves) != 1 else ''})")
                ax.fill_between(grid, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
        row[0].xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))  # no overlapping labels
        row[0].set_xlabel("reward calls")
        row[1].set_xlabel("training seconds (CPU)")
        row[2].set_xlabel("steps (= trajectories / batch size, the same in every arm)")
        for ax in row:
            ax.set_ylabel(f"held-out {metric} accuracy")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("credit assignment on the shapes task (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def at_equal_budget(report: dict) -> dict:
    """Each arm's seed-mean accuracy (and spread) at the largest reward-call, second and step budgets every run
    reached, interpolated linearly between its evaluations: the comparison at equal cost."""
    out = {}
    curves = {name: [r["curve"] for r in arm["runs"]] for name, arm in report["arms"].items()}
    metrics = _metrics(report)
    for x_key in X_KEYS:
        budget = min(c[-1][x_key] for cs in curves.values() for c in cs)
        out[x_key] = {"budget": budget}
        for name, cs in curves.items():
            row = {}
            for metric in metrics:
                ys = [float(np.interp(budget, [p[x_key] for p in c], [p[metric] for p in c])) for c in cs]
                row[metric] = {"mean": float(np.mean(ys)), "min": min(ys), "max": max(ys)}
            out[x_key][name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shapes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reward-calls", type=float, default=2400)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", default="runs/credit")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier comparison in --out")
    parser.add_argument("--from-runs", action="append", default=[], metavar="ARM=DIR,DIR", help="finished runs")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    path = out / "credit_comparison.json"
    if args.from_runs:
        report = {"from_runs": True, "arms": {}}
        for spec in args.from_runs:
            name, sep, dirs = spec.partition("=")
            if not sep or not dirs:
                parser.error(f"--from-runs takes ARM=DIR[,DIR...], got {spec!r}")
            try:
                report["arms"][name] = report_from_runs(dirs.split(","))
            except (FileNotFoundError, ValueError) as err:
                parser.error(str(err))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    elif not args.plot_only:
        unknown = [a for a in args.arms.split(",") if a not in ARMS]
        if unknown:  # before any arm trains (each takes hours at the default budget)
            parser.error(f"unknown arm(s) {', '.join(unknown)}; valid: {', '.join(ARMS)}")
        used = [a for a in args.arms.split(",") if any(holds_run(out / a / f"seed{s}") for s in range(args.seeds))]
        if used and not args.overwrite:
            parser.error(f"{out} holds runs of arm(s) {', '.join(used)}: pass another --out, or --overwrite")
        report = {"config": args.config, "seeds": args.seeds, "budget_reward_calls": args.reward_calls, "arms": {}}
        for name in args.arms.split(","):
            over = {**parse_overrides(extra), **ARMS[name], "output_dir": str(out / name)}
            bench = run_bench(
                args.config,
                over,
                seeds=args.seeds,
                budget_reward_calls=args.reward_calls,
                progress=False,
                overwrite=args.overwrite,
            )
            report["arms"][name] = json.loads(bench.read_text())
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))  # partial results survive an interrupted run
    report = json.loads(path.read_text())
    plot(report, out / "credit_comparison.png")
    summary = {
        name: {
            k: arm["final"][k]
            for k in ("strict", "partial", "reward_mean", "reward_calls", "seconds", "step")
            if k in arm["final"]
        }
        for name, arm in report["arms"].items()
    }
    summary["at_equal_budget"] = at_equal_budget(report)
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
