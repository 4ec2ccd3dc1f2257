"""The stock-pipeline door: a diffusers scheduler that runs flowalign's SDE step and records log-probs.

Every diffusers flow pipeline calls `self.scheduler.step(noise_pred, t, latents)`, so swapping the scheduler is
enough to sample with log-probs through an unchanged `pipe(...)`:

    scheduler = FlowGRPOScheduler.from_scheduler(pipe.scheduler, noise_level=0.7, generator=generator)
    pipe.scheduler = scheduler
    images = pipe(prompts, generator=generator, ...).images
    steps = scheduler.trajectory()          # latents [B, T+1, ...], log_probs [B, T], sigmas, sde_mask

With the generator that `pipe` draws its initial noise from also set on the scheduler, the noise consumption order
is the one of `flowalign.samplers.rollout` (initial noise, then one draw per stochastic step), so both doors give
the same trajectory for the same seed. The step itself is `rollout.sample_step`, the same code the rollout uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from torch import Tensor

from flowalign.adapters.base import check_scheduler, stock_untrained
from flowalign.samplers.rollout import scheduled_step, sde_mask
from flowalign.samplers.sde import STEPS
from flowalign.types import Conditioning, Trajectory

__all__ = ["FlowGRPOScheduler", "SampledSteps"]


@dataclass(frozen=True)
class SampledSteps:
    """What the scheduler saw during one `pipe(...)` call: the tensors of a `Trajectory` without the prompt side."""

    latents: Tensor  # [B, T+1, ...] in the pipeline's latent dtype
    log_probs: Tensor  # [B, T] fp32; 0 on ODE steps
    sigmas: Tensor  # [T+1] fp32 CPU
    sde_mask: Tensor  # [T] bool CPU
    noise_level: float
    sampler: str

    def to_trajectory(
        self,
        prompts: Sequence[str],
        cond: Conditioning,
        guidance_scale: float,
        *,
        images: Tensor | None = None,
        columns: dict[str, list] | None = None,
    ) -> Trajectory:
        """A full `Trajectory` (replayable with `rollout.replay_step`) given the prompt side of the call.

        `cond` must be the encodings the pipeline used (e.g. from `adapter.encode` with the same
        `max_sequence_length` and guidance scale).
        """
        return Trajectory(
            prompts=list(prompts),
            latents=self.latents,
            log_probs=self.log_probs,
            sigmas=self.sigmas,
            sde_mask=self.sde_mask,
            cond=cond,
            guidance_scale=float(guidance_scale),
            noise_level=self.noise_level,
            sampler=self.sampler,
            images=images,
            columns=dict(columns or {}),
        )


class FlowGRPOScheduler(FlowMatchEulerDiscreteScheduler):
    """`FlowMatchEulerDiscreteScheduler` whose `step` is flowalign's stochastic step with a recorded log-prob.

    Schedules (`set_timesteps`, shifting, `mu`) are inherited unchanged, and so is `stochastic_sampling`: with it,
    the steps that do not explore re-noise as the stock step does. Extra attributes, not part of the saved config:
    `noise_level`, `sampler` ("sde" | "cps" | "cps_flow_grpo"), `sde_steps` (indices of stochastic steps; None =
    all but the last), `generator` (noise for the stochastic steps; a `generator=` passed to `step` wins). Put
    the stock scheduler back before `pipe.save_pretrained`
    (`FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)`): a saved pipeline names its scheduler's
    class, and diffusers loads only its own.
    """

    noise_level: float = 0.7
    sampler: str = "sde"
    sde_steps: Sequence[int] | None = None
    generator: torch.Generator | list[torch.Generator] | None = None

    @classmethod
    def from_scheduler(
        cls,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        noise_level: float = 0.7,
        sampler: str = "sde",
        sde_steps: Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> FlowGRPOScheduler:
        """A FlowGRPOScheduler with `scheduler`'s config (shift, dynamic shifting, `stochastic_sampling`, ...)."""
        check_scheduler(scheduler)
        STEPS.get(sampler)
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        new = cls.from_config(scheduler.config)
        new.noise_level = float(noise_level)
        new.sampler = sampler
        new.sde_steps = None if sde_steps is None else [int(k) for k in sde_steps]
        new.generator = generator
        new._reset_record()
        return new

    def _reset_record(self) -> None:
        self._latents: list[Tensor] = []
        self._log_probs: list[Tensor] = []
        self._mask: list[bool] = []
        self._first = 0  # step index of the first recorded step (img2img pipelines start later)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """As the parent (same signature: pipelines inspect it for `sigmas` / `timesteps`); also starts a new record
        (pipelines call this once per `pipe(...)`)."""
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self._reset_record()

    def _is_stochastic(self, k: int) -> bool:
        # rollout's own mask, so an sde_steps entry out of range or on the last step is refused as it is there
        return bool(sde_mask(len(self.sigmas) - 1, self.sde_steps)[k])

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """The parent's signature; x' comes from `sample_step` (fp32 math) cast to `model_output.dtype` as the stock
        step does. `s_churn`, `s_tmin`, `s_tmax`, `s_noise` are unused by flow schedulers and ignored here."""
        del s_churn, s_tmin, s_tmax, s_noise
        if per_token_timesteps is not None:
            raise ValueError("FlowGRPOScheduler does not support per_token_timesteps")
        if isinstance(timestep, int) or (isinstance(timestep, Tensor) and not timestep.is_floating_point()):
            raise ValueError("pass one of `scheduler.timesteps` as the timestep, not an integer index")
        if self.step_index is None:
            self._init_step_index(timestep)
        k = self.step_index
        if k == 0 or not self._latents:
            self._reset_record()
            self._first = k
            self._latents.append(sample.detach())
        stochastic = self._is_stochastic(k)
        # the other steps run as the stock scheduler would: Euler, or re-noising where `stochastic_sampling` is set
        out = scheduled_step(
            self.sampler,
            model_output,
            sample,
            self.sigmas.float(),
            k,
            noise_level=self.noise_level,
            stochastic=stochastic,
            untrained=stock_untrained(self),
            generator=generator if generator is not None else self.generator,
            out_dtype=model_output.dtype,
        )
        prev_sample = out.prev_sample
        self._latents.append(prev_sample.detach())
        self._log_probs.append(out.log_prob.detach().float())
        self._mask.append(stochastic)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    def trajectory(self) -> SampledSteps:
        """The record of the latest `pipe(...)` call (steps taken so far if called mid-way)."""
        if not getattr(self, "_log_probs", None):  # also a scheduler made by from_config / from_pretrained
            raise ValueError("nothing recorded yet: run the pipeline with this scheduler first")
        dtype = self._latents[-1].dtype
        n = len(self._log_probs)
        return SampledSteps(
            latents=torch.stack([x.to(dtype) for x in self._latents], dim=1),
            log_probs=torch.stack(self._log_probs, dim=1),
            sigmas=self.sigmas[self._first : self._first + n + 1].detach().to(device="cpu", dtype=torch.float32),
            sde_mask=torch.tensor(self._mask, dtype=torch.bool),
            noise_level=self.noise_level,
            sampler=self.sampler,
        )
