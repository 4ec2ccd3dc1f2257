"""Step-level rewards R_0 .. R_n for TurningPoint-GRPO (arXiv 2602.06422; ALGORITHMS.md section 3).

For a trajectory whose stochastic steps are s_0 < ... < s_{n-1}:
  R_0 = reward of the image reached deterministically from the state *before* the first SDE step, the state the
        rollout itself reached from the trajectory's OWN initial noise (the released code draws fresh noise
        here; that is a bug we do not copy).
  R_k = reward of the deterministic completion (current policy, no grad) of the state after k SDE steps, 1<=k<n.
  R_n = reward of the rollout's final image (no extra work) when the steps after s_{n-1} were ODE steps, which
        is then the deterministic completion of the state after the last SDE step. When they re-noised
        (`Trajectory.untrained == "renoise"`), that state is completed deterministically like the others: every
        R_k then comes from the same completion, so d_{n-1} measures the last SDE step and not the switch from
        re-noised to ODE sampling (on the built-in model re-noising alone scores higher than the ODE). Likewise
        with an estimated completion ("x0", or `completion_steps` fewer than the steps left): R_n is then the same
        estimate of that state, so d_{n-1} does not compare an estimate with a finished image.
Two ways to complete a state x at sigma_j:
  "ode": integrate the ODE to sigma = 0 on the schedule's remaining sigmas (or `completion_steps` of them) and
         decode: sum over completions of (T - j) evaluations -> O(T^2) per trajectory.
  "x0":  score the one-step clean estimate x0 = x - sigma_j v(x, sigma_j): one evaluation per state -> O(T).
All completions that start at the same step index run as one batched transformer call per ODE step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign.samplers.sde import ode_step
from flowalign.types import FlowAdapter, Trajectory

COMPLETIONS = ("ode", "x0")


@dataclass(frozen=True)
class StepRewards:
    """R_0 .. R_n per trajectory and what computing them cost."""

    values: Tensor  # [B, n+1] fp32
    start_states: list[int]  # state indices whose completions gave R_0..R_{n-1} (and R_n after re-noised steps)
    model_evals: int  # per-sample velocity evaluations spent on completions (CFG pair counts once)
    reward_calls: int  # images scored, R_n included


def completion_sigmas(sigmas: Tensor, j: int, steps: int | None) -> Tensor:
    """The sigmas from sigma_j to 0 used to complete a state: all remaining ones, or `steps` of them
    picked evenly (always keeping sigma_j and the final 0)."""
    tail = sigmas[j:]
    if steps is None or steps >= tail.numel() - 1:
        return tail
    if steps < 1:
        raise ValueError(f"completion_steps must be >= 1, got {steps}")
    idx = torch.linspace(0, tail.numel() - 1, steps + 1).round().long()
    return tail[idx]


@torch.no_grad()
def complete(adapter: FlowAdapter, x: Tensor, sigmas: Tensor, traj: Trajectory, *, mode: str = "ode") -> Tensor:
    """Deterministically finishes states x [B, ...] at sigmas[0] with the current policy -> final latents."""
    if mode == "x0":
        v = adapter.velocity(x, sigmas[0], traj.cond, traj.guidance_scale)
        return (x.float() - sigmas[0].float() * v.float()).to(x.dtype)
    for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = adapter.velocity(x, a, traj.cond, traj.guidance_scale)
        x = ode_step(v, x, a, b).prev_sample.to(x.dtype)
    return x


@torch.no_grad()
def step_rewards(
    adapter: FlowAdapter,
    traj: Trajectory,
    reward: Callable[[Tensor, list[str]], Tensor],
    final_rewards: Tensor,
    *,
    mode: str = "ode",
    completion_steps: int | None = None,
) -> StepRewards:
    """Computes R_0 .. R_n for every trajectory of `traj` (see the module doc).

    Args:
        adapter: the policy (its current weights are the ones that sampled `traj`).
        traj: a rollout with at least one stochastic step.
        reward: `(images, prompts) -> Tensor[B]`, the same reward as the final one.
        final_rewards: [B] the rollout's final rewards, reused as R_n.
        mode: "ode" (exact deterministic completion) or "x0" (one-step clean estimate).
        completion_steps: with "ode", complete on this many sigmas instead of all remaining ones.
    """
    if mode not in COMPLETIONS:
        raise ValueError(f"step reward mode must be one of {', '.join(COMPLETIONS)}, got {mode!r}")
    sde = torch.nonzero(traj.sde_mask).flatten().tolist()
    if not sde:
        raise ValueError("step rewards need at least one stochastic step in the trajectory")
    if traj.untrained != "ode" and sde != list(range(sde[0], sde[-1] + 1)):
        # R_{k+1} - R_k would also hold the re-noising between two trained steps, which no log-prob explains
        raise ValueError(f"step rewards with re-noised untrained steps need contiguous stochastic steps, got {sde}")
    # R_n is a completion too when the rollout's own image is not how the others were measured: re-noised steps
    # after the last SDE step, or an estimate ("x0", fewer completion steps) standing in for the remaining ODE steps
    # (see the module doc). With one step left, every completion is that step.
    last = sde[-1] + 1  # the state the final image is completed from
    estimate = (
        mode != "ode" or completion_sigmas(traj.sigmas, last, completion_steps).numel() < traj.sigmas.numel() - last
    )
    complete_last = (traj.untrained != "ode" or estimate) and last < traj.num_steps - 1
    # State index reached before the first SDE step, then after each SDE step but the last (and the last).
    starts = [sde[0]] + [k + 1 for k in sde[:-1]] + ([last] if complete_last else [])
    values = [None] * len(starts)
    evals = 0
    for i, j in enumerate(starts):
        sig = completion_sigmas(traj.sigmas, j, completion_steps)
        final = complete(adapter, traj.latents[:, j], sig.to(traj.sigmas.device), traj, mode=mode)
        evals += len(traj.prompts) * (1 if mode == "x0" else sig.numel() - 1)
        values[i] = reward(adapter.decode(final), traj.prompts).detach().float().cpu()
    calls = len(traj.prompts) * (len(starts) + 1)  # the final images are scored either way
    if not complete_last:
        values.append(final_rewards.detach().float().cpu())
    return StepRewards(torch.stack(values, dim=1), starts, evals, calls)
