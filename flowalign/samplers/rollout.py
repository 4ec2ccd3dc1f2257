"""The sampling loop flowalign owns: roll out trajectories with log-probs, and replay one step for training.

One step function serves both: `sample_step` draws x' (sampling) or scores a recorded x' (`prev_sample`, replay)
with the same math from `flowalign.samplers.sde`. The stock-pipeline door (`samplers.scheduler`) calls it too.

Decisions, stated once:
* **Latent dtype.** The state between steps, and the record `Trajectory.latents`, is in the adapter's latent dtype
  (`adapter.dtype`: the dtype the stock pipeline draws its latents in; fp32 for fp32 models, bf16 for bf16
  models). Each step is computed in fp32 and its result cast back, as diffusers'
  `FlowMatchEulerDiscreteScheduler.step` does; the log-prob is that of the value actually kept, so replaying
  the record gives ratio exactly 1.
* **Generator consumption.** `rollout` draws the initial noise first (exactly as the pipeline's
  `prepare_latents`), then one fp32 standard normal of the full batch shape per stochastic step, in step order;
  ODE steps draw nothing; re-noising untrained steps (`untrained="renoise"`) draw one each, in the same order. A
  generator on another device than the latents (a CPU generator with CUDA latents) or a
  list of per-sample generators is handled as diffusers' `randn_tensor` handles it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from flowalign.samplers.sde import STEPS, ode_step
from flowalign.types import Conditioning, FlowAdapter, StepOutput, Trajectory

__all__ = [
    "noise_stds",
    "replay_step",
    "rollout",
    "sample_step",
    "scheduled_step",
    "sde_mask",
    "sde_window",
    "sliding_window_start",
    "window_starts",
]

Generator = torch.Generator | list[torch.Generator]
UNTRAINED = ("ode", "renoise")  # how `rollout` runs the steps it does not record log-probs for


def sde_mask(num_steps: int, sde_steps: Sequence[int] | None = None) -> Tensor:
    """[T] bool mask of stochastic steps. None: every step but the last.

    The last step (to sigma = 0) is never stochastic: its Gaussian collapses (the cps std is exactly 0), so it
    carries no log-prob to train on (Flow-GRPO trains `timestep_fraction` < 1 of the steps for the same reason).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    steps = range(num_steps - 1) if sde_steps is None else [int(k) for k in sde_steps]
    for k in steps:
        if k == num_steps - 1:
            raise ValueError(f"sde_steps contains the last step {k}; it is never stochastic (its Gaussian collapses)")
        if not 0 <= k < num_steps - 1:
            raise ValueError(f"sde_steps entries must be in 0..{num_steps - 2} for num_steps={num_steps}, got {k}")
        mask[k] = True
    return mask


