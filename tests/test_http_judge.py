"""The HTTP judge against real servers on 127.0.0.1: the tiny random VLM in a subprocess speaking the OpenAI
chat API, and small in-test `http.server`s with deterministic logprobs for the failure cases."""

from __future__ import annotations

import json
import math
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rewards.base import build_reward
from rewards.http_judge import HttpJudge, JudgeUnavailableError, chat_url, yes_probability_from_response
from rewards.vlm import VLMJudge, load_vlm
from tests._tiny_vlm import decode_data_url, save_tiny_vlm

ROOT = Path(__file__).resolve().parents[1]


# --- helpers ----------------------------------------------------------------------------------------------


@contextmanager
def fake_server(respond):
    """A threaded server on an ephemeral port. `respond(n, body) -> (status, payload, delay_s)` for the n-th
    request (1-based). Yields `(base_url, stats)`; stats counts requests and the most in flight at once."""
    lock, stop = threading.Lock(), threading.Event()
    stats = {"n": 0, "inflight": 0, "max_inflight": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                stats["n"] += 1
                stats["inflight"] += 1
                stats["max_inflight"] = max(stats["max_inflight"], stats["inflight"])
                n = stats["n"]
            try:
                status, payload, delay = respond(n, body)
                if delay:
                    stop.wait(delay)  # interruptible, so teardown never waits for a sleeping handler
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
                pass
            finally:
                with lock:
                    stats["inflight"] -= 1

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", stats
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def brightness_reply(body: dict) -> dict:
    """Deterministic "VLM": p(yes) = mean brightness of the image, spread over two yes variants, with a
    distractor token ("Maybe") that the renormalisation must ignore."""
    content = body["messages"][0]["content"]
    b = float(decode_data_url(content[0]["image_url"]["url"]).mean())
    top = [
        {"token": "Maybe", "logprob": math.log(0.2)},
        {"token": "Yes", "logprob": math.log(0.5 * b)},
        {"token": " yes", "logprob": math.log(0.3 * b)},
        {"token": "No", "logprob": math.log(0.8 * (1 - b))},
    ]
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Maybe"},
                "logprobs": {"content": [{"token": "Maybe", "logprob": math.log(0.2), "top_logprobs": top}]},
            }
        ]
    }


def ok(body: dict):
    return 200, brightness_reply(body), 0.0


def flat_images(values) -> torch.Tensor:
    return torch.stack([torch.full((3, 16, 16), v) for v in values])


def png_mean(values) -> torch.Tensor:  # what the server sees after 8-bit PNG
    return (torch.tensor(values) * 255).round() / 255


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- unit pieces ------------------------------------------------------------------------------------------


def test_chat_url():
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_yes_probability_from_response_hand_computed():
    # yes variants 0.3 + 0.1, no 0.2, distractor 0.4 -> p = 0.4 / 0.6
    top = [
        {"token": " Yes", "logprob": math.log(0.3)},
        {"token": "yes.", "logprob": math.log(0.1)},
        {"token": "NO", "logprob": math.log(0.2)},
        {"token": "The", "logprob": math.log(0.4)},
    ]
    resp = {"choices": [{"message": {"content": "The"}, "logprobs": {"content": [{"top_logprobs": top}]}}]}
    p, fallback = yes_probability_from_response(resp)
    assert abs(p - 0.4 / 0.6) < 1e-12 and not fallback


def test_text_fallback_when_no_yes_no_logprobs():
    top = [{"token": "Maybe", "logprob": -0.1}]
    for text, expected in [("Yes", 1.0), ("no.", 0.0), ("Perhaps", 0.5)]:
        resp = {"choices": [{"message": {"content": text}, "logprobs": {"content": [{"top_logprobs": top}]}}]}
        assert yes_probability_from_response(resp) == (expected, True)
    assert yes_probability_from_response({"choices": [{"message": {"content": "Yes"}}]}) == (1.0, True)


# --- the tiny VLM behind a real server process ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm_server(tmp_path_factory):
    model_dir = str(save_tiny_vlm(tmp_path_factory.mktemp("served_vlm")))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests._tiny_vlm", "serve", model_dir],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        port = None
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("PORT "):
                port = int(line.split()[1])
        if port is None:
            pytest.fail("tiny VLM server did not start")
        yield f"http://127.0.0.1:{port}", model_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_served_tiny_vlm_scores_match_local_logits(tiny_vlm_server):
    base_url, model_dir = tiny_vlm_server
    g = torch.Generator().manual_seed(0)
    images = 0.2 + 0.6 * torch.rand(3, 3, 56, 84, generator=g)
    questions = ["Is this a red cat? Answer Yes or No.", "a dog", "Yes or No"]
    judge = HttpJudge(base_url, model="tiny", timeout=30, concurrency=2)
    got = judge.yes_probability(images, questions)

    # The same model locally on the same 8-bit pixels: softmax([l_yes, l_no])[yes]. The tiny vocabulary has
    # 20 tokens, so the server's top-20 logprobs hold both answers and renormalising them is exact.
    model, processor = load_vlm(model_dir, device="cpu", dtype="float32")
    local = VLMJudge(model, processor).yes_probability((images * 255).round() / 255, questions)
    torch.testing.assert_close(got, local, atol=1e-5, rtol=0)

    reward = build_reward("http_vlm_yes", base_url=base_url, model="tiny", question="{prompt}")
    torch.testing.assert_close(reward(images, questions), local, atol=1e-5, rtol=0)
    artifact = build_reward("http_vlm_artifact", base_url=base_url, model="tiny")
    a = artifact(images, questions)
    assert a.shape == (3,) and ((a >= 0) & (a <= 1)).all()


