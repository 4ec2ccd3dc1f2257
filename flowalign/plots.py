"""Metric plots of a run: training reward per step and held-out evaluation over steps (PNG)."""

from __future__ import annotations

import json
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
        axes[0].plot(steps, mean, label="reward/mean")
        lo = [m - s for m, s in zip(mean, std, strict=True)]
        hi = [m + s for m, s in zip(mean, std, strict=True)]
        axes[0].fill_between(steps, lo, hi, alpha=0.2)
        axes[2].plot(steps, [r.get("train/clip_frac", 0) for r in train], label="clip fraction")
        axes[2].plot(steps, [r.get("reward/zero_std_frac", 0) for r in train], label="zero-variance groups")
    axes[0].set_title("training reward (samples of the step)")
    keys = [k for k in ("eval/strict", "eval/partial", "eval/reward_mean") if evals and k in evals[0]]
    for key in keys[:2] if "eval/strict" in keys else keys[-1:]:
        axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
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
