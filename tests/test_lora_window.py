"""The noise-gated LoRA (`lora_min_sigma`): on where GRPO trains, the base model elsewhere, in every kind of call."""

import pytest
import torch
from peft import LoraConfig

from flowalign.adapters import adapter_for
from flowalign.lora_window import limit_lora
from flowalign.samplers.rollout import replay_step
from flowalign.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_trainer
from flowalign.trainer import GRPOTrainer

PROMPTS = ["a red circle", "two blue squares"]


def _with_lora(pipe, seed: int = 0):
    """Adds a LoRA with non-zero B, as training leaves it, so switching it changes the output."""
    pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=g).to(p.dtype)
    return pipe


def _images(pipe, **kw):
    out = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=8,
        height=16,
        width=16,
        output_type="pt",
        **kw,
    )
    return out.images


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_stock_pipeline_call_uses_the_lora_exactly_at_high_noise(family):
    pipe = _with_lora(tiny_sd3_pipeline(seed=0) if family == "sd3" else tiny_flux_pipeline(seed=0))
    adapter = adapter_for(pipe, max_sequence_length=8)
    min_sigma = 0.7
    everywhere = _images(pipe)

    # Independent computation: the stock loop with the LoRA switched off by hand once the next sigma is below.
    def switch_off(p, i, t, kwargs):
        if p.scheduler.sigmas[i + 1] < min_sigma:
            p.transformer.disable_adapters()
        return kwargs

    by_hand = _images(pipe, callback_on_step_end=switch_off)
    pipe.transformer.enable_adapters()
    sigmas = pipe.scheduler.sigmas[:-1].tolist()
    assert any(s < min_sigma for s in sigmas) and any(s >= min_sigma for s in sigmas), sigmas

    undo = limit_lora(pipe.transformer, min_sigma, adapter.timestep_per_sigma)
    seen = []  # (sigma, LoRA on?) per transformer call, recorded after the gate has acted
    probe = next(m for n, m in pipe.transformer.named_modules() if n.endswith("to_q"))
    record = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(
            (float(kw["timestep"][0]) / adapter.timestep_per_sigma, not probe.disable_adapters)
        ),
        with_kwargs=True,
    )
    gated = _images(pipe)
    record.remove()
    assert [on for _, on in seen] == [s >= min_sigma for s, _ in seen] == [s >= min_sigma for s in sigmas]
    torch.testing.assert_close(gated, by_hand, rtol=0, atol=1e-6)
    assert (gated - everywhere).abs().max() > 1e-3  # the gate changed what was drawn
    assert not probe.disable_adapters  # left on after the call

    undo()
    torch.testing.assert_close(_images(pipe), everywhere, rtol=0, atol=0)


def test_the_gate_keeps_an_outer_switch_off_and_rejects_mixed_noise_levels():
    pipe = _with_lora(tiny_sd3_pipeline(seed=0))
    adapter = adapter_for(pipe, max_sequence_length=8)
    limit_lora(pipe.transformer, 0.5, adapter.timestep_per_sigma)
    cond = adapter.encode(PROMPTS, 1.0)
    x = adapter.init_noise(2, torch.Generator().manual_seed(0))
    pipe.transformer.disable_adapters()  # e.g. the KL reference policy
    base_low = adapter.velocity(x, torch.tensor(0.2), cond, 1.0)
    base_high = adapter.velocity(x, torch.tensor(0.9), cond, 1.0)
    assert pipe.transformer.peft_config and not _lora_on(pipe)  # still off: the gate did not switch it back on
    pipe.transformer.enable_adapters()
    torch.testing.assert_close(adapter.velocity(x, torch.tensor(0.2), cond, 1.0), base_low, rtol=0, atol=0)
    assert (adapter.velocity(x, torch.tensor(0.9), cond, 1.0) - base_high).abs().max() > 1e-4
    with pytest.raises(ValueError, match="both sides of min_sigma"):
        adapter.velocity(x, torch.tensor([0.9, 0.2]), cond, 1.0)
    with pytest.raises(ValueError, match="add_adapter"):
        limit_lora(tiny_sd3_pipeline(seed=0).transformer, 0.5, 1000.0)


def _lora_on(pipe) -> bool:
    return not next(m for n, m in pipe.transformer.named_modules() if n.endswith("to_q")).disable_adapters


def _trainer(tmp_path, **over) -> GRPOTrainer:
    gated = dict(sampler="cps", max_steps=2, save_every=0, sde_window=2, sde_window_max_start=0, lora_min_sigma=0.7)
    return tiny_trainer(tmp_path, PROMPTS, **{**gated, **over})