# --- failure modes (deterministic fake servers) -----------------------------------------------------------


def test_success_with_concurrency_keeps_order():
    values = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.6]
    with fake_server(lambda n, body: (200, brightness_reply(body), 0.1)) as (url, stats):
        judge = HttpJudge(url, timeout=5, concurrency=4)
        p = judge.yes_probability(flat_images(values), ["q"] * len(values))
    torch.testing.assert_close(p, png_mean(values), atol=1e-6, rtol=0)
    assert stats["n"] == len(values) and stats["max_inflight"] >= 2


def test_timeout_retries_then_clear_error():
    with fake_server(lambda n, body: (200, brightness_reply(body), 10.0)) as (url, stats):
        judge = HttpJudge(url, timeout=0.3, max_retries=2, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(JudgeUnavailableError, match="timed out") as info:
            judge.yes_probability(flat_images([0.5]), ["q"])
        elapsed = time.monotonic() - start
    assert url in str(info.value) and info.value.attempts == 3 and stats["n"] == 3
    assert elapsed < 5.0  # 3 x 0.3 s plus backoff, far below the server's 10 s


def test_500_retries_then_clear_error():
    with fake_server(lambda n, body: (500, b'{"error": "engine died"}', 0.0)) as (url, stats):
        judge = HttpJudge(url, timeout=5, max_retries=2, backoff=0.01)
        with pytest.raises(JudgeUnavailableError, match="HTTP 500") as info:
            judge.yes_probability(flat_images([0.5]), ["q"])
    assert url in str(info.value) and "engine died" in str(info.value)
    assert info.value.attempts == 3 and stats["n"] == 3


def test_500_then_200_succeeds():
    def respond(n, body):
        return (503, b"busy", 0.0) if n <= 2 else (200, brightness_reply(body), 0.0)

    with fake_server(respond) as (url, stats):
        p = HttpJudge(url, timeout=5, max_retries=3, backoff=0.01).yes_probability(flat_images([0.25]), ["q"])
    torch.testing.assert_close(p, png_mean([0.25]), atol=1e-6, rtol=0)
    assert stats["n"] == 3


def test_client_error_is_not_retried():
    with fake_server(lambda n, body: (400, b'{"error": "model not found"}', 0.0)) as (url, stats):
        with pytest.raises(JudgeUnavailableError, match="not retried"):
            HttpJudge(url, timeout=5, max_retries=3, backoff=0.01).yes_probability(flat_images([0.5]), ["q"])
    assert stats["n"] == 1


def test_dead_server_fails_fast_and_clearly():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    judge = HttpJudge(url, timeout=5, max_retries=2, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(JudgeUnavailableError, match="connection error") as info:
        judge.yes_probability(flat_images([0.5, 0.5]), ["q", "q"])
    assert time.monotonic() - start < 3.0
    assert url in str(info.value) and "refused" in str(info.value).lower()


def test_failed_batch_leaves_judge_reusable():
    """A failure returns nothing and mutates nothing: the trainer catches it and the same judge works later."""

    def respond(n, body):
        return (500, b"down", 0.0) if n <= 3 else (200, brightness_reply(body), 0.0)

    with fake_server(respond) as (url, stats):
        reward = build_reward("http_vlm_yes", base_url=url, timeout=5, max_retries=2, backoff=0.01)
        with pytest.raises(JudgeUnavailableError):
            reward(flat_images([0.4]), ["a cat"])
        torch.testing.assert_close(reward(flat_images([0.4]), ["a cat"]), png_mean([0.4]), atol=1e-6, rtol=0)


def test_request_payload_is_openai_chat_with_png():
    seen = {}

    def respond(n, body):
        seen.update(body)
        return 200, brightness_reply(body), 0.0

    with fake_server(respond) as (url, _):
        build_reward("http_vlm_yes", base_url=url + "/v1", model="served-name")(flat_images([0.5]), ["a red cat"])
    assert seen["model"] == "served-name" and seen["max_tokens"] == 1
    assert seen["logprobs"] is True and seen["top_logprobs"] == 20
    image, text = seen["messages"][0]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert "a red cat" in text["text"]
