"""Reward heads for flowalign. Import a module to register its rewards; `build_reward(name)` builds one."""

from rewards import shapes, simple  # noqa: F401  (register the light rewards)
from rewards.base import REWARDS, RewardFn, build_reward, check_images

__all__ = ["REWARDS", "RewardFn", "build_reward", "check_images"]
