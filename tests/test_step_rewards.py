"""TP-GRPO step rewards in the sampler: index alignment, R_0 from the trajectory's own noise, cost accounting."""

import pytest
import torch

from flowalign.adapters import adapter_for
from flowalign.samplers.rollout import rollout, sde_mask
from flowalign.samplers.step_rewards import completion_sigmas, step_rewards
from flowalign.testing import tiny_sd3_pipeline
from flowalign.types import Conditioning, Trajectory


class ConstantAdapter:
    """Velocity 0, so a deterministic completion keeps the state; decode paints the state's mean value."""

    def __init__(self):
        self.calls = 0

    def velocity(self, x, sigma, cond, guidance_scale):
        self.calls += x.shape[0]
        return torch.zeros_like(x)

    def decode(self, x):
        return x.float().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)


def _counter_trajectory(sde_steps, num_steps=8, batch=2):
    """latents[:, j] = (number of stochastic steps taken before state j) squared: R_k = k^2 if aligned."""
    mask = sde_mask(num_steps, sde_steps)
    taken = torch.cat([torch.zeros(1), torch.cumsum(mask.float(), 0)])  # [T+1]
    latents = (taken**2).view(1, -1, 1, 1, 1).expand(batch, -1, 1, 2, 2).clone()
    return Trajectory(
        prompts=["p"] * batch,
        latents=latents,
        log_probs=torch.zeros(batch, num_steps),
        sigmas=torch.linspace(1, 0, num_steps + 1),
        sde_mask=mask,
        cond=Conditioning(torch.zeros(batch, 1, 1)),
        guidance_scale=1.0,
        noise_level=0.7,
        sampler="sde",
    )


def mean_reward(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("sde_steps", [[0, 1, 2], [2, 3, 4], [1, 3, 5]])
def test_step_rewards_land_on_their_transitions(sde_steps):
    traj = _counter_trajectory(sde_steps)
    final = mean_reward(traj.latents[:, -1].expand(-1, 3, -1, -1), traj.prompts)
    sr = step_rewards(ConstantAdapter(), traj, mean_reward, final)
    # R_k = k^2 for k = 0..n: state before the first SDE step, after each SDE step, then the final image.
    assert sr.values.tolist() == [[0.0, 1.0, 4.0, 9.0]] * 2
    # R_0 comes from the state before the first stochastic step; R_k from the state after the k-th.
    assert sr.start_states == [sde_steps[0], sde_steps[0] + 1, sde_steps[1] + 1]
    from flowalign.credit import assign_credit

    out = assign_credit(sr.values, final, torch.tensor([0, 0]), credit="incremental", n=3)
    # d_k = (k+1)^2 - k^2 = 1, 3, 5: the k-th stochastic transition gets exactly its own increment.
    assert out.step_rewards_used.tolist() == [[1.0, 3.0, 5.0]] * 2


@pytest.fixture(scope="module")
def sd3():
    return adapter_for(tiny_sd3_pipeline(seed=0), max_sequence_length=8)


def _reward(images, prompts):
    return images.mean(dim=(1, 2, 3))


PROMPTS = ["a red circle", "a blue square"]


def _rollout(sd3, sde_steps, seed=None, **kw):
    """Six steps of the tiny pipeline for two prompts, guidance 1; noise level 0.9 unless given."""
    kw.setdefault("noise_level", 0.9)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return rollout(sd3, PROMPTS, num_steps=6, guidance_scale=1.0, sde_steps=sde_steps, generator=gen, **kw)


@pytest.mark.parametrize("window", [[0, 1, 2], [2, 3]])
def test_r0_is_the_pure_ode_image_of_the_trajectorys_own_noise(sd3, window):
    prompts = PROMPTS
    traj = _rollout(sd3, window, seed=3)
    torch.manual_seed(123)  # any global random draw inside step_rewards would change R_0 between the two calls
    r0_a = step_rewards(sd3, traj, _reward, _reward(traj.images, prompts)).values[:, 0]
    torch.manual_seed(456)
    r0_b = step_rewards(sd3, traj, _reward, _reward(traj.images, prompts)).values[:, 0]
    ode = _rollout(sd3, [], noise_level=0.0, latents=traj.latents[:, 0])
    assert torch.equal(r0_a, r0_b)
    assert torch.allclose(r0_a, _reward(ode.images, prompts), atol=1e-6)
    other = _rollout(sd3, [], seed=4, noise_level=0.0)
    assert not torch.allclose(r0_a, _reward(other.images, prompts), atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "completion_steps", "expected_per_sample"),
    [
        # T = 6, SDE steps 0..4 (n = 5): completions start at states 0, 1, 2, 3, 4.
        ("ode", None, 6 + 5 + 4 + 3 + 2),  # sum of (T - j)
        ("ode", 3, 3 + 3 + 3 + 3 + 2),  # min(m, T - j)
        ("x0", None, 5),  # one evaluation per completed state
    ],
)
def test_cost_accounting_matches_the_formula(sd3, mode, completion_steps, expected_per_sample):
    prompts = ["a red circle"] * 3
    traj = rollout(
        sd3, prompts, num_steps=6, guidance_scale=4.5, noise_level=0.7, generator=torch.Generator().manual_seed(0)
    )
    counted = {"samples": 0, "calls": 0}
    real = sd3.velocity

    def counting(x, sigma, cond, g):
        counted["samples"] += x.shape[0]
        counted["calls"] += 1
        return real(x, sigma, cond, g)

    sd3.velocity = counting
    try:
        sr = step_rewards(
            sd3, traj, _reward, _reward(traj.images, prompts), mode=mode, completion_steps=completion_steps
        )
    finally:
        del sd3.velocity
    assert counted["samples"] == sr.model_evals == 3 * expected_per_sample
    assert counted["calls"] == expected_per_sample  # each step index runs as ONE batched call
    assert sr.reward_calls == 3 * 6  # n + 1 rewards per trajectory


