"""LoRA that acts only at high noise: the denoising steps GRPO trains, with the base model on the rest.

Why: with a trained window (`sde_window`), the policy gradient covers only the window's steps, yet a LoRA applied
everywhere also changes the untrained low-noise steps, where shapes get their edges, with nothing steering that
change. On the built-in model that drift cost more than the window gained (docs/EXPERIMENTS.md, "LoRA only where it is
trained"). Gating the LoRA by noise level makes the untrained steps the base model's, so the gradient is the whole
gradient of the reward and the untrained steps cannot drift.

The gate is a pair of forward hooks on the transformer keyed on its `timestep` argument, so it holds in every call:
flowalign's samplers, replays and evaluation, and a stock diffusers `pipe(...)` as well.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

# The gate reads sigma back from the transformer's `timestep`, which a bf16 model receives rounded (FLUX casts it to
# the latents' dtype: up to 2**-8 relative). Noise levels within this relative margin below `min_sigma` count as at
# it, so a trained step is never switched off by rounding (the trainer checks trained steps against `min_sigma`).
ROUNDING = 2**-7


def _lora_layer(transformer: torch.nn.Module):
    """One of the transformer's LoRA layers (its `disable_adapters` flag says whether adapters are on), or None."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return next((m for m in transformer.modules() if isinstance(m, BaseTunerLayer)), None)


def limit_lora(transformer: torch.nn.Module, min_sigma: float, timestep_per_sigma: float) -> Callable[[], None]:
    """Runs `transformer`'s LoRA only on calls whose noise level sigma is >= `min_sigma`; returns the undo.

    Every loaded adapter is switched off together at low noise. The LoRA layer is looked up on each call, so the gate
    follows `pipe.unload_lora_weights()` / `load_lora_weights(...)` and an outer `pipe.disable_lora()`.

    Args:
        transformer: a diffusers transformer with a PEFT adapter (`add_adapter` or `pipe.load_lora_weights`).
        min_sigma: the lowest noise level (in [0, 1]) the LoRA acts at; below it the base model answers.
        timestep_per_sigma: how the family's `timestep` argument scales sigma (SD3: 1000, FLUX: 1).
    """
    if not 0 < min_sigma <= 1:
        raise ValueError(f"min_sigma must be in (0, 1], got {min_sigma}")
    if _lora_layer(transformer) is None:
        raise ValueError("limit_lora needs a transformer with a LoRA adapter (transformer.add_adapter(...))")
    params = list(inspect.signature(transformer.forward).parameters)
    if "timestep" not in params:
        raise ValueError(f"limit_lora: {type(transformer).__name__}.forward takes no `timestep` argument")
    position = params.index("timestep")  # for positional calls (SD3 and FLUX: after pooled_projections)
    threshold = min_sigma * (1 - ROUNDING)
    gated: list[bool] = []  # one entry per call in flight: did this call switch the adapter off?

    @torch.compiler.disable  # reads tensor values and flips a flag: eager, so a compiled transformer does not retrace
    def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        gated.append(False)  # first: `after` runs even when this raises
        t = kwargs.get("timestep", args[position] if len(args) > position else None)
        if t is None:
            raise ValueError("limit_lora: the transformer was called without a timestep")
        layer = _lora_layer(module)
        if layer is None:  # the LoRA was unloaded: nothing to gate
            return
        low = torch.as_tensor(t).float().flatten() / timestep_per_sigma < threshold
        if bool(low.any()) != bool(low.all()):
            raise ValueError(f"limit_lora: one call mixes noise levels on both sides of min_sigma={min_sigma}")
        switch = bool(low.all()) and not layer.disable_adapters  # an outer disable (the KL reference) stays
        if switch:
            module.disable_adapters()
            gated[-1] = True

    @torch.compiler.disable
    def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if gated.pop():
            module.enable_adapters()

    handles: list[RemovableHandle] = [
        transformer.register_forward_pre_hook(before, with_kwargs=True),
        transformer.register_forward_hook(after, with_kwargs=True, always_call=True),
    ]

    def undo() -> None:
        for h in handles:
            h.remove()

    return undo