def window_starts(num_steps: int, size: int, max_start: int | None = None) -> range:
    """The first steps a Flow-GRPO-Fast window of `size` may start at: 0..max_start (see `sde_window`)."""
    if not 1 <= size <= num_steps - 1:
        raise ValueError(f"window size must be in 1..{num_steps - 1} for num_steps={num_steps}, got {size}")
    limit = num_steps - 1 - size  # the window must end before the last step
    if max_start is None:
        max_start = min(limit, max(0, num_steps // 2 - size))
    if not 0 <= max_start <= limit:
        raise ValueError(f"max_start must be in 0..{limit} for num_steps={num_steps}, size={size}, got {max_start}")
    return range(max_start + 1)


def sliding_window_start(step: int, shift_every: int, stride: int, max_start: int) -> int:
    """MixGRPO's sliding window (arXiv 2507.21802, Sec. 4.2): the window starts at step 0 and moves `stride` steps
    later every `shift_every` training steps, then stays at the last allowed start (`window_starts(...)[-1]`)."""
    return min(step // shift_every * stride, max_start)


def sde_window(
    num_steps: int,
    size: int,
    *,
    start: int | None = None,
    generator: torch.Generator | None = None,
    max_start: int | None = None,
) -> list[int]:
    """Step indices of a Flow-GRPO-Fast window: SDE on `size` consecutive early steps, ODE elsewhere.

    Args:
        num_steps: T.
        size: window length, 1..T-1 (the last step is never in a window).
        start: first step of the window; None draws it uniformly from 0..max_start with `generator`.
        generator: for the random start (reproducible windows).
        max_start: largest random start. Default: windows lie in the first half of the schedule as in
            Flow-GRPO-Fast (`max(0, T // 2 - size)`), never past step T-2.
    """
    starts = window_starts(num_steps, size, max_start)
    if start is None:
        start = int(torch.randint(0, len(starts), (1,), generator=generator).item())
    elif not 0 <= start <= num_steps - 1 - size:
        raise ValueError(
            f"window start must be in 0..{num_steps - 1 - size} for num_steps={num_steps}, size={size}, got {start}"
        )
    return list(range(start, start + size))


def noise_stds(sampler: str, sigmas: Tensor, noise_level: float) -> Tensor:
    """[T] std of each step's Gaussian under `sampler` on the schedule `sigmas` [T+1].

    Evaluated with the registered step function itself (the std depends on the schedule only), so this cannot
    drift from what sampling does. Why it matters: a step's log-prob gradient scales like 1/std, so a nearly
    collapsed step (diffusers schedules end with sigma ~0.001 before 0) dominates training while its noise
    explores nothing.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    zero = torch.zeros(len(sigmas) - 1, 1)
    out = STEPS.get(sampler)(zero, zero, sigmas[:-1], sigmas[1:], noise_level, sigma_max=sigmas[1], prev_sample=zero)
    return torch.as_tensor(out.std, dtype=torch.float32).expand(len(sigmas) - 1, 1).reshape(-1).clone()


def sample_step(
    sampler: str,
    velocity: Tensor,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    noise_level: float,
    sigma_max: Tensor | float,
    stochastic: bool = True,
    generator: Generator | None = None,
    prev_sample: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> StepOutput:
    """One step x (at sigma) -> x' (at sigma_next): the registered `sampler` step when `stochastic`, else Euler.

    Args:
        sampler: a name in `flowalign.samplers.STEPS` ("sde", "cps", "cps_flow_grpo").
        velocity, x: [B, ...] model velocity (after guidance) and state.
        noise_level: the sampler's `a`.
        sigma_max: the schedule's second sigma (Flow-GRPO's stand-in at sigma = 1).
        stochastic: False runs the deterministic Euler (ODE) step; its log-prob is 0.
        generator: noise source when sampling.
        prev_sample: a recorded x' to score instead of sampling (replay).
        out_dtype: cast x' to this dtype (the state dtype); the log-prob is then that of the cast value.

    Returns: StepOutput; `prev_sample` in `out_dtype` (fp32 if None). A stochastic step whose std is 0
    (noise_level 0) is deterministic and gets log-prob 0 instead of NaN.
    """

    def euler() -> StepOutput:
        out = ode_step(velocity, x, sigma, sigma_next)
        return out if out_dtype is None else replace(out, prev_sample=out.prev_sample.to(out_dtype))

    # an ode step; or noise 0 with no stream to keep aligned (leave torch's global RNG alone)
    if not stochastic or (noise_level == 0 and generator is None and prev_sample is None):
        return euler()
    step = STEPS.get(sampler)

    def run(**kw) -> StepOutput:
        return step(velocity, x, sigma, sigma_next, noise_level, sigma_max=sigma_max, **kw)

    if prev_sample is not None:
        out = run(prev_sample=prev_sample)
    elif generator is None or (isinstance(generator, torch.Generator) and generator.device == x.device):
        out = run(generator=generator)
    else:
        # Per-sample generators or a generator on another device: draw the standard normal where diffusers'
        # randn_tensor draws it, then score x' = mean + std * eps with the same step function.
        probe = run(prev_sample=x)
        eps = randn_tensor(tuple(probe.mean.shape), generator=generator, device=x.device, dtype=torch.float32)
        out = run(prev_sample=probe.mean + probe.std * eps)
    if noise_level == 0 and prev_sample is None:
        # std 0: the Euler step, in the stock scheduler's arithmetic (the noise drawn above, scaled by 0, keeps the
        # generator's stream where any other noise level leaves it)
        return euler()
    if out_dtype is not None and out_dtype != torch.float32:
        kept = out.prev_sample.to(out_dtype)
        out = replace(run(prev_sample=kept), prev_sample=kept)
    if bool((torch.as_tensor(out.std) == 0).all()):
        out = replace(out, log_prob=torch.zeros_like(out.log_prob))
    return out


def scheduled_step(
    sampler: str,
    velocity: Tensor,
    x: Tensor,
    sigmas: Tensor,
    k: int,
    *,
    noise_level: float,
    stochastic: bool,
    untrained: str,
    generator: Generator | None = None,
    out_dtype: torch.dtype | None = None,
) -> StepOutput:
    """Step k of the schedule `sigmas` [T+1] as `rollout` and the stock-pipeline door run it: the `sampler` step where
    it explores (`stochastic` at a noise level above 0), else the `untrained` way: "renoise" (all but the last step
    re-noise the predicted clean image, the cps step at a=1 = diffusers' `stochastic_sampling`) or "ode" (Euler).
    Only an exploring step keeps its log-prob; the others get 0."""
    explores = stochastic and noise_level > 0
    renoise = not explores and untrained == "renoise" and k < len(sigmas) - 2
    out = sample_step(
        "cps" if renoise else sampler,
        velocity,
        x,
        sigmas[k],
        sigmas[k + 1],
        noise_level=1.0 if renoise else noise_level,
        sigma_max=sigmas[1],
        stochastic=stochastic or renoise,
        generator=generator,
        out_dtype=out_dtype,
    )
    return out if explores else replace(out, log_prob=torch.zeros_like(out.log_prob))


@torch.no_grad()
def rollout(
    adapter: FlowAdapter,
    prompts: Sequence[str],
    *,
    num_steps: int,
    guidance_scale: float,
    noise_level: float,
    sampler: str = "sde",
    sde_steps: Sequence[int] | None = None,
    generator: Generator | None = None,
    latents: Tensor | None = None,
    cond: Conditioning | None = None,
    decode: bool = True,
    columns: dict[str, list] | None = None,
    negative_prompt: str = "",
    untrained: str | None = None,
) -> Trajectory:
    """Samples B = len(prompts) trajectories and records everything needed to replay their log-probs.

    Args:
        adapter: the model family's `FlowAdapter`.
        prompts: B prompts (repeat a prompt G times for a group, or pass `cond` already repeated).
        num_steps: T; training may use fewer steps than evaluation, nothing here assumes a value.
        guidance_scale: CFG scale (SD3) / guidance embedding (FLUX); replay uses the recorded value.
        noise_level: the sampler's `a` (SD3 ~0.7, FLUX ~0.9); 0 makes the sampler's steps deterministic (log-prob
            0): with the default `untrained` that reproduces the stock pipeline (bit for bit for an Euler scheduler;
            for one with `stochastic_sampling`, the same re-noising steps with noise from `generator`).
        sampler: "sde" (Flow-GRPO), "cps" (coefficient-preserving) or "cps_flow_grpo" (cps with Flow-GRPO's
            constant-free log-prob) for the stochastic steps.
        sde_steps: indices of stochastic steps (default all but the last; see `sde_window` for Flow-GRPO-Fast);
            their log-probs are recorded and they are the steps training replays.
        untrained: how the other steps (and, at noise_level 0, every step) run: "ode" (Euler) or "renoise" (every
            one but the last re-noises the predicted clean image to the next level, the cps step at a=1 = diffusers'
            `stochastic_sampling`); None = as the pipeline's scheduler runs them. Their log-prob is recorded as 0:
            they are not trained, only sampled the way the model is evaluated.
        generator: consumed for the initial noise (when `latents` is None), then once per stochastic or re-noised
            step.
        latents: [B, ...] initial noise instead of drawing it.
        cond: precomputed encodings with B rows instead of encoding `prompts`.
        decode: also decode the final latents to `images`.
        columns: per-sample extras (lists of length B) forwarded to rewards.
        negative_prompt: the unconditional prompt when CFG is on.

    Returns: Trajectory with latents [B, T+1, ...] (state dtype, see module doc), log_probs [B, T] fp32 (0 on ODE
    steps), sigmas [T+1] fp32 CPU, sde_mask [T] bool CPU, images [B, 3, H, W] fp32 in [0, 1] or None.
    """
    prompts = list(prompts)
    batch = len(prompts)
    if batch == 0:
        raise ValueError("rollout needs at least one prompt")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    STEPS.get(sampler)  # unknown names fail here, listing the valid ones
    if untrained is None:
        untrained = getattr(adapter, "untrained_default", "ode")
    if untrained not in UNTRAINED:
        raise ValueError(f"untrained must be one of {', '.join(UNTRAINED)}, got {untrained!r}")
    mask = sde_mask(num_steps, sde_steps)
    columns = dict(columns or {})
    for name, values in columns.items():
        if len(values) != batch:
            raise ValueError(f"column {name!r} has {len(values)} values for {batch} prompts")

    if cond is None:
        cond = adapter.encode(prompts, guidance_scale, negative_prompt)
    if cond.prompt_embeds.shape[0] != batch:
        raise ValueError(f"cond has {cond.prompt_embeds.shape[0]} rows for {batch} prompts")
    if latents is None:
        latents = adapter.init_noise(batch, generator)
    if latents.shape[0] != batch:
        raise ValueError(f"latents have batch {latents.shape[0]} for {batch} prompts")
    expected = tuple(getattr(adapter, "latent_shape", latents.shape[1:]))
    if tuple(latents.shape[1:]) != expected:  # another size would also need another schedule (dynamic shifting)
        raise ValueError(
            f"latents of shape {tuple(latents.shape[1:])} per sample, but the adapter samples {expected} (its"
            " height and width): build the adapter with the size these latents are for"
        )
    sigmas = adapter.sigmas(num_steps)

    x = latents.to(getattr(adapter, "dtype", latents.dtype))
    states = [x]
    log_probs = torch.zeros(batch, num_steps, dtype=torch.float32, device=x.device)
    for k in range(num_steps):
        v = adapter.velocity(x, sigmas[k], cond, guidance_scale)
        out = scheduled_step(
            sampler,
            v,
            x,
            sigmas,
            k,
            noise_level=noise_level,
            stochastic=bool(mask[k]),
            untrained=untrained,
            generator=generator,
            out_dtype=x.dtype,
        )
        x = out.prev_sample
        states.append(x)
        log_probs[:, k] = out.log_prob
    images = adapter.decode(x) if decode else None
    return Trajectory(
        prompts=prompts,
        latents=torch.stack(states, dim=1),
        log_probs=log_probs,
        sigmas=sigmas,
        sde_mask=mask,
        cond=cond,
        guidance_scale=float(guidance_scale),
        noise_level=float(noise_level),
        sampler=sampler,
        images=images,
        columns=columns,
        untrained=untrained,
    )


def replay_step(adapter: FlowAdapter, traj: Trajectory, k: int) -> StepOutput:
    """Recomputes step k of every trajectory in `traj` under the adapter's *current* transformer.

    Uses the recorded guidance, noise level, sampler and schedule (sigma_max = sigmas[1]) and scores the recorded
    x_{k+1}; gradients flow into the transformer (wrap in `torch.no_grad()` for a reference pass). For an ODE step
    the result is the deterministic Euler step with log-prob 0.

    Returns: StepOutput with log_prob [B] fp32 and the step's mean [B, ...] / std.
    """
    if not 0 <= k < traj.num_steps:
        raise ValueError(f"step k must be in 0..{traj.num_steps - 1}, got {k}")
    # contiguous copies: the model then sees the same memory layout as during sampling (bit-exact in bf16)
    x, x_next, s = traj.latents[:, k].contiguous(), traj.latents[:, k + 1].contiguous(), traj.sigmas
    v = adapter.velocity(x, s[k], traj.cond, traj.guidance_scale)
    return sample_step(
        traj.sampler,
        v,
        x,
        s[k],
        s[k + 1],
        noise_level=traj.noise_level,
        sigma_max=s[1],
        stochastic=bool(traj.sde_mask[k]),
        prev_sample=x_next,
    )
