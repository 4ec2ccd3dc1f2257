"""Which denoising steps carry the policy gradient? Per-step gradient norms of the GRPO objective.

    python bench/step_gradients.py --out bench/results/step_gradients.json

Samples one GRPO batch from the `shapes` preset with every step but the last stochastic, scores it, and for each
step k computes the norm of the gradient of the trainer's own loss (`losses.policy_step_loss`, at ratio 1 as in
the first update) with respect to the LoRA weights. Prints JSON (one norm per step, plus each step's share of the
sum). On the built-in model the late steps' norms dwarf the early ones, where layout, count and colour are
decided; that is why the trainer skips nearly collapsed steps (`min_noise_std`) and the main-job preset trains an
early SDE window (docs/EXPERIMENTS.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from flowalign.api import build_trainer
from flowalign.config import load_config
from flowalign.losses import policy_step_loss
from flowalign.samplers.rollout import replay_step
from flowalign.trainer import GRPOTrainer, Rewards
from flowalign.types import Trajectory


def policy_step_grads(trainer: GRPOTrainer, step: int) -> tuple[Trajectory, Rewards, list[int], list[list[Tensor]]]:
    """Samples and scores GRPO batch `step`; per trained step, the gradient of the trainer's own loss
    (`losses.policy_step_loss` at ratio 1, as in the first update) w.r.t. each trainable weight (zeros if unused)."""
    traj = trainer.sample(step)
    rewards = trainer.score(traj.images, traj.prompts, traj.columns)
    credit, _ = trainer.assign_credit(traj, rewards)
    steps = torch.nonzero(traj.sde_mask).flatten().tolist()
    params = list(trainer.params.values())
    trainer.adapter.transformer.train()
    grads = []
    for j, k in enumerate(steps):
        out = replay_step(trainer.adapter, traj, k)
        loss = policy_step_loss(out.log_prob, traj.log_probs[:, k], credit.advantages[:, j], trainer.cfg.clip_range)
        g = torch.autograd.grad(loss.loss, params, allow_unused=True)
        grads.append([torch.zeros_like(p) if gi is None else gi.float() for p, gi in zip(params, g, strict=True)])
    return traj, rewards, steps, grads


def write_report(report: dict, out: Path | None) -> None:
    """Prints the JSON report and writes it to `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def step_gradient_norms(overrides: dict) -> dict:
    every_step = {"sde_window": 0, "min_noise_std": 0.0}  # the trainer's default would skip the collapsed step
    trainer = build_trainer(load_config("shapes", {**every_step, "num_eval_prompts": 0, **overrides}))
    traj, rewards, steps, grads = policy_step_grads(trainer, 0)
    norms = [float(torch.sqrt(sum((g**2).sum() for g in step_grads))) for step_grads in grads]
    total = sum(norms)
    return {
        "steps": steps,
        "sigmas": [float(traj.sigmas[k]) for k in steps],
        "grad_norm": norms,
        "share": [n / total for n in norms],
        "late_over_early": norms[-1] / norms[0],
        "reward_mean": float(rewards.total.mean()),
        "config": {"sampler": trainer.cfg.sampler, "noise_level": trainer.cfg.noise_level, **overrides},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    report = {
        name: step_gradient_norms({"sampler": sampler, "noise_level": a, "seed": args.seed})
        for name, sampler, a in (("cps_a0.9", "cps", 0.9), ("cps_a0.7", "cps", 0.7), ("sde_a0.7", "sde", 0.7))
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
