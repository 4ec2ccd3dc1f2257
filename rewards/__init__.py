"""Reward heads for flowalign. Import a module to register its rewards; `build_reward(name)` builds one."""

from rewards import artifact, clip, dino, http_judge, preference, shapes, simple, vlm  # noqa: F401  (registration)
from rewards.base import REWARDS, RewardFn, build_reward, check_images

__all__ = ["REWARDS", "RewardFn", "build_reward", "check_images"]
