"""The stock-pipeline door: FlowGRPOScheduler inside an unchanged `pipe(...)` equals the adapter rollout."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from flowalign.adapters import adapter_for
from flowalign.samplers.rollout import replay_step, rollout
from flowalign.samplers.scheduler import FlowGRPOScheduler

PROMPTS = ["a red circle", "two blue squares"]
MSL = 8


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _door_call(pipe, adapter, steps, guidance, seed, **door):
    """pipe(...) with the door; one generator feeds the initial noise and then the step noise, as in rollout."""
    gen = _gen(seed)
    scheduler = FlowGRPOScheduler.from_scheduler(pipe.scheduler, generator=gen, **door)
    stock, pipe.scheduler = pipe.scheduler, scheduler
    try:
        latents = pipe(
            PROMPTS,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            max_sequence_length=adapter.max_sequence_length,
            height=adapter.height,
            width=adapter.width,
            output_type="latent",
        ).images
    finally:
        pipe.scheduler = stock
    return latents, scheduler.trajectory()


@pytest.mark.parametrize(
    ("family", "guidance", "sampler"),
    [("sd3", 4.5, "sde"), ("sd3", 4.5, "cps"), ("flux", 3.5, "sde")],
    ids=["sd3-cfg-sde", "sd3-cfg-cps", "flux-sde"],
)
def test_door_matches_adapter_rollout(request, family, guidance, sampler):
    pipe = request.getfixturevalue(f"tiny_{family}")
    adapter = adapter_for(pipe, max_sequence_length=MSL)
    traj = rollout(
        adapter,
        PROMPTS,
        num_steps=5,
        guidance_scale=guidance,
        noise_level=0.7,
        sampler=sampler,
        generator=_gen(11),
        decode=False,
    )
    final, steps = _door_call(pipe, adapter, 5, guidance, 11, noise_level=0.7, sampler=sampler)
    assert torch.equal(steps.sigmas, traj.sigmas) and torch.equal(steps.sde_mask, traj.sde_mask)
    assert steps.latents.shape == traj.latents.shape
    assert (steps.latents - traj.latents).abs().max() <= 1e-5
    assert (steps.log_probs - traj.log_probs).abs().max() <= 1e-5
    assert torch.equal(steps.latents[:, -1], final)

    # The door's record is a trainable Trajectory: replay gives ratio 1.
    door_traj = steps.to_trajectory(PROMPTS, traj.cond, guidance)
    with torch.no_grad():
        for k in range(3):
            ratio = torch.exp(replay_step(adapter, door_traj, k).log_prob - door_traj.log_probs[:, k])
            assert (ratio - 1).abs().max() <= 1e-6


def test_door_at_zero_noise_reproduces_the_stock_scheduler(tiny_sd3):
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    stock = tiny_sd3(
        PROMPTS,
        num_inference_steps=5,
        guidance_scale=4.5,
        generator=_gen(2),
        max_sequence_length=MSL,
        output_type="latent",
    ).images
    final, steps = _door_call(tiny_sd3, adapter, 5, 4.5, 2, noise_level=0.0)
    assert (final - stock).abs().max() <= 1e-5
    assert steps.log_probs.eq(0).all()


def test_door_respects_sde_steps_and_restarts_its_record(tiny_flux):
    adapter = adapter_for(tiny_flux, max_sequence_length=MSL)
    scheduler = FlowGRPOScheduler.from_scheduler(
        tiny_flux.scheduler, noise_level=0.9, sde_steps=[1], generator=_gen(0)
    )
    tiny_flux.scheduler = scheduler
    call = dict(guidance_scale=3.5, max_sequence_length=MSL, output_type="latent")
    tiny_flux(PROMPTS, num_inference_steps=6, generator=_gen(0), **call)
    tiny_flux(PROMPTS[:1], num_inference_steps=3, generator=_gen(0), **call)
    steps = scheduler.trajectory()  # the latest call only
    assert steps.latents.shape == (1, 4, *adapter.latent_shape)
    assert steps.sde_mask.tolist() == [False, True, False]
    assert steps.log_probs[0, 1] != 0 and steps.log_probs[0, [0, 2]].eq(0).all()


def test_door_step_contract():
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    door = FlowGRPOScheduler.from_scheduler(base, noise_level=0.7, generator=_gen(0))
    assert door.config.shift == 3.0 and isinstance(door, FlowMatchEulerDiscreteScheduler)
    door.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    out = door.step(torch.randn(2, 4, 8, 8), door.timesteps[0], x)
    assert isinstance(out, FlowMatchEulerDiscreteSchedulerOutput) and out.prev_sample.dtype == torch.float32
    tup = door.step(
        torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), door.timesteps[1], out.prev_sample, return_dict=False
    )
    assert isinstance(tup, tuple) and tup[0].dtype == torch.bfloat16  # cast to model_output's dtype, as stock
    with pytest.raises(ValueError, match="integer"):
        door.step(torch.randn(2, 4, 8, 8), 1, x)
    with pytest.raises(ValueError, match="valid: cps, cps_flow_grpo, sde"):
        FlowGRPOScheduler.from_scheduler(base, sampler="ddim")
    with pytest.raises(ValueError, match="nothing recorded"):
        FlowGRPOScheduler.from_scheduler(base).trajectory()
    # sde_steps beyond the schedule (a window meant for more steps) is refused, as rollout refuses it
    far = FlowGRPOScheduler.from_scheduler(base, noise_level=0.7, sde_steps=[5], generator=_gen(0))
    far.set_timesteps(4)
    with pytest.raises(ValueError, match=r"sde_steps entries must be in 0..2 for num_steps=4, got 5"):
        far.step(torch.randn(2, 4, 8, 8), far.timesteps[0], x)
    last = FlowGRPOScheduler.from_scheduler(base, noise_level=0.7, sde_steps=[3], generator=_gen(0))
    last.set_timesteps(4)
    with pytest.raises(ValueError, match="contains the last step 3"):
        last.step(torch.randn(2, 4, 8, 8), last.timesteps[0], x)


def _stochastic_sampling(pipe):
    """The pipeline with its scheduler re-noising every step (diffusers' `stochastic_sampling`, the shapes model's)."""
    from flowalign.zoo.pretrain import set_stochastic

    set_stochastic(pipe, True)
    return pipe


def test_zero_noise_follows_a_stochastic_sampling_scheduler_as_stock_does(tiny_sd3):
    pipe = _stochastic_sampling(tiny_sd3)
    adapter = adapter_for(pipe, max_sequence_length=MSL)
    call = dict(num_inference_steps=5, guidance_scale=4.5, max_sequence_length=MSL, output_type="latent")
    # Stock SD3 does not pass its generator to the scheduler: the re-noising draws come from torch's global RNG.
    torch.manual_seed(5)
    stock = pipe(PROMPTS, generator=_gen(2), **call).images
    pipe.scheduler = FlowGRPOScheduler.from_scheduler(pipe.scheduler, noise_level=0.0)
    torch.manual_seed(5)
    door = pipe(PROMPTS, generator=_gen(2), **call).images
    torch.testing.assert_close(door, stock, rtol=0, atol=1e-5)
    assert pipe.scheduler.trajectory().log_probs.eq(0).all()
    # rollout at noise 0 re-noises too, from its generator; the door given that generator draws the same noise
    traj = rollout(adapter, PROMPTS, num_steps=5, guidance_scale=4.5, noise_level=0.0, generator=_gen(3))
    assert traj.untrained == "renoise" and traj.log_probs.eq(0).all()
    door, _ = _door_call(pipe, adapter, 5, 4.5, 3, noise_level=0.0)
    torch.testing.assert_close(traj.latents[:, -1], door, rtol=0, atol=1e-5)
    euler = rollout(
        adapter, PROMPTS, num_steps=5, guidance_scale=4.5, noise_level=0.0, generator=_gen(3), untrained="ode"
    )
    assert (euler.latents[:, -1] - door).abs().max() > 0.1


def test_zero_noise_without_a_generator_leaves_the_global_rng_alone(tiny_sd3):
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    latents = adapter.init_noise(2, _gen(0))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    rollout(adapter, PROMPTS, num_steps=4, guidance_scale=4.5, noise_level=0.0, latents=latents, decode=False)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_schedulers_flowalign_cannot_reproduce_are_refused(tiny_sd3):
    from diffusers import FlowMatchHeunDiscreteScheduler

    euler = tiny_sd3.scheduler
    tiny_sd3.scheduler = FlowMatchHeunDiscreteScheduler.from_config(euler.config)
    with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler: put one back"):
        adapter_for(tiny_sd3, max_sequence_length=MSL)
    with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler"):
        FlowGRPOScheduler.from_scheduler(tiny_sd3.scheduler)
    with pytest.raises(ValueError, match="invert_sigmas"):
        FlowGRPOScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(invert_sigmas=True))
    tiny_sd3.scheduler = euler
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    wrong = torch.randn(2, adapter.latent_shape[0], 6, 8)  # latents for another image size
    with pytest.raises(ValueError, match="build the adapter with the size"):
        rollout(adapter, PROMPTS, num_steps=4, guidance_scale=4.5, noise_level=0.7, latents=wrong)
    with pytest.raises(ValueError, match="nothing recorded"):
        FlowGRPOScheduler.from_config(euler.config).trajectory()
