"""A tiny random Qwen2-VL / Qwen2.5-VL with an offline tokenizer and processor, saved to a directory.

The tokenizer is a word-level `tokenizers` model holding Qwen's chat/vision special tokens and a handful of
words ("Yes", "No", "1", "2", ...); unknown words map to `[UNK]`. Its vocabulary has exactly 20 entries so an
OpenAI-style `top_logprobs: 20` covers every token. The chat template reproduces Qwen's turn format.

Also a minimal OpenAI-compatible chat server (`python -m tests._tiny_vlm serve DIR`) that answers
`/v1/chat/completions` with the tiny model's first-token logprobs, for the HTTP-judge tests.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = ["[UNK]", "Yes", "No", "1", "2", "user", "assistant", "a", "red", "blue", "cat", "dog", "Describe"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_processor(family: str = "qwen2_5_vl", max_pixels: int = 56 * 56 * 2):
    """Word-level tokenizer + Qwen2-VL image processor (+ video processor), wrapped in the family's processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels)
    cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_model(family: str = "qwen2_5_vl", seed: int = 0):
    """A 1-layer random Qwen2(.5)-VL (hidden 32) whose special-token ids match `VOCAB`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=VOCAB["<|im_end|>"],
        pad_token_id=VOCAB["<|endoftext|>"],
    )
    ids = dict(
        image_token_id=VOCAB["<|image_pad|>"],
        video_token_id=VOCAB["<|video_pad|>"],
        vision_start_token_id=VOCAB["<|vision_start|>"],
        vision_end_token_id=VOCAB["<|vision_end|>"],
    )
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        config, cls = (
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids),
            Qwen2_5_VLForConditionalGeneration,
        )
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random init gives near-uniform logits; a wider lm_head makes answers differ clearly
        model.lm_head.weight.normal_(0.0, 2.0)
    return model


def save_tiny_vlm(path: str | Path, family: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Saves a tiny model + processor to `path` (loadable by `rewards.vlm.load_vlm`)."""
    path = Path(path)
    tiny_model(family, seed).save_pretrained(path)
    tiny_processor(family).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# a minimal OpenAI-compatible server around the tiny VLM
# ---------------------------------------------------------------------------------------------------------


def decode_data_url(url: str) -> torch.Tensor:
    """`data:image/png;base64,...` -> `[3,H,W]` float in [0, 1]."""
    import numpy as np
    from PIL import Image

    b64 = url.split(",", 1)[1]
    img = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


def chat_response(judge, body: dict) -> dict:
    """The `/v1/chat/completions` answer of the tiny VLM to one request (first token only, greedy)."""
    content = body["messages"][-1]["content"]
    image = next(decode_data_url(c["image_url"]["url"]) for c in content if c["type"] == "image_url")
    question = " ".join(c["text"] for c in content if c["type"] == "text")
    with torch.no_grad():
        logp = judge.first_token_logits(image[None], [question])[0].log_softmax(-1)
    k = min(int(body.get("top_logprobs", 0) or 0), logp.numel())
    top = logp.topk(k) if k else None
    tokens = judge.tokenizer.convert_ids_to_tokens(list(range(logp.numel())))
    best = int(logp.argmax())
    entry = {
        "token": tokens[best],
        "logprob": float(logp[best]),
        "top_logprobs": []
        if top is None
        else [{"token": tokens[int(i)], "logprob": float(v)} for v, i in zip(top.values, top.indices, strict=True)],
    }
    return {
        "id": "tiny",
        "object": "chat.completion",
        "model": body.get("model", "tiny"),
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": tokens[best]},
                "logprobs": {"content": [entry]} if body.get("logprobs") else None,
            }
        ],
    }


def serve(model_dir: str, port: int = 0) -> None:
    """Serves the tiny VLM on 127.0.0.1; prints `PORT <n>` once listening, then serves until killed."""
    from rewards.vlm import VLMJudge, load_vlm

    model, processor = load_vlm(model_dir, device="cpu", dtype="float32")
    judge = VLMJudge(model, processor)
    lock = threading.Lock()  # one forward at a time (the model caches rope deltas between calls)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                data = json.dumps(chat_response(judge, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("cmd", choices=["serve"])
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(sys.argv[1:])
    serve(args.model_dir, args.port)
