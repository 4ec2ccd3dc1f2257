"""Adapters + rollout against the stock diffusers pipelines (tiny SD3 and FLUX, CPU, no network).

Invariants: zero noise reproduces `pipe(...)`; replayed log-probs equal sampled ones before any update (ratio 1),
with a LoRA that really changes the model; seeds make trajectories reproducible; missing models fail clearly.
"""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model, inject_adapter_in_model

from flowalign.adapters import FluxAdapter, SD3Adapter, adapter_for, load_pipeline
from flowalign.samplers.rollout import replay_step, rollout, sde_window

PROMPTS = ["a red circle", "two blue squares"]
MSL = 8  # max_sequence_length: short keeps the tiny models fast; the stock calls pass the same value


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stock(pipe, adapter, steps, guidance, seed=0, **kw):
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=_gen(seed),
        max_sequence_length=adapter.max_sequence_length,
        height=adapter.height,
        width=adapter.width,
        **kw,
    ).images


def _lora(transformer: torch.nn.Module, seed: int = 0) -> None:
    """Injects a rank-4 LoRA with non-zero B (so it changes outputs) into `transformer` in place."""
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), transformer)
    g = _gen(seed)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data = 0.05 * torch.randn(p.shape, generator=g)


# -- zero noise == the stock pipeline ---------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["sde", "cps"])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_sd3_zero_noise_reproduces_stock_pipeline(tiny_sd3, guidance, sampler):
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    assert isinstance(adapter, SD3Adapter) and adapter.family == "sd3"
    traj = rollout(
        adapter,
        PROMPTS,
        num_steps=6,
        guidance_scale=guidance,
        noise_level=0.0,
        sampler=sampler,
        generator=_gen(0),
        decode=False,
    )
    assert traj.cond.has_uncond == (guidance > 1)
    # Same generator seed: init_noise must draw exactly what prepare_latents draws.
    stock = _stock(tiny_sd3, adapter, 6, guidance, output_type="latent")
    assert (traj.latents[:, -1] - stock).abs().max() <= 1e-5
    # And from the very same latents.
    stock = _stock(tiny_sd3, adapter, 6, guidance, output_type="latent", latents=traj.latents[:, 0])
    assert (traj.latents[:, -1] - stock).abs().max() <= 1e-5


def test_sd3_images_match_stock_decode(tiny_sd3):
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    traj = rollout(adapter, PROMPTS, num_steps=4, guidance_scale=4.5, noise_level=0.0, generator=_gen(1))
    stock = _stock(tiny_sd3, adapter, 4, 4.5, seed=1, output_type="pt")
    assert traj.images.shape == (2, 3, adapter.height, adapter.width) and traj.images.dtype == torch.float32
    assert 0 <= traj.images.min() and traj.images.max() <= 1
    assert (traj.images - stock).abs().max() <= 1e-5


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_flux_zero_noise_reproduces_stock_pipeline(tiny_flux, true_cfg):
    adapter = adapter_for(tiny_flux, max_sequence_length=MSL, true_cfg_scale=true_cfg)
    assert isinstance(adapter, FluxAdapter) and adapter.family == "flux"
    traj = rollout(adapter, PROMPTS, num_steps=5, guidance_scale=3.5, noise_level=0.0, generator=_gen(0))
    extra = dict(negative_prompt="", true_cfg_scale=true_cfg) if true_cfg > 1 else {}
    stock = _stock(tiny_flux, adapter, 5, 3.5, output_type="latent", **extra)
    assert traj.latents.shape[2:] == adapter.latent_shape == stock.shape[1:]
    assert (traj.latents[:, -1] - stock).abs().max() <= 1e-5
    images = _stock(tiny_flux, adapter, 5, 3.5, output_type="pt", **extra)
    assert (traj.images - images).abs().max() <= 1e-5


def test_flux_guidance_embedding_changes_velocity(tiny_flux):
    adapter = adapter_for(tiny_flux, max_sequence_length=MSL)
    cond = adapter.encode(PROMPTS, 3.5)
    x = adapter.init_noise(2, _gen(0))
    with torch.no_grad():
        assert not torch.allclose(adapter.velocity(x, 0.5, cond, 1.0), adapter.velocity(x, 0.5, cond, 3.5))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sigmas_are_the_pipeline_schedule_and_leave_the_pipe_alone(request, family):
    pipe = request.getfixturevalue(f"tiny_{family}")
    adapter = adapter_for(pipe, max_sequence_length=MSL)
    before = pipe.scheduler.sigmas.clone()
    for steps in (3, 7):
        sigmas = adapter.sigmas(steps)
        assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
        assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    assert torch.equal(pipe.scheduler.sigmas, before)  # computed on a copy
    _stock(pipe, adapter, 7, 1.0, output_type="latent")
    assert torch.equal(adapter.sigmas(7), pipe.scheduler.sigmas.cpu())


