"""The step math against independent formulas (ALGORITHMS.md §1), torch.distributions and diffusers' Euler step."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowalign.samplers.rollout import noise_stds, sample_step, sde_mask, sde_window
from flowalign.samplers.sde import cps_step, ode_step, sde_step


def _mean_over_dims(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(1)


def _sde_reference(v, x, s, s_next, a, s_max):
    """Flow-GRPO SDE written out independently: returns (mean, per-element std of x')."""
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    s_next = torch.as_tensor(s_next, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    v, x = v.double(), x.double()
    denom = torch.where(s == 1, torch.full_like(s, 1 - s_max), 1 - s)  # sigma = 1 uses the second sigma
    noise_scale = a * torch.sqrt(s / denom)
    dt = s_next - s
    mean = x + (v + noise_scale**2 / (2 * s) * (x + (1 - s) * v)) * dt
    return mean, noise_scale * torch.sqrt(-dt)


def _cps_reference(v, x, s, s_next, a):
    v, x = v.double(), x.double()
    x0, x1 = x - s * v, x + (1 - s) * v
    std = s_next * math.sin(a * math.pi / 2)
    mean = (1 - s_next) * x0 + math.sqrt(s_next**2 - std**2) * x1
    return mean, torch.tensor(std, dtype=torch.float64)


def test_sde_log_prob_hand_computed():
    # x = 1, v = -2, sigma = 0.5, sigma' = 0.25, a = 0.5:
    #   noise scale = 0.5 * sqrt(0.5 / 0.5) = 0.5; dt = -0.25; x + (1 - sigma) v = 1 - 1 = 0
    #   mean = 1 + (-2 + 0.25 / 1 * 0) * (-0.25) = 1.5; std = 0.5 * sqrt(0.25) = 0.25
    #   x' = 1.75 -> z = 1 -> log p = -1/2 - log 0.25 - log sqrt(2 pi) = -0.5 + 1.3862944 - 0.9189385 = -0.0326441
    out = sde_step(
        torch.tensor([[-2.0]]),
        torch.tensor([[1.0]]),
        0.5,
        0.25,
        0.5,
        sigma_max=0.9,
        prev_sample=torch.tensor([[1.75]]),
    )
    assert out.mean.item() == pytest.approx(1.5)
    assert float(out.std) == pytest.approx(0.25)
    assert out.log_prob.item() == pytest.approx(-0.0326441, abs=1e-6)


@pytest.mark.parametrize(
    ("sigma", "sigma_next"),
    [(0.8, 0.6), (1.0, 0.9), (torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.5, 0.1]))],
    ids=["mid", "sigma_one", "per_sample"],
)
def test_sde_log_prob_equals_torch_normal(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, v, x_next = (torch.randn(3, 4, 5, 6, generator=g) for _ in range(3))
    out = sde_step(v, x, sigma, sigma_next, 0.7, sigma_max=0.9, prev_sample=x_next)
    mean, std = _sde_reference(v, x, sigma, sigma_next, 0.7, 0.9)
    expected = _mean_over_dims(torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next.double()))
    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.log_prob.double(), expected, atol=1e-5, rtol=1e-5)
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (3,)


@pytest.mark.parametrize("exact", [True, False])
def test_cps_log_prob_equals_torch_normal(exact):
    g = torch.Generator().manual_seed(1)
    x, v, x_next = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    out = cps_step(v, x, 0.6, 0.4, 0.8, prev_sample=x_next, exact=exact)
    mean, std = _cps_reference(v, x, 0.6, 0.4, 0.8)
    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
    if exact:
        expected = _mean_over_dims(torch.distributions.Normal(mean, std).log_prob(x_next.double()))
    else:  # Flow-GRPO's constant-free version
        expected = -_mean_over_dims((x_next.double() - mean) ** 2)
    torch.testing.assert_close(out.log_prob.double(), expected, atol=1e-5, rtol=1e-5)


