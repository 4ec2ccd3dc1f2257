"""What every model-family adapter shares: the wrapped stock pipeline and the checks on how it is driven."""

from __future__ import annotations

from typing import Any

import torch


def check_scheduler(scheduler: Any) -> None:
    """Refuses schedulers whose steps flowalign's samplers do not reproduce: every step here is a first-order flow
    step on the scheduler's sigmas (Euler, or its stochastic and re-noising variants), which only
    `FlowMatchEulerDiscreteScheduler` takes; Heun repeats sigmas, multistep solvers and LCM step otherwise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(
            f"flowalign samples with FlowMatchEulerDiscreteScheduler steps, but the pipeline's scheduler is "
            f"{type(scheduler).__name__}: put one back with pipe.scheduler = "
            "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), or load the model's own scheduler"
        )
    if scheduler.config.get("invert_sigmas", False):
        raise ValueError("invert_sigmas schedules (sigma rising to 1) are not supported by flowalign's samplers")


def stock_untrained(scheduler: Any) -> str:
    """How the stock scheduler runs a step that does not explore, in `rollout`'s terms: "renoise" where its config
    has `stochastic_sampling`, else "ode"."""
    return "renoise" if scheduler.config.get("stochastic_sampling", False) else "ode"


class PipelineAdapter:
    """Base of the adapters: holds the stock pipeline, whose `transformer` is looked up on every call (so a LoRA
    injected into it, or a peft wrapper assigned to `adapter.transformer` / `pipe.transformer`, is what runs)."""

    family: str
    pipeline_class: type

    def __init__(self, pipe: Any, max_sequence_length: int) -> None:
        if not isinstance(pipe, self.pipeline_class):
            raise ValueError(
                f"{type(self).__name__} needs a {self.pipeline_class.__name__}, got {type(pipe).__name__}"
            )
        if not 0 < max_sequence_length <= 512:
            raise ValueError(
                f"max_sequence_length must be in 1..512 (the pipeline's limit), got {max_sequence_length}"
            )
        check_scheduler(pipe.scheduler)
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.num_train_timesteps: int = pipe.scheduler.config.num_train_timesteps

    @property
    def untrained_default(self) -> str:
        """How the stock pipeline runs a step: "renoise" where its scheduler has `stochastic_sampling`, else "ode"."""
        return stock_untrained(self.pipe.scheduler)

    def _image_size(self, height: int | None, width: int | None, multiple: int, why: str) -> tuple[int, int]:
        """(height, width) in pixels, defaulting to the pipeline's own default size, checked to be multiples."""
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        height, width = height or default, width or default
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} ({why})")
        return height, width

    # -- the FlowAdapter protocol ----------------------------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @transformer.setter
    def transformer(self, module: torch.nn.Module) -> None:
        self.pipe.transformer = module

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device
