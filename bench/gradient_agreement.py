"""How much of one GRPO batch's gradient is signal? Agreement of gradients from independent batches.

    python bench/gradient_agreement.py --batches 6 --out bench/results/gradient_agreement.json

At the base model's LoRA (zero update), draws `--batches` independent GRPO batches of the `shapes` preset (new
prompts and noise each), computes each batch's gradient of the trainer's loss (`losses.policy_step_loss` at ratio 1,
summed over the trained steps, via `step_gradients.policy_step_grads`) with respect to the LoRA weights, and reports
the mean pairwise cosine. Two independent estimates g1 = s + n1, g2 = s + n2 of a true gradient s have E[cos] ~
|s|^2 / (|s|^2 + |n|^2): near 0 means one batch is mostly noise, and since |n|^2 shrinks like 1/batch, a batch about
1/cos times larger would make signal and noise equal (reported from the mean's upper bound). Settings compared: the
preset (many prompts, early window), every exploring step, one initial noise per group (`group_shared_noise`), one
fixed prompt (where a probe did learn; docs/EXPERIMENTS.md), and one prompt from one fixed initial noise (only the SDE
noise varies: the cleanest case REINFORCE can face here). A calibration row trains the preset on a smooth reward
(mean brightness) instead of the checker: it shows the measurement does find signal where there is some.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import numpy as np
import torch
from step_gradients import policy_step_grads, write_report  # bench/ is on sys.path when run as a script

from flowalign.api import build_trainer
from flowalign.config import load_config


def batch_gradient(trainer, step: int) -> torch.Tensor:
    """Flattened gradient of one GRPO batch's loss, summed over its trained steps (`train_on` averages them: a
    uniform scale, which no cosine sees)."""
    *_, grads = policy_step_grads(trainer, step)
    return torch.cat([sum(per_param).flatten() for per_param in zip(*grads, strict=True)])


def agreement(overrides: dict, batches: int, prompt: str | None = None, fixed_noise: bool = False) -> dict:
    """Mean pairwise cosine of `batches` batch gradients. `prompt`: train on that caption only. `fixed_noise`:
    every sample of every batch starts from one initial noise, so batches differ only in the SDE noise."""
    trainer = build_trainer(load_config("shapes", {"num_eval_prompts": 0, **overrides}))
    if prompt is not None:
        trainer.train_prompts = [prompt]
    if fixed_noise:
        x_t = trainer.adapter.init_noise(1, torch.Generator().manual_seed(7))
        trainer.adapter.init_noise = lambda n, generator=None: x_t.repeat(n, *([1] * (x_t.ndim - 1)))
    grads = [batch_gradient(trainer, step) for step in range(batches)]
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]
    mean = float(np.mean(cos))
    # Pairs share batches, so the error uses the number of batches, not of pairs (conservative).
    upper = mean + 2 * float(np.std(cos)) / math.sqrt(batches)
    return {
        "mean_pairwise_cos": mean,
        "cos_upper_bound_2se": upper,
        "min_cos": min(cos),
        "max_cos": max(cos),
        "batch_samples": trainer.cfg.batch_size,
        # A batch at least this large is needed before signal and noise are equal (from the upper bound).
        "samples_for_equal_signal_and_noise_at_least": trainer.cfg.batch_size / upper if upper > 0 else None,
        "config": {**overrides, "prompt": prompt},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.batches < 2:
        p.error("--batches must be >= 2 (agreement needs a pair)")
    seed = {"seed": args.seed}
    one = {**seed, "prompts_per_step": 1, "group_size": 64}
    report = {
        "preset_window_0_2": agreement(seed, args.batches),
        "every_exploring_step": agreement({**seed, "sde_window": 0}, args.batches),
        "preset_group_shared_noise": agreement({**seed, "group_shared_noise": True}, args.batches),
        "one_prompt_window_0_2": agreement(one, args.batches, prompt="three circles"),
        "one_prompt_one_initial_noise": agreement(one, args.batches, prompt="three circles", fixed_noise=True),
        "one_prompt_one_initial_noise_every_step": agreement(
            {**one, "sde_window": 0}, args.batches, prompt="three circles", fixed_noise=True
        ),
        "calibration_brightness_reward": agreement({**seed, "reward": "brightness"}, args.batches),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
