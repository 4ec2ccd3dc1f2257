"""Without network the loaders read the Hugging Face cache at once instead of retrying the Hub for half a minute."""

import huggingface_hub
import pytest
from diffusers import StableDiffusion3Pipeline
from huggingface_hub import constants

from flowalign.adapters import load_pipeline
from flowalign.hub import _PROXIES, cache_only_when_unreachable, hub_unreachable
from rewards.hub import WeightsNotFoundError, from_pretrained


@pytest.fixture
def no_network(monkeypatch):
    """The Hub switched on (conftest switches it off) at a host that never resolves (RFC 2606 `.invalid`);
    huggingface_hub's back-off sleep fails the test, so any retry of a request shows."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *_PROXIES):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")

    def retried(seconds):
        raise AssertionError(f"huggingface_hub retried a request (sleep {seconds})")

    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", retried)


def test_unresolvable_hub_is_switched_off_only_within(no_network):
    assert hub_unreachable() == "hub.invalid does not resolve: no network"
    with cache_only_when_unreachable() as reason:
        assert reason == "hub.invalid does not resolve: no network" and constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False


def test_nothing_is_concluded_behind_a_proxy_or_when_switched_off(no_network, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # the proxy resolves names, not this machine
    assert hub_unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable() is None
    with cache_only_when_unreachable() as reason:
        assert reason is None


def test_missing_model_without_network_fails_at_once(no_network):
    with pytest.raises(FileNotFoundError) as info:
        load_pipeline("no-such-org/no-such-model-xyz", family="sd3")
    message = str(info.value)
    assert "nor in the local Hugging Face cache (hub.invalid does not resolve: no network)" in message
    assert "hf download no-such-org/no-such-model-xyz --local-dir DIR" in message and "HF_HUB_OFFLINE" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert constants.HF_HUB_OFFLINE is False


def test_cached_model_loads_without_network(no_network, tmp_path, tiny_sd3):
    """A model in the hub cache (the layout `hf download` leaves) loads by its hub id with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--flowalign-test--tiny-sd3"
    tiny_sd3.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = load_pipeline("flowalign-test/tiny-sd3", family="sd3", cache_dir=str(tmp_path))
    assert isinstance(pipe, StableDiffusion3Pipeline)
    a, b = pipe.transformer.state_dict(), tiny_sd3.transformer.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert constants.HF_HUB_OFFLINE is False


def test_reward_weights_without_network_fail_at_once(no_network):
    from transformers import CLIPModel

    with pytest.raises(WeightsNotFoundError) as info:
        from_pretrained(CLIPModel.from_pretrained, "no-such-org/no-such-clip", what="clip_score", kwarg="model")
    message = str(info.value)
    assert "'no-such-org/no-such-clip'" in message and "hub.invalid does not resolve: no network" in message
    assert "hf download no-such-org/no-such-clip --local-dir DIR" in message
    assert constants.HF_HUB_OFFLINE is False
