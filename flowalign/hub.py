"""Whether to ask the Hugging Face Hub at all: a machine without network reads the cache at once.

huggingface_hub retries a failed request five times with back-off (~25 s a file, 20 lines of warnings) before
it falls back to the cache or gives up. When the Hub's host name does not even resolve, no retry can succeed,
so the loaders here switch the hub library to offline mode (as `HF_HUB_OFFLINE=1` would) for the load: a cached
model loads in a moment and a missing one fails in a moment with the loader's one clear error.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_offline_env() -> bool:
    """True when the user switched the Hub off (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`)."""
    from huggingface_hub import constants

    flags = (os.environ.get(k, "").strip().upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached ("huggingface.co does not resolve: no network"), or None when it may be.

    Only a failed name lookup counts: it is instant and certain. Behind a proxy the proxy resolves names, so
    nothing is concluded there; nor when the Hub is already switched off.
    """
    if hub_offline_env() or any(os.environ.get(k) for k in _PROXIES):
        return None
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} does not resolve: no network"
    return None


@contextmanager
def cache_only_when_unreachable() -> Iterator[str | None]:
    """Within: the hub library is offline when `hub_unreachable()` says so; yields that reason (or None)."""
    reason = hub_unreachable()
    if reason is None:
        yield None
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub (and so transformers, open_clip)
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = before
