"""Typed records that flow between stages: sampler -> reward -> credit -> loss.

Shape letters: P prompts, G group size, B = P*G samples, T sampling steps, C,h,w latent dims (adapter
native; FLUX latents are packed [L, C]), H,W image size, L text tokens, D text width.
Sigma runs 1 (noise) -> 0 (data); `latents[:, k]` is the state at `sigmas[k]` and step k maps it to
`latents[:, k+1]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """Prompt encodings, computed once under no_grad. `neg_*` hold the unconditional half when CFG is on."""

    prompt_embeds: Tensor  # [B, L, D]
    pooled_embeds: Tensor | None = None  # [B, Dp] (SD3 pooled CLIP, FLUX pooled CLIP)
    neg_prompt_embeds: Tensor | None = None  # [B, L, D]; None when CFG is off
    neg_pooled_embeds: Tensor | None = None  # [B, Dp]
    text_ids: Tensor | None = None  # FLUX [L, 3]; shared by the batch, never indexed

    def select(self, idx: Tensor | slice | list[int]) -> Conditioning:
        """Rows `idx` of every batched field."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value if value is None or f.name == "text_ids" else value[idx]
        return Conditioning(**out)

    def repeat(self, group_size: int) -> Conditioning:
        """Each row repeated `group_size` times in a row (prompt p -> samples p*G .. p*G+G-1)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            keep = value is None or f.name == "text_ids"
            out[f.name] = value if keep else value.repeat_interleave(group_size, dim=0)
        return Conditioning(**out)

    @property
    def has_uncond(self) -> bool:
        return self.neg_prompt_embeds is not None


@dataclass(frozen=True)
class StepOutput:
    """One sampler step x (at sigma) -> x' (at sigma_next)."""

    prev_sample: Tensor  # [B, ...] x'
    log_prob: Tensor  # [B] log p(x'|x) averaged over non-batch dims; 0 for deterministic steps
    mean: Tensor  # [B, ...] mean of the Gaussian transition (fp32)
    std: Tensor  # [] or [B] per-element std of the transition (0 for deterministic steps)


@dataclass(frozen=True)
class Trajectory:
    """A batch of sampled trajectories with everything needed to replay their log-probs."""

    prompts: list[str]  # B
    latents: Tensor  # [B, T+1, ...] x_0 = initial noise ... x_T = final latents
    log_probs: Tensor  # [B, T] fp32; 0 where the step was deterministic
    sigmas: Tensor  # [T+1] fp32, 1 -> 0 (the pipeline scheduler's own schedule)
    sde_mask: Tensor  # [T] bool: stochastic steps (the ones that are trained)
    cond: Conditioning  # B rows
    guidance_scale: float
    noise_level: float
    sampler: str  # "sde" | "cps" | "cps_flow_grpo"
    images: Tensor | None = None  # [B, 3, H, W] in [0, 1]
    columns: dict[str, list] = field(default_factory=dict)  # per-sample extras forwarded to rewards
    untrained: str = "ode"  # how the untrained steps ran: "ode" (Euler) | "renoise" (stochastic, see rollout)

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    def select(self, idx: Tensor | list[int]) -> Trajectory:
        idx_list = idx.tolist() if isinstance(idx, Tensor) else list(idx)
        return replace(
            self,
            prompts=[self.prompts[i] for i in idx_list],
            latents=self.latents[idx_list],
            log_probs=self.log_probs[idx_list],
            cond=self.cond.select(idx_list),
            images=None if self.images is None else self.images[idx_list],
            columns={k: [v[i] for i in idx_list] for k, v in self.columns.items()},
        )


@dataclass(frozen=True)
class Advantages:
    """Per-sample, per-step advantages and which (sample, step) pairs are trained."""

    values: Tensor  # [B, T] fp32
    train_mask: Tensor  # [B, T] bool


@dataclass(frozen=True)
class LossOutput:
    """The policy loss of one trained step and the statistics the trainer logs."""

    loss: Tensor  # [] (with grad)
    policy_loss: Tensor  # []
    kl: Tensor  # []
    clip_frac: Tensor  # [] fraction of samples whose ratio left [1-eps, 1+eps]
    ratio: Tensor  # [B] detached
    approx_kl: Tensor  # [] 0.5 * mean((logp - logp_old)^2)


class FlowAdapter(Protocol):
    """What the samplers and trainer need from a diffusers flow pipeline (one adapter per model family)."""

    pipe: object
    transformer: torch.nn.Module
    timestep_per_sigma: float  # the transformer's `timestep` argument is sigma times this

    def encode(self, prompts: list[str], guidance_scale: float, negative_prompt: str = "") -> Conditioning:
        """Text encodings for `prompts`; with CFG (`guidance_scale > 1` for true-CFG families) also the
        negative ones."""

    def init_noise(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Initial latents [B, ...] drawn exactly as the stock pipeline's `prepare_latents` draws them."""

    def sigmas(self, num_steps: int) -> Tensor:
        """[T+1] fp32 sigma schedule of the pipeline's own scheduler (shift / dynamic shifting), ending at 0."""

    def velocity(self, latents: Tensor, sigma: Tensor, cond: Conditioning, guidance_scale: float) -> Tensor:
        """Model velocity at `sigma` (a scalar tensor), with classifier-free guidance applied when on."""

    def decode(self, latents: Tensor) -> Tensor:
        """Final latents -> images [B, 3, H, W] in [0, 1]."""
