"""Metric plots of a run: training reward per step and held-out evaluation over steps (PNG)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def plot_metrics(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Reads `metrics.jsonl` of a run and writes `metrics.png` (reward, evaluation metrics, clip fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in records if "reward/mean" in r]
    evals = [r for r in records if "eval/reward_mean" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if train:
        steps = [r["step"] for r in train]
        mean = [r["reward/mean"] for r in train]
        std = [r["reward/std"] for r in train]
        lo = [m - s for m, s in zip(mean, std, strict=True)]
        hi = [m + s for m, s in zip(mean, std, strict=True)]
        axes[0].fill_between(steps, lo, hi, alpha=0.15, label="± std over the step's samples")
        axes[0].plot(steps, mean, lw=0.8, alpha=0.5, label="reward/mean")
        # One step's mean is mostly sampling noise; a trailing mean over ~5% of the run shows the trend.
        window = max(1, len(mean) // 20)
        trend = [statistics.fmean(mean[max(0, i + 1 - window) : i + 1]) for i in range(len(mean))]
        axes[0].plot(steps, trend, color="C3", lw=2, label=f"mean of the last {window} steps")
        axes[2].plot(steps, [r.get("train/clip_frac", 0) for r in train], label="clip fraction")
        axes[2].plot(steps, [r.get("reward/zero_std_frac", 0) for r in train], label="zero-variance groups")
    axes[0].set_title("training reward (samples of the step)")
    keys = [k for k in ("eval/strict", "eval/partial", "eval/reward_mean") if evals and k in evals[0]]
    for key in keys[:2] if "eval/strict" in keys else keys[-1:]:
        # Error bars: the evaluation's own standard error (which images were drawn), logged beside each mean.
        have = [r for r in evals if key in r]  # a resumed run may have evaluated other prompts before
        err = [r.get(f"{key}_se", 0.0) for r in have]
        xs, ys = [r["step"] for r in have], [r[key] for r in have]
        axes[1].errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{key} ± SE")
    axes[1].set_title("held-out evaluation (fixed-seed samples)")
    axes[2].set_title("training diagnostics")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path) if path else run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
