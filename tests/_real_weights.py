"""Shared checks for the slow real-weight reward tests."""

import torch


def solid(rgb: tuple[float, float, float], size: int = 256) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def assert_matching_caption_wins(reward) -> None:
    """A matching caption outscores a mismatching one, for both images."""
    red, blue = solid((0.9, 0.1, 0.1)), solid((0.1, 0.2, 0.9))
    images = torch.cat([red, red, blue, blue])
    s = reward(images, ["a plain red image", "a plain blue image", "a plain blue image", "a plain red image"])
    assert s[0] > s[1] and s[2] > s[3], s