def test_gated_training_replays_its_log_probs_and_leaves_the_untrained_steps_to_the_base(tmp_path):
    # The tiny model's 4-step schedule is 1, 0.86, 0.60, 0.009, 0: the window trains the first two steps.
    trainer = _trainer(tmp_path)
    trainer.train(progress=False)  # the LoRA moves away from zero
    traj = trainer.sample(trainer.step)
    assert traj.sde_mask.tolist() == [True, True, False, False]
    for k in (0, 1):
        torch.testing.assert_close(replay_step(trainer.adapter, traj, k).log_prob, traj.log_probs[:, k])
    adapter, x, s = trainer.adapter, traj.latents[:, 2], trainer.adapter.sigmas(4)
    v_gated = adapter.velocity(x, s[2], traj.cond, 1.0)
    adapter.transformer.disable_adapters()
    v_base = adapter.velocity(x, s[2], traj.cond, 1.0)
    v_base_high = adapter.velocity(traj.latents[:, 0], s[0], traj.cond, 1.0)
    adapter.transformer.enable_adapters()
    torch.testing.assert_close(v_gated, v_base, rtol=0, atol=0)
    assert (adapter.velocity(traj.latents[:, 0], s[0], traj.cond, 1.0) - v_base_high).abs().max() > 1e-4


def test_a_gate_that_would_switch_off_a_trained_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"switches the LoRA off at trained steps \(sigma \[0\.857"):
        _trainer(tmp_path, lora_min_sigma=0.9)  # the window trains sigma 1 and 0.86
    with pytest.raises(ValueError, match="needs lora_rank > 0"):
        _trainer(tmp_path, lora_rank=0)


def test_the_gate_reads_a_positional_timestep_and_follows_a_reloaded_or_disabled_lora(tmp_path):
    """SD3's and FLUX's forward take `timestep` fourth (after pooled_projections); after unloading and loading a
    LoRA, an outer `disable_lora()` must hold as it did for the first one."""
    pipe = _with_lora(tiny_sd3_pipeline(seed=0))
    adapter = adapter_for(pipe, max_sequence_length=8)
    cond = adapter.encode(PROMPTS, 1.0)
    x = adapter.init_noise(2, torch.Generator().manual_seed(0))
    args = (x, cond.prompt_embeds, cond.pooled_embeds)
    with torch.no_grad():
        lora_high = pipe.transformer(*args, timestep=torch.full((2,), 900.0)).sample
        lora_low = pipe.transformer(*args, timestep=torch.full((2,), 200.0)).sample
        pipe.transformer.disable_adapters()
        base_high = pipe.transformer(*args, timestep=torch.full((2,), 900.0)).sample
        base_low = pipe.transformer(*args, timestep=torch.full((2,), 200.0)).sample
        pipe.transformer.enable_adapters()
        limit_lora(pipe.transformer, 0.5, adapter.timestep_per_sigma)
        assert torch.equal(pipe.transformer(*args, torch.full((2,), 900.0)).sample, lora_high)  # positional
        assert torch.equal(pipe.transformer(*args, torch.full((2,), 200.0)).sample, base_low)
        assert not torch.equal(lora_low, base_low) and not torch.equal(lora_high, base_high)

        meta = pipe.transformer.peft_config["default"].to_dict()  # its alpha: loaded without it, the scale differs
        pipe.save_lora_weights(
            tmp_path, transformer_lora_layers=_peft_state(pipe.transformer), transformer_lora_adapter_metadata=meta
        )
        pipe.unload_lora_weights()
        pipe.load_lora_weights(tmp_path)
        pipe.disable_lora()
        pipe.transformer(*args, timestep=torch.full((2,), 200.0))  # a gated call, then a high-noise one
        torch.testing.assert_close(pipe.transformer(*args, timestep=torch.full((2,), 900.0)).sample, base_high)
        pipe.enable_lora()
        torch.testing.assert_close(pipe.transformer(*args, timestep=torch.full((2,), 900.0)).sample, lora_high)


def _peft_state(transformer):
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)


def test_a_bf16_timestep_rounded_below_min_sigma_still_trains_that_step():
    """FLUX receives its timestep in the model dtype: in bf16 sigma 0.8886 arrives as 0.8867. A min_sigma between
    the two passes the trainer's check on the true sigmas, so the gate must not switch that step off."""
    pipe = _with_lora(tiny_flux_pipeline(seed=0, dtype=torch.bfloat16))
    adapter = adapter_for(pipe, max_sequence_length=8)
    sigma = float(adapter.sigmas(6)[1])
    seen = float(torch.tensor(sigma * 1000, dtype=torch.bfloat16).float() / 1000)
    assert seen < sigma  # the premise: rounded down
    limit_lora(pipe.transformer, (seen + sigma) / 2, adapter.timestep_per_sigma)
    cond = adapter.encode(PROMPTS, 3.5)
    x = adapter.init_noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated = adapter.velocity(x, torch.tensor(sigma), cond, 3.5)
        pipe.transformer.disable_adapters()
        base = adapter.velocity(x, torch.tensor(sigma), cond, 3.5)
    assert not torch.equal(gated, base)  # the LoRA acted
