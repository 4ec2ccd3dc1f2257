"""Stochastic flow-matching steps with exact Gaussian log-probabilities (pure torch, fp32); `cps_flow_grpo` keeps
Flow-GRPO's constant-free cps log-prob instead.

Each step maps x at sigma to x' at sigma_next (< sigma). Passing `prev_sample` replays a recorded step:
the same function then returns the log-prob of that x' under the current velocity, which is how
sampling and training share one piece of math (as in ddpo-pytorch / Flow-GRPO).
Log-probs are averaged over all non-batch dims (the field's convention, Flow-GRPO arXiv 2505.05470).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowalign.registry import Registry
from flowalign.types import StepOutput

STEPS: Registry = Registry("sampler step")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _expand(s: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or [B] sigma as fp32, broadcastable against `like` [B, ...]."""
    s = torch.as_tensor(s, dtype=torch.float32, device=like.device)
    return s.reshape(-1, *([1] * (like.ndim - 1))) if s.ndim == 1 else s


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2) per element, averaged over non-batch dims -> [B]."""
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.flatten(1).mean(1)


def _sample(mean: Tensor, std: Tensor, prev_sample: Tensor | None, generator: torch.Generator | None) -> Tensor:
    if prev_sample is not None:
        return prev_sample.float()
    # Draw where the generator lives (a CPU generator may drive CUDA sampling), then move.
    where = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=where, dtype=torch.float32).to(mean.device)
    return mean + std * noise


@STEPS.register("sde")
def sde_step(
    velocity: Tensor,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    *,
    sigma_max: Tensor | float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Flow-GRPO SDE step (arXiv 2505.05470, eq. 9 and its Euler-Maruyama discretisation).

    noise scale a*sqrt(sigma/(1-sigma)); at sigma == 1 the schedule's second sigma (`sigma_max`) stands in
    the denominator so nothing divides by zero, as in the reference code.
    mean = x + (v + std^2/(2 sigma) * (x + (1-sigma) v)) dt,  x' = mean + std sqrt(-dt) eps.
    """
    v, x = velocity.float(), x.float()
    s, s_next = _expand(sigma, x), _expand(sigma_next, x)
    dt = s_next - s
    denom = 1 - torch.where(s == 1, torch.as_tensor(sigma_max, dtype=torch.float32, device=x.device), s)
    std_t = noise_level * torch.sqrt(s / denom)
    mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
    std = std_t * torch.sqrt(-dt)
    x_next = _sample(mean, std, prev_sample, generator)
    return StepOutput(x_next, gaussian_log_prob(x_next, mean, std), mean, std)


@STEPS.register("cps")
def cps_step(
    velocity: Tensor,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    noise_level: float,
    *,
    sigma_max: Tensor | float | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    exact: bool = True,
) -> StepOutput:
    """Coefficient-preserving step (Flow-GRPO's "cps"): keeps the marginal's signal/noise coefficients.

    x0 = x - sigma v, x1 = x + (1-sigma) v, sigma_n = sigma' sin(a pi/2),
    mean = (1-sigma') x0 + sqrt(sigma'^2 - sigma_n^2) x1,  x' = mean + sigma_n eps.
    `exact=False` gives Flow-GRPO's constant-free log-prob -mean((x'-mean)^2).
    """
    del sigma_max  # same signature as sde_step
    v, x = velocity.float(), x.float()
    s, s_next = _expand(sigma, x), _expand(sigma_next, x)
    x0, x1 = x - s * v, x + (1 - s) * v
    std = s_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - s_next) * x0 + torch.sqrt(s_next**2 - std**2) * x1
    x_next = _sample(mean, std, prev_sample, generator)
    lp = gaussian_log_prob(x_next, mean, std) if exact else -((x_next - mean) ** 2).flatten(1).mean(1)
    return StepOutput(x_next, lp, mean, std)


@STEPS.register("cps_flow_grpo")
def cps_flow_grpo_step(
    velocity: Tensor, x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, noise_level: float, **kwargs
) -> StepOutput:
    """The cps step with Flow-GRPO's constant-free log-prob `-mean((x'-mean)^2)`: its log-ratios are the exact
    Gaussian's times 2 sigma_n^2, so the reference code's clip range (1e-5 for cps) keeps its meaning."""
    return cps_step(velocity, x, sigma, sigma_next, noise_level, exact=False, **kwargs)


def kl_step_std(kl_form: str, sampler: str, std: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """The std a step's KL divides by. kl_form "exact": the step's own std (the Gaussian KL). "flow_grpo": the one
    Flow-GRPO's KL divides by (`std_dev_t` of its step, train_sd3.py): for "sde" the noise scale
    a sqrt(sigma / (1 - sigma)) without the step's sqrt(-dt), so that KL is the Gaussian one times (sigma - sigma');
    for the cps steps their own std, so there it is the Gaussian KL."""
    if kl_form == "exact" or sampler != "sde":
        return std
    return std / torch.sqrt(
        torch.as_tensor(sigma, dtype=torch.float32) - torch.as_tensor(sigma_next, dtype=torch.float32)
    ).to(std.device)


def ode_step(velocity: Tensor, x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> StepOutput:
    """Deterministic Euler step, x' = x + (sigma' - sigma) v, in the arithmetic of diffusers'
    `FlowMatchEulerDiscreteScheduler.step`, so that zero noise reproduces the stock pipeline bit for bit in bf16
    too: the state in fp32 and `dt * v` in the velocity's dtype (a 0-dim fp32 dt does not promote a bf16 tensor);
    per-sample sigmas, which diffusers never takes, in fp32. Log-prob 0."""
    x = x.float()
    dt = _expand(sigma_next, x) - _expand(sigma, x)
    mean = x + (dt * velocity if dt.ndim == 0 else dt * velocity.float())
    zero = torch.zeros(x.shape[0], device=x.device)
    return StepOutput(mean, zero, mean, torch.zeros((), device=x.device))
