"""PPO-style clipped policy loss and KL to the reference policy for one trained denoising step.

Flow-GRPO (arXiv 2505.05470, eq. 5/6): ratio = exp(logp_theta - logp_old),
L = mean(max(-A ratio, -A clip(ratio, 1-eps, 1+eps))) + beta KL, where the KL between the policy's and
the reference's Gaussian transitions with a shared std is mean((mean_theta - mean_ref)^2) / (2 std^2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowalign.types import LossOutput


def clipped_policy_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (loss [], ratio [B], clip_frac []) for one step's log-probs [B] and advantages [B]."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_frac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, ratio, clip_frac


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per element, averaged over non-batch dims -> [B]."""
    var = std.float() ** 2
    var = var.reshape(-1) if var.numel() > 1 else var.reshape(())  # [B] per-sample or one shared std
    return ((mean.float() - ref_mean.float()) ** 2).flatten(1).mean(1) / (2 * var)


def policy_step_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    *,
    kl_beta: float = 0.0,
    mean: Tensor | None = None,
    ref_mean: Tensor | None = None,
    std: Tensor | None = None,
) -> LossOutput:
    """Clipped policy loss plus `kl_beta` times the KL to the reference (needs mean, ref_mean, std)."""
    policy_loss, ratio, clip_frac = clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range)
    if kl_beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("kl_beta > 0 needs the policy mean, the reference mean and the step std")
        kl = gaussian_kl(mean, ref_mean, std).mean()
    else:
        kl = torch.zeros((), device=log_prob.device)
    approx_kl = 0.5 * ((log_prob - old_log_prob).detach() ** 2).mean()
    return LossOutput(
        policy_loss + kl_beta * kl, policy_loss.detach(), kl.detach(), clip_frac, ratio.detach(), approx_kl
    )
