"""Shared test setup: never touch the network, skip slow tests unless asked, tiny pipelines as fixtures."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads the flag at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny test models are far faster single-threaded, and a shared CPU makes multi-threaded BLAS spin
# (a 628x32 linear: 0.1 ms on one thread, 8-30 ms on two busy cores). FLOWALIGN_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("FLOWALIGN_TEST_THREADS", "1")))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("FLOWALIGN_SLOW", "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or FLOWALIGN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Built per test: tests attach LoRA, swap schedulers or move modules, so pipelines are never shared.
@pytest.fixture
def tiny_sd3():
    from flowalign.testing import tiny_sd3_pipeline

    return tiny_sd3_pipeline(seed=0)


@pytest.fixture
def tiny_flux():
    from flowalign.testing import tiny_flux_pipeline

    return tiny_flux_pipeline(seed=0)