def test_cps_at_a1_equals_diffusers_stochastic_sampling_step():
    """`eval_sampler: renoise` is the cps step at a = 1: x' = (1 − σ')·x̂0 + σ'·ε, which is what diffusers'
    `FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)` does. Same noise in, same sample out, every step."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for k, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        stock = scheduler.step(v, t, x, generator=torch.Generator().manual_seed(k), return_dict=False)[0]
        ours = cps_step(
            v, x, scheduler.sigmas[k], scheduler.sigmas[k + 1], 1.0, generator=torch.Generator().manual_seed(k)
        )
        torch.testing.assert_close(ours.prev_sample, stock, atol=1e-6, rtol=1e-6)
        x = stock


@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_step_samples_have_the_stated_mean_and_std(sampler):
    n = 20_000
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, generator=g).expand(n, 16)
    v = torch.randn(1, 16, generator=g).expand(n, 16)
    if sampler == "sde":
        out = sde_step(v, x, 0.7, 0.5, 0.7, sigma_max=0.9, generator=g)
        mean, std = _sde_reference(v[:1], x[:1], 0.7, 0.5, 0.7, 0.9)
    else:
        out = cps_step(v, x, 0.7, 0.5, 0.7, generator=g)
        mean, std = _cps_reference(v[:1], x[:1], 0.7, 0.5, 0.7)
    std = float(std.reshape(-1)[0])
    emp_mean, emp_std = out.prev_sample.double().mean(0), out.prev_sample.double().std(0)
    # 5 standard errors: std/sqrt(n) for the mean, std/sqrt(2n) for the standard deviation.
    assert (emp_mean - mean[0]).abs().max() < 5 * std / math.sqrt(n)
    assert (emp_std - std).abs().max() < 5 * std / math.sqrt(2 * n)


def test_zero_noise_steps_are_the_euler_step():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    euler = x + (0.55 - 0.8) * v
    sde = sde_step(v, x, 0.8, 0.55, 0.0, sigma_max=0.9, generator=g)
    cps = cps_step(v, x, 0.8, 0.55, 0.0, generator=g)
    torch.testing.assert_close(sde.prev_sample, euler, atol=1e-6, rtol=0)
    torch.testing.assert_close(cps.prev_sample, euler, atol=1e-6, rtol=0)  # DDIM-like a = 0 == Euler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ode_step_equals_diffusers_euler_step(dtype):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    for k, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
        stock = scheduler.step(v, t, x, return_dict=False)[0]
        ours = ode_step(v, x, scheduler.sigmas[k], scheduler.sigmas[k + 1])
        assert ours.log_prob.eq(0).all()
        # bit for bit in bf16 too: diffusers forms `dt * model_output` in the model dtype, and so does ode_step
        assert torch.equal(ours.prev_sample.to(dtype), stock)
        x = stock


@pytest.mark.parametrize("sampler", ["sde", "cps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_step_replay_scores_the_kept_sample(sampler, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 4, 4, generator=g).to(dtype)
    v = torch.randn(3, 4, 4, 4, generator=g).to(dtype)
    kw = dict(noise_level=0.7, sigma_max=0.95)
    sampled = sample_step(sampler, v, x, 0.9, 0.7, generator=g, out_dtype=dtype, **kw)
    assert sampled.prev_sample.dtype == dtype
    replayed = sample_step(sampler, v, x, 0.9, 0.7, prev_sample=sampled.prev_sample, **kw)
    assert torch.equal(replayed.log_prob, sampled.log_prob)
    assert torch.isfinite(sampled.log_prob).all()


def test_sample_step_deterministic_cases_have_zero_log_prob():
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    ode = sample_step("sde", v, x, 0.5, 0.3, noise_level=0.7, sigma_max=0.9, stochastic=False)
    zero = sample_step("sde", v, x, 0.5, 0.3, noise_level=0.0, sigma_max=0.9)
    assert ode.log_prob.eq(0).all() and zero.log_prob.eq(0).all()
    torch.testing.assert_close(zero.prev_sample, ode.prev_sample, atol=1e-6, rtol=0)


def test_sample_step_generator_lists_draw_per_sample():
    x, v = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    kw = dict(noise_level=0.7, sigma_max=0.9)
    single = sample_step("sde", v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(7), **kw)
    as_list = sample_step("sde", v, x, 0.8, 0.6, generator=[torch.Generator().manual_seed(7)], **kw)
    assert torch.equal(single.prev_sample, as_list.prev_sample)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = sample_step("sde", v, x, 0.8, 0.6, generator=gens, **kw)
    row = sample_step("sde", v[1:2], x[1:2], 0.8, 0.6, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(batch.prev_sample[1:2], row.prev_sample)


def test_sde_mask_defaults_and_errors():
    assert sde_mask(4).tolist() == [True, True, True, False]
    assert sde_mask(4, []).tolist() == [False] * 4
    assert sde_mask(4, [0, 2]).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="last step"):
        sde_mask(4, [3])
    with pytest.raises(ValueError, match="0..2"):
        sde_mask(4, [-1])


def test_sde_window_variants():
    assert sde_window(10, 2, start=3) == [3, 4]
    assert sde_window(10, 9, start=0) == list(range(9))
    starts = {sde_window(10, 2)[0] for _ in range(200)}
    assert starts <= set(range(0, 4)) and len(starts) > 1  # first half: start in 0..10//2-2
    assert {sde_window(10, 3, max_start=6)[0] for _ in range(300)} == set(range(7))
    a = sde_window(16, 3, generator=torch.Generator().manual_seed(0))
    b = sde_window(16, 3, generator=torch.Generator().manual_seed(0))
    assert a == b and len(a) == 3 and a[-1] < 15
    assert sde_window(3, 2) == [0, 1]  # window longer than half the schedule starts at 0
    for bad in (dict(size=10), dict(size=0), dict(size=2, start=8), dict(size=2, max_start=8)):
        with pytest.raises(ValueError):
            sde_window(10, **bad)


@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_noise_stds_match_the_reference_formulas_on_a_diffusers_schedule(sampler):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.float()
    got = noise_stds(sampler, sigmas, 0.8)
    x = torch.zeros(10, 1)
    if sampler == "sde":
        want = _sde_reference(x, x, sigmas[:-1], sigmas[1:], 0.8, float(sigmas[1]))[1]
    else:
        want = sigmas[1:].double() * math.sin(0.8 * math.pi / 2)
    torch.testing.assert_close(got.double(), want.reshape(-1), rtol=1e-5, atol=1e-7)
    # The schedule ends sigma ~0.009 -> 0: that cps step is nearly collapsed, the default threshold drops it.
    if sampler == "cps":
        assert got[-2] < 0.02 < got[-3]


def test_flow_grpo_kl_std_is_the_reference_noise_scale_and_cps_flow_grpo_its_constant_free_log_prob():
    from flowalign.samplers.sde import STEPS, kl_step_std

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sig, a = scheduler.sigmas.float(), 0.7
    x, v, gen = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.Generator().manual_seed(0)
    for k in range(9):
        s, s_next = float(sig[k]), float(sig[k + 1])
        out = sde_step(v, x, s, s_next, a, sigma_max=sig[1], generator=gen)
        # Flow-GRPO's std_dev_t: a sqrt(sigma / (1 - sigma)), with the schedule's second sigma standing in at 1
        std_dev_t = a * math.sqrt(s / (1 - (float(sig[1]) if s == 1 else s)))
        assert float(kl_step_std("flow_grpo", "sde", out.std, s, s_next)) == pytest.approx(std_dev_t, rel=1e-5)
        cps = cps_step(v, x, s, s_next, 0.9, generator=gen)
        assert torch.equal(kl_step_std("flow_grpo", "cps", cps.std, s, s_next), torch.as_tensor(cps.std))
        ref = STEPS.get("cps_flow_grpo")(v, x, s, s_next, 0.9, prev_sample=cps.prev_sample)
        torch.testing.assert_close(ref.mean, cps.mean, rtol=0, atol=0)
        expected = -((cps.prev_sample - cps.mean) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(ref.log_prob, expected, rtol=1e-6, atol=1e-8)
