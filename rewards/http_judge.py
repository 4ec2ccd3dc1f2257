"""The yes/no VLM judge against an OpenAI-compatible server (vLLM, SGLang, ...), standard library only.

Each image is sent as a PNG base64 data URL in one `POST {base}/v1/chat/completions` with
`max_tokens: 1, logprobs: true, top_logprobs: 20, temperature: 0`; p(yes) is read from the top logprobs of
the first generated token, renormalised over the "yes" and "no" variants (`" Yes"`, `"yes"`, `"YES."`, ...):
`p = sum exp(lp_yes) / (sum exp(lp_yes) + sum exp(lp_no))` -- the same quantity as `rewards.vlm`'s
`softmax([l_yes, l_no])[yes]` when one variant of each is present.

**Fallback**: when neither a yes nor a no variant is among the top logprobs (or the server returns no
logprobs), the generated text decides: 1.0 if it starts with yes, 0.0 if with no, else 0.5 -- each such case
is logged as a warning, since a hard 0/1 carries less signal than the probability.

Failure model: every request has a socket timeout; timeouts, connection errors, HTTP 5xx / 429 / 408 are
retried up to `max_retries` times with exponential backoff (`backoff * 2**k`, capped at `max_backoff`).
After that -- or at once for other 4xx answers and malformed replies -- the whole batch raises one
`JudgeUnavailableError` naming the URL and the last error. Nothing is returned for a partly scored batch, and
the judge holds no per-batch state, so a trainer can catch the error and retry the step with its state intact.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewards.base import REWARDS, check_images
from rewards.vlm import ARTIFACT_QUESTION, DEFAULT_VLM, YES_QUESTION, fill_prompt

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class JudgeUnavailableError(RuntimeError):
    """The judge server could not score a batch (after retries, or a non-retryable error).

    Attributes:
        url: the endpoint.
        last_error: a description of the last failure.
        attempts: requests made for the failing image.
    """

    def __init__(self, url: str, last_error: str, attempts: int) -> None:
        self.url, self.last_error, self.attempts = url, last_error, attempts
        super().__init__(
            f"VLM judge at {url} unavailable after {attempts} attempt(s): {last_error}. Check that the server is "
            "running and reachable (e.g. `vllm serve Qwen/Qwen2.5-VL-3B-Instruct`), or raise timeout/max_retries."
        )


def chat_url(base_url: str) -> str:
    """`http://host:port`, `.../v1` or a full `.../chat/completions` URL -> the chat-completions endpoint."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def png_data_url(image: Tensor) -> str:
    """`[3,H,W]` in [0, 1] -> `data:image/png;base64,...` (8-bit RGB)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _norm_token(token: str) -> str:
    # "Ġ" / "▁" are BPE / SentencePiece space markers some servers leave in token strings
    return token.strip().lstrip("Ġ▁").strip().rstrip(".,!:;").lower()


def yes_probability_from_response(
    response: dict, yes: Sequence[str] = ("yes",), no: Sequence[str] = ("no",)
) -> tuple[float, bool]:
    """p(yes) from a chat-completions response; also whether the text fallback was used.

    Raises:
        ValueError: the response has no `choices`.
    """
    try:
        choice = response["choices"][0]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"response has no choices: {str(response)[:200]}") from e
    yes_set, no_set = {y.lower() for y in yes}, {n.lower() for n in no}
    content = ((choice.get("logprobs") or {}).get("content")) or []
    if content:
        p_yes = p_no = 0.0
        for entry in content[0].get("top_logprobs") or [content[0]]:
            word = _norm_token(str(entry.get("token", "")))
            lp = entry.get("logprob")
            if lp is None:
                continue
            if word in yes_set:
                p_yes += float(np.exp(lp))
            elif word in no_set:
                p_no += float(np.exp(lp))
        if p_yes + p_no > 0:
            return p_yes / (p_yes + p_no), False
    text = str((choice.get("message") or {}).get("content") or choice.get("text") or "")
    words = text.strip().split()
    first = _norm_token(words[0]) if words else ""
    p = 1.0 if first in yes_set else 0.0 if first in no_set else 0.5
    logger.warning("judge: no yes/no token among the top logprobs; using the text answer %r -> %.1f", text[:40], p)
    return p, True


class HttpJudge:
    """Yes/no judge over an OpenAI-compatible chat-completions server.

    Args:
        base_url: server root (`http://127.0.0.1:8000`), its `/v1`, or the full chat-completions URL.
        model: the served model name (vLLM: the id given to `vllm serve`).
        timeout: seconds per socket operation (connect, each read) of one request.
        max_retries: retries after the first attempt, for timeouts, connection errors, 5xx, 408 and 429.
        backoff: first retry delay in seconds; doubles each retry, capped at `max_backoff`.
        concurrency: requests in flight at once (a small thread pool).
        top_logprobs: how many first-token alternatives to ask for (OpenAI allows up to 20).
        yes, no: answer variants (compared after stripping spaces/punctuation and lower-casing).
        api_key: sent as `Authorization: Bearer ...` when given.
        use_env_proxy: honour `http_proxy` & co. (off: judge servers are usually in-cluster).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str = DEFAULT_VLM,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        concurrency: int = 8,
        top_logprobs: int = 20,
        yes: Sequence[str] = ("yes",),
        no: Sequence[str] = ("no",),
        api_key: str | None = None,
        use_env_proxy: bool = False,
    ) -> None:
        if timeout <= 0 or max_retries < 0 or backoff < 0 or concurrency < 1:
            raise ValueError("need timeout > 0, max_retries >= 0, backoff >= 0 and concurrency >= 1")
        self.url = chat_url(base_url)
        self.model = model
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.concurrency, self.top_logprobs = int(concurrency), int(top_logprobs)
        self.yes, self.no = tuple(yes), tuple(no)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    def payload(self, data_url: str, question: str) -> dict:
        """The request body for one image and question (image first, as in `rewards.vlm`)."""
        return {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }

    def _post(self, body: bytes, abort: threading.Event) -> dict:
        """One request with retries; returns the parsed JSON or raises `JudgeUnavailableError`."""
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if abort.is_set():
                raise JudgeUnavailableError(self.url, f"aborted after another request failed ({last})", attempt)
            retryable = True
            try:
                req = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
                with self._opener.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    last, retryable = f"malformed JSON reply: {raw[:200]!r}", False
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace") if e.fp is not None else ""
                last = f"HTTP {e.code} {e.reason}: {detail}".strip()
                retryable = e.code in RETRY_STATUS
            except urllib.error.URLError as e:
                last = f"connection error: {e.reason!r}"
            except TimeoutError as e:
                last = f"timed out after {self.timeout:g}s ({e})"
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                last = f"{type(e).__name__}: {e}"
            if not retryable:
                raise JudgeUnavailableError(self.url, last + " (not retried)", attempt + 1)
            if attempt < self.max_retries:
                delay = min(self.max_backoff, self.backoff * 2**attempt)
                logger.info("judge %s: %s; retry %d/%d in %.2fs", self.url, last, attempt + 1, self.max_retries, delay)
                if abort.wait(delay):  # woken early: another request already failed the batch
                    raise JudgeUnavailableError(
                        self.url, f"aborted after another request failed ({last})", attempt + 1
                    )
        raise JudgeUnavailableError(self.url, last, self.max_retries + 1)

    def _score_one(self, data_url: str, question: str, abort: threading.Event) -> float:
        body = json.dumps(self.payload(data_url, question)).encode()
        response = self._post(body, abort)
        try:
            p, _ = yes_probability_from_response(response, self.yes, self.no)
        except ValueError as e:
            raise JudgeUnavailableError(self.url, str(e) + " (not retried)", 1) from e
        return p

    def yes_probability(self, images: Tensor, questions: Sequence[str]) -> Tensor:
        """p(yes) for each (image, question): `[B,3,H,W]` in [0, 1], B questions -> `[B]` fp32.

        Raises:
            JudgeUnavailableError: any image could not be scored (the batch gets no scores at all).
        """
        if images.shape[0] != len(questions):
            raise ValueError(f"got {images.shape[0]} images but {len(questions)} questions")
        urls = [png_data_url(img) for img in images]
        abort = threading.Event()
        start = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(urls))), thread_name_prefix="judge")
        try:
            futures = [pool.submit(self._score_one, u, q, abort) for u, q in zip(urls, questions, strict=True)]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                abort.set()  # stop the others' retries; in-flight requests end within `timeout`
                raise failed.exception()  # type: ignore[misc]
            scores = [f.result() for f in futures]
        finally:
            abort.set()
            pool.shutdown(wait=True, cancel_futures=True)
        logger.debug("judge %s: %d images in %.2fs", self.url, len(urls), time.monotonic() - start)
        return torch.tensor(scores, dtype=torch.float32)


