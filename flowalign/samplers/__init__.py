"""Samplers: pure step math (`sde`), the rollout loop, and a scheduler for stock diffusers pipelines."""

from flowalign.samplers.sde import STEPS, cps_step, gaussian_log_prob, ode_step, sde_step

__all__ = ["STEPS", "cps_step", "gaussian_log_prob", "ode_step", "sde_step"]
