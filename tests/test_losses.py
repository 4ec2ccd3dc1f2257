"""Clipped policy loss and KL on hand-computed numbers."""

import math

import torch

from flowalign.losses import clipped_policy_loss, gaussian_kl, policy_step_loss


def test_clipped_loss_hand_example():
    # ratio = exp([0, 0.1, -0.1]) = [1, 1.10517, 0.904837]; eps = 0.05
    # sample 0 (A=+1): max(-1, -1)                  = -1
    # sample 1 (A=+1): max(-1.10517, -1.05)          = -1.05   (clipped side wins: no incentive past 1+eps)
    # sample 2 (A=-1): max(0.904837, 0.95)            = 0.95    (clipped side wins)
    # mean = (-1 - 1.05 + 0.95) / 3 = -0.366667; clip fraction = 2/3
    logp = torch.tensor([0.0, 0.1, -0.1], requires_grad=True)
    loss, ratio, clip_frac = clipped_policy_loss(logp, torch.zeros(3), torch.tensor([1.0, 1.0, -1.0]), 0.05)
    assert math.isclose(loss.item(), -1.1 / 3, rel_tol=1e-6)
    assert torch.allclose(ratio, torch.exp(torch.tensor([0.0, 0.1, -0.1])))
    assert math.isclose(clip_frac.item(), 2 / 3, rel_tol=1e-6)
    loss.backward()
    # Only the unclipped sample carries gradient: d/dlogp (-A ratio / 3) = -1/3 at ratio 1.
    assert torch.allclose(logp.grad, torch.tensor([-1 / 3, 0.0, 0.0]), atol=1e-7)


def test_negative_advantage_pessimistic_side():
    # A = -2, ratio = exp(-0.2) = 0.818731 < 1 - eps (0.9): unclipped 1.637462, clipped 1.8 -> max 1.8
    loss, _, _ = clipped_policy_loss(torch.tensor([-0.2]), torch.zeros(1), torch.tensor([-2.0]), 0.1)
    assert math.isclose(loss.item(), 1.8, rel_tol=1e-6)
    # ratio above 1 + eps with negative advantage is NOT clipped (pessimistic bound): exp(0.2) * 2
    loss, _, _ = clipped_policy_loss(torch.tensor([0.2]), torch.zeros(1), torch.tensor([-2.0]), 0.1)
    assert math.isclose(loss.item(), 2 * math.exp(0.2), rel_tol=1e-6)


def test_gaussian_kl_matches_closed_form():
    # means differ by [1, 2] with std 0.5: mean((1, 4)) / (2 * 0.25) = 2.5 / 0.5 = 5
    kl = gaussian_kl(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.tensor(0.5))
    assert torch.allclose(kl, torch.tensor([5.0]))
    # Against torch.distributions on random numbers, per-sample std.
    g = torch.Generator().manual_seed(0)
    m, r = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    std = torch.tensor([0.3, 0.7, 1.1])
    ref = torch.stack(
        [
            torch.distributions.kl_divergence(
                torch.distributions.Normal(m[i], std[i]), torch.distributions.Normal(r[i], std[i])
            ).mean()
            for i in range(3)
        ]
    )
    assert torch.allclose(gaussian_kl(m, r, std), ref, atol=1e-6)


def test_policy_step_loss_adds_kl():
    out = policy_step_loss(
        torch.zeros(2),
        torch.zeros(2),
        torch.ones(2),
        0.1,
        kl_beta=0.5,
        mean=torch.ones(2, 3),
        ref_mean=torch.zeros(2, 3),
        std=torch.tensor(1.0),
    )
    # policy loss -1 (ratio 1, A 1); KL = 1 / 2 = 0.5 per sample; total = -1 + 0.5 * 0.5
    assert math.isclose(out.loss.item(), -0.75, rel_tol=1e-6)
    assert math.isclose(out.kl.item(), 0.5, rel_tol=1e-6)