def _http_reward(name: str, judge: HttpJudge, question: str, invert: bool):
    def reward(images: Tensor, prompts: Sequence[str], **columns: Any) -> Tensor:
        check_images(images.detach() if isinstance(images, Tensor) else images, name)
        p = judge.yes_probability(images, [fill_prompt(question, pr) for pr in prompts])
        return 1.0 - p if invert else p

    reward.judge = judge  # type: ignore[attr-defined]
    return reward


@REWARDS.register("http_vlm_yes")
def http_vlm_yes(
    base_url: str = "http://127.0.0.1:8000",
    *,
    question: str = YES_QUESTION,
    invert: bool = False,
    **judge_kwargs: Any,
):
    """p(yes) from an OpenAI-compatible server (`{prompt}` in `question` is each sample's prompt).

    `judge_kwargs` go to `HttpJudge` (model, timeout, max_retries, backoff, max_backoff, concurrency,
    top_logprobs, yes, no, api_key, use_env_proxy). Raises `JudgeUnavailableError` when the server fails.
    """
    return _http_reward("http_vlm_yes", HttpJudge(base_url, **judge_kwargs), question, invert)


@REWARDS.register("http_vlm_artifact")
def http_vlm_artifact(
    base_url: str = "http://127.0.0.1:8000", *, question: str = ARTIFACT_QUESTION, **judge_kwargs: Any
):
    """ArtifactReward through a server: `1 - p(yes)` for the artifact question (higher = fewer artifacts)."""
    judge_kwargs.pop("invert", None)
    return _http_reward("http_vlm_artifact", HttpJudge(base_url, **judge_kwargs), question, True)