# -- replay: ratio 1 before any update, with a LoRA attached ----------------------------------------------------
@pytest.mark.parametrize(
    ("family", "cfg", "sampler"),
    [("sd3", 4.5, "sde"), ("sd3", 1.0, "sde"), ("sd3", 4.5, "cps"), ("flux", 1.0, "sde"), ("flux", 2.0, "sde")],
    ids=["sd3-cfg", "sd3-nocfg", "sd3-cfg-cps", "flux", "flux-truecfg"],
)
def test_replayed_log_probs_equal_sampled_with_lora(request, family, cfg, sampler):
    pipe = request.getfixturevalue(f"tiny_{family}")
    if family == "sd3":
        adapter, guidance = adapter_for(pipe, max_sequence_length=MSL), cfg
    else:
        adapter, guidance = adapter_for(pipe, max_sequence_length=MSL, true_cfg_scale=cfg), 3.5
    cond = adapter.encode(PROMPTS[:1], guidance)
    x = adapter.init_noise(1, _gen(0))
    with torch.no_grad():
        base = adapter.velocity(x, 0.6, cond, guidance)
    _lora(adapter.transformer)
    with torch.no_grad():
        assert (adapter.velocity(x, 0.6, cond, guidance) - base).abs().max() > 1e-3  # the LoRA is live

    traj = rollout(
        adapter,
        PROMPTS * 2,
        num_steps=4,
        guidance_scale=guidance,
        noise_level=0.7,
        sampler=sampler,
        generator=_gen(3),
        decode=False,
    )
    assert traj.sde_mask.tolist() == [True, True, True, False]
    assert (traj.log_probs[:, :3] != 0).all() and (traj.log_probs[:, 3] == 0).all()
    sub = traj.select([3, 1, 0])  # a trainer-style minibatch
    lora = [p for n, p in adapter.transformer.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    for k in range(traj.num_steps):
        out = replay_step(adapter, sub, k)
        ratio = torch.exp(out.log_prob - sub.log_probs[:, k])
        assert (ratio - 1).abs().max() <= 1e-6, (k, ratio)
        if sub.sde_mask[k]:
            assert out.log_prob.requires_grad  # gradients reach the LoRA
    torch.autograd.grad(replay_step(adapter, sub, 0).log_prob.sum(), lora[0])


@pytest.mark.parametrize("sampler", ["sde", "cps"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_bf16_zero_noise_reproduces_stock_pipeline_bit_for_bit(family, sampler):
    """In bf16 the stock scheduler forms dt * v in the model dtype; a = 0 (stochastic steps at zero noise, and the
    ODE steps) must do the same, or evaluation drifts from what users' `pipe(...)` draws."""
    from flowalign.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = (tiny_sd3_pipeline if family == "sd3" else tiny_flux_pipeline)(seed=0, dtype=torch.bfloat16)
    adapter = adapter_for(pipe, max_sequence_length=MSL)
    steps = dict(num_steps=8, guidance_scale=4.5, sampler=sampler, noise_level=0.0, decode=False)
    everywhere = rollout(adapter, PROMPTS, generator=_gen(0), **steps)
    window = rollout(adapter, PROMPTS, generator=_gen(0), sde_steps=[2, 3], **steps)  # the others: ODE steps
    stock = _stock(pipe, adapter, 8, 4.5, output_type="latent")
    assert torch.equal(everywhere.latents[:, -1], stock) and torch.equal(window.latents[:, -1], stock)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_bf16_record_replays_exactly(family):
    from flowalign.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = (tiny_sd3_pipeline if family == "sd3" else tiny_flux_pipeline)(seed=0, dtype=torch.bfloat16)
    adapter = adapter_for(pipe, max_sequence_length=MSL)
    assert adapter.dtype == torch.bfloat16
    traj = rollout(adapter, PROMPTS * 2, num_steps=4, guidance_scale=4.5, noise_level=0.7, generator=_gen(0))
    assert traj.latents.dtype == torch.bfloat16 and traj.log_probs.dtype == torch.float32
    assert traj.images.dtype == torch.float32 and torch.isfinite(traj.log_probs).all()
    sub = traj.select([2, 0])
    with torch.no_grad():
        for k in range(3):  # strided views of the bf16 record must give bit-identical velocities
            assert torch.equal(replay_step(adapter, sub, k).log_prob, sub.log_probs[:, k])


def test_peft_wrapped_transformer_is_used(tiny_sd3):
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    cond = adapter.encode(PROMPTS, 4.5)
    x = adapter.init_noise(2, _gen(0))
    with torch.no_grad():
        base = adapter.velocity(x, 0.5, cond, 4.5)
    wrapped = get_peft_model(adapter.transformer, LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    adapter.transformer = wrapped  # sets pipe.transformer too
    assert tiny_sd3.transformer is wrapped
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    with torch.no_grad():
        assert (adapter.velocity(x, 0.5, cond, 4.5) - base).abs().max() > 1e-3
        with wrapped.disable_adapter():
            assert torch.equal(adapter.velocity(x, 0.5, cond, 4.5), base)  # the KL reference
    traj = rollout(adapter, PROMPTS, num_steps=3, guidance_scale=4.5, noise_level=0.7, generator=_gen(0))
    with torch.no_grad():
        assert torch.equal(replay_step(adapter, traj, 0).log_prob, traj.log_probs[:, 0])


# -- determinism, windows, step counts --------------------------------------------------------------------------
def test_same_seed_same_trajectory_different_seed_different(tiny_sd3):
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    run = lambda seed: rollout(
        adapter, PROMPTS, num_steps=4, guidance_scale=4.5, noise_level=0.7, generator=_gen(seed), decode=False
    )
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.allclose(a.latents[:, 0], c.latents[:, 0])
    # Same initial noise, different step noise: the generator is consumed after the initial draw.
    d = rollout(
        adapter,
        PROMPTS,
        num_steps=4,
        guidance_scale=4.5,
        noise_level=0.7,
        generator=_gen(1),
        latents=a.latents[:, 0],
        decode=False,
    )
    assert torch.equal(d.latents[:, 0], a.latents[:, 0]) and not torch.allclose(d.latents[:, 1], a.latents[:, 1])


@pytest.mark.parametrize("untrained", ["ode", "renoise"])
def test_rollout_with_sde_window_and_other_step_counts(tiny_sd3, untrained):
    """Only the window's steps record log-probs, and they replay exactly; the others are Euler steps, or with
    `untrained="renoise"` re-noised ones (a replay, which computes Euler, then misses them) except the last."""
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    cond = adapter.encode(PROMPTS, 4.5)
    window = sde_window(6, 2, start=1)
    traj = rollout(
        adapter,
        PROMPTS,
        num_steps=6,
        guidance_scale=4.5,
        noise_level=0.8,
        sde_steps=window,
        cond=cond,
        generator=_gen(0),
        decode=False,
        columns={"id": [0, 1]},
        untrained=untrained,
    )
    assert traj.sde_mask.tolist() == [False, True, True, False, False, False]
    assert (traj.log_probs[:, [0, 3, 4, 5]] == 0).all() and (traj.log_probs[:, 1:3] != 0).all()
    assert traj.columns == {"id": [0, 1]} and traj.images is None
    with torch.no_grad():
        for k in window:
            assert torch.equal(replay_step(adapter, traj, k).log_prob, traj.log_probs[:, k])
        for k in (0, 3, 4, 5):
            gap = (replay_step(adapter, traj, k).prev_sample - traj.latents[:, k + 1]).abs().max()
            assert gap < 1e-5 if untrained == "ode" or k == 5 else gap > 1e-3, (k, gap)
    for steps in (2, 9):  # training with fewer steps than evaluation is just another num_steps
        t = rollout(
            adapter,
            PROMPTS,
            num_steps=steps,
            guidance_scale=4.5,
            noise_level=0.8,
            cond=cond,
            generator=_gen(0),
            decode=False,
        )
        assert t.latents.shape[:2] == (2, steps + 1) and t.log_probs.shape == (2, steps) and t.num_steps == steps


def test_untrained_renoise_is_the_stock_stochastic_scheduler(tiny_sd3):
    """`untrained="renoise"` runs untrained steps as diffusers' `stochastic_sampling` does: from the same initial
    latents and the same noise stream (the stock scheduler draws from torch's global RNG), the same final latents."""
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    latents = adapter.init_noise(len(PROMPTS), _gen(3))
    common = dict(num_steps=5, guidance_scale=4.5, noise_level=0.0, latents=latents, decode=False)
    traj = rollout(adapter, PROMPTS, sde_steps=[], untrained="renoise", generator=_gen(7), **common)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_sd3.scheduler.config, stochastic_sampling=True)
    stochastic_pipe = StableDiffusion3Pipeline(**{**tiny_sd3.components, "scheduler": scheduler})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        stock = _stock(stochastic_pipe, adapter, 5, 4.5, output_type="latent", latents=latents)
    assert (traj.latents[:, -1] - stock).abs().max() <= 1e-5
    assert (traj.log_probs == 0).all() and not traj.sde_mask.any()
    ode = rollout(adapter, PROMPTS, sde_steps=[], generator=_gen(7), **common)
    assert (traj.latents[:, -1] - ode.latents[:, -1]).abs().max() > 0.1


def test_rollout_input_errors(tiny_sd3):
    adapter = adapter_for(tiny_sd3, max_sequence_length=MSL)
    common = dict(num_steps=3, guidance_scale=4.5, noise_level=0.7, decode=False)
    with pytest.raises(ValueError, match="column 'id'"):
        rollout(adapter, PROMPTS, columns={"id": [1]}, **common)
    with pytest.raises(ValueError, match="valid: cps, cps_flow_grpo, sde"):
        rollout(adapter, PROMPTS, sampler="nope", **common)
    with pytest.raises(ValueError, match="last step"):
        rollout(adapter, PROMPTS, sde_steps=[2], **common)
    with pytest.raises(ValueError, match="untrained must be one of ode, renoise"):
        rollout(adapter, PROMPTS, untrained="sde", **common)
    cond = adapter.encode(PROMPTS, 1.0)
    with pytest.raises(ValueError, match="negative embeddings"):
        rollout(adapter, PROMPTS, cond=cond, **common)


# -- dispatch and loading ---------------------------------------------------------------------------------------
def test_adapter_for_rejects_unsupported_pipelines():
    with pytest.raises(ValueError, match=r"supported pipelines: FluxPipeline \(flux\), StableDiffusion3Pipeline"):
        adapter_for(object())


@pytest.mark.parametrize("model", ["/nonexistent/flowalign-model-dir", "no-such-org/no-such-model-xyz"])
def test_missing_model_offline_gives_one_clear_error(model):
    with pytest.raises(FileNotFoundError) as info:
        load_pipeline(model, family="sd3")
    message = str(info.value)
    assert repr(model) in message and "neither a local directory nor in the local Hugging Face cache" in message
    assert f"download {model} --local-dir DIR" in message and "HF_HUB_OFFLINE" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no diffusers stack trace


def test_load_pipeline_from_local_directory(tmp_path, tiny_sd3):
    tiny_sd3.save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(load_pipeline(str(tmp_path), family="sd3"), StableDiffusion3Pipeline)
    with pytest.raises(ValueError, match="valid: flux, sd3"):
        load_pipeline(tmp_path, family="sdxl")
    a, b = adapter_for(pipe, max_sequence_length=MSL), adapter_for(tiny_sd3, max_sequence_length=MSL)
    ta = rollout(a, PROMPTS, num_steps=2, guidance_scale=4.5, noise_level=0.7, generator=_gen(0), decode=False)
    tb = rollout(b, PROMPTS, num_steps=2, guidance_scale=4.5, noise_level=0.7, generator=_gen(0), decode=False)
    assert torch.equal(ta.latents, tb.latents)


def test_config_image_size_reaches_the_adapter(tmp_path, tiny_sd3):
    from flowalign.api import build_adapter
    from flowalign.config import load_config

    tiny_sd3.save_pretrained(tmp_path)
    cfg = load_config(None, {"model": str(tmp_path), "max_sequence_length": MSL, "height": 48, "width": 64})
    adapter = build_adapter(cfg)
    assert (adapter.height, adapter.width) == (48, 64)
    traj = rollout(adapter, PROMPTS, num_steps=2, guidance_scale=4.5, noise_level=0.7, generator=_gen(0))
    assert traj.images.shape == (2, 3, 48, 64)
    default = build_adapter(load_config(None, {"model": str(tmp_path), "max_sequence_length": MSL}))
    assert (default.height, default.width) == (32, 32)  # the pipeline's own default size
    with pytest.raises(ValueError, match="height must be >= 1"):
        load_config(None, {"height": 0})


def test_flux_pipeline_class_dispatch(tiny_flux):
    assert isinstance(tiny_flux, FluxPipeline)
    with pytest.raises(ValueError, match="needs a StableDiffusion3Pipeline"):
        SD3Adapter(tiny_flux)