def test_completion_steps_covering_the_rest_is_the_exact_completion_at_its_cost(sd3):
    # T = 6, SDE on steps 0, 1: R_0, R_1 complete states 0 and 1, R_2 is the rollout's own (ODE-finished) image.
    prompts = ["a red circle"] * 2
    traj = rollout(sd3, prompts, num_steps=6, guidance_scale=4.5, noise_level=0.7, sde_steps=[0, 1])
    final = _reward(traj.images, prompts)
    exact = step_rewards(sd3, traj, _reward, final)
    assert (exact.model_evals, exact.reward_calls) == (2 * (6 + 5), 2 * 3)
    enough = step_rewards(sd3, traj, _reward, final, completion_steps=100)  # >= every state's remaining steps
    assert (enough.model_evals, enough.reward_calls) == (exact.model_evals, exact.reward_calls)
    torch.testing.assert_close(enough.values, exact.values, rtol=0, atol=0)
    coarse = step_rewards(sd3, traj, _reward, final, completion_steps=2)  # an estimate: R_2 completed the same way
    assert (coarse.model_evals, coarse.reward_calls) == (2 * (2 + 2 + 2), 2 * 4)


def test_renoised_gaps_between_trained_steps_are_refused(sd3):
    traj = rollout(
        sd3,
        ["a red circle"] * 2,
        num_steps=6,
        guidance_scale=4.5,
        noise_level=0.7,
        sde_steps=[0, 3],
        untrained="renoise",
    )
    with pytest.raises(ValueError, match="contiguous stochastic steps, got \\[0, 3\\]"):
        step_rewards(sd3, traj, _reward, _reward(traj.images, traj.prompts))


def test_completion_sigmas_keep_endpoints():
    sig = torch.linspace(1, 0, 11)
    sub = completion_sigmas(sig, 2, 3)
    assert sub[0] == sig[2] and sub[-1] == 0 and sub.numel() == 4
    assert torch.equal(completion_sigmas(sig, 2, None), sig[2:])


def test_after_renoised_steps_r_n_is_the_deterministic_completion_not_the_rollout_image(sd3):
    """With re-noised untrained steps after the window, every R_k (R_n too) is an ODE completion, so the last
    increment measures the last SDE step and not the change of sampler."""
    prompts = PROMPTS
    traj = _rollout(sd3, [0, 1], seed=5, untrained="renoise")
    final = _reward(traj.images, prompts)
    sr = step_rewards(sd3, traj, _reward, final)
    assert sr.start_states == [0, 1, 2]
    assert sr.values.shape == (2, 3) and sr.reward_calls == 2 * 4  # 3 completions + the rollout's own images
    # Independent Euler integration from the state after the last SDE step.
    x, s = traj.latents[:, 2], traj.sigmas
    with torch.no_grad():
        for k in range(2, 6):
            x = x + (s[k + 1] - s[k]) * sd3.velocity(x, s[k], traj.cond, traj.guidance_scale)
        ode_image = sd3.decode(x)
    assert torch.allclose(sr.values[:, -1], _reward(ode_image, prompts), atol=1e-5)
    assert not torch.allclose(sr.values[:, -1], final, atol=1e-4)  # the re-noised image is another image
    # With Euler steps after the window the rollout's own image is that completion: no extra work.
    ode_rest = _rollout(sd3, [0, 1], seed=5, latents=traj.latents[:, 0])
    sr_ode = step_rewards(sd3, ode_rest, _reward, _reward(ode_rest.images, prompts))
    assert sr_ode.start_states == [0, 1] and sr_ode.reward_calls == 2 * 3
    assert torch.equal(sr_ode.values[:, -1], _reward(ode_rest.images, prompts))


@pytest.mark.parametrize("mode", ["x0", "coarse"])
def test_an_estimated_completion_gives_r_n_by_the_same_estimate(sd3, mode):
    """R_0..R_{n-1} from one-step x0 estimates (or coarse completions) must not end on the finished image: R_n is the
    same estimate of the state after the last SDE step, computed here by hand."""
    prompts = PROMPTS
    traj = _rollout(sd3, [0, 1], seed=6)  # the steps after the window are ODE steps
    final = _reward(traj.images, prompts)
    kw = {"mode": "x0"} if mode == "x0" else {"completion_steps": 2}
    sr = step_rewards(sd3, traj, _reward, final, **kw)
    assert sr.start_states == [0, 1, 2]
    x, s = traj.latents[:, 2], traj.sigmas
    with torch.no_grad():
        if mode == "x0":
            x = x - s[2] * sd3.velocity(x, s[2], traj.cond, traj.guidance_scale)
        else:  # two Euler steps over the remaining sigmas, as completion_sigmas picks them: s2 -> s4 -> 0
            for a, b in ((s[2], s[4]), (s[4], s[6])):
                x = x + (b - a) * sd3.velocity(x, a, traj.cond, traj.guidance_scale)
        estimate = sd3.decode(x)
    assert torch.allclose(sr.values[:, -1], _reward(estimate, prompts), atol=1e-6)
    assert not torch.equal(sr.values[:, -1], final)  # the finished image is another one (close on this tiny model)
