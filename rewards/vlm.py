"""VLM judges on Qwen2-VL / Qwen2.5-VL (transformers): yes/no probability, PromptEcho, pairwise win rate.

Three ways of reading a frozen vision-language model as a reward (ALGORITHMS.md section 4):

- **yes/no judge**: ask a question about the image and read the first answer token,
  `p = softmax([l_yes, l_no])[yes]` (VQAScore-style). `vlm_artifact` is the ArtifactReward question with
  reward `1 - p(yes)`.
- **PromptEcho**: the mean log-probability of the prompt's tokens as the answer to "Describe this image."
  (the image "echoes" its prompt).
- **pairwise win rate** (Pref-GRPO): every pair of a group's images is judged ("Which image better matches
  ...? Answer 1 or 2", first-token logits); a sample's reward is its win rate against the rest of its group,
  ties count 0.5. Win rates in a group always average 0.5.

Where the processor is used: only its tokenizer, its chat template and the *numbers* in its image processor
config (patch size, merge size, min/max pixels, mean/std). Pixels never go through it: `QwenVisionPreprocess`
redoes Qwen2-VL's smart resize (bicubic, antialiased, clipped to [0, 1]), normalisation and patch flattening
in torch, so the judge runs on GPU tensors and is differentiable with respect to the pixels. Versus the image
processor on the same 8-bit image (PIL / uint8, what users feed it): sizes, grid and patch order are exact;
values differ only by the processor's rounding of resized pixels to 1/255 (tests bound it).

Loading goes through `rewards.hub` (hub id or local directory, one clear error naming the id and the
download command when weights are missing offline) and reads safetensors only. transformers is imported lazily.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rewards.base import REWARDS, check_images

logger = logging.getLogger(__name__)

DEFAULT_VLM = "Qwen/Qwen2.5-VL-3B-Instruct"
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

YES_QUESTION = 'Does this image show "{prompt}"? Answer Yes or No.'
# ArtifactReward's optimised question (reward = 1 - p(yes)).
ARTIFACT_QUESTION = (
    "Does this image contain visual artifacts such as distorted anatomy, malformed objects, or unnatural "
    "textures? Answer Yes or No."
)
ECHO_QUERY = "Describe this image."
PAIRWISE_QUESTION = 'Which image better matches the description "{prompt}"? Answer 1 or 2.'


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------


def _parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    from rewards.hub import resolve_dtype

    if dtype is None:  # bf16 on accelerators (a 3B judge in fp32 is 12 GB), fp32 on CPU where bf16 is slow
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return resolve_dtype(dtype)


_LOADED: dict[tuple[str, str, torch.dtype], tuple[Any, Any]] = {}


def load_vlm(
    model_id_or_path: str = DEFAULT_VLM,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """Loads a Qwen2-VL / Qwen2.5-VL model and its processor from a hub id or a local directory.

    Loaded models are cached per (path, device, dtype), so `vlm_yes` and `vlm_artifact` on the same
    checkpoint share one copy. Weights are read from safetensors only.

    Returns:
        `(model, processor)`, the model in eval mode with `requires_grad_(False)`.
    """
    from rewards.hub import check_source, explain_missing, resolve_device

    dev = resolve_device(device)
    dt = _parse_dtype(dtype, dev)
    source = check_source(model_id_or_path, what="VLM judge", kwarg="model")
    key = (source, str(dev), dt)
    if key in _LOADED:
        return _LOADED[key]
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    with explain_missing(source, what="VLM judge", kwarg="model"):
        model_type = getattr(AutoConfig.from_pretrained(source), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{model_id_or_path!r} is a {model_type!r} model; the VLM judge supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (e.g. {DEFAULT_VLM})"
            )
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dt, use_safetensors=True)
        processor = AutoProcessor.from_pretrained(source)
    model = model.to(dev).eval().requires_grad_(False)
    _LOADED[key] = (model, processor)
    return model, processor


def clear_vlm_cache() -> None:
    """Drops the cached models (frees their memory once no judge holds them)."""
    _LOADED.clear()


# ---------------------------------------------------------------------------------------------------------
# torch preprocessing (Qwen2-VL image processor, redone in torch)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QwenVisionPreprocess:
    """Qwen2-VL / Qwen2.5-VL image preprocessing in torch: smart resize, normalise, flatten patches.

    Same steps and numbers as `transformers`' `Qwen2VLImageProcessor` (resize both sides to multiples of
    `patch_size * merge_size` with the pixel count in [min_pixels, max_pixels], bicubic with antialias;
    `(x - mean) / std`; patches ordered merge-window by merge-window and repeated `temporal_patch_size` times
    for a still image).
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_processor(cls, processor: Any, *, min_pixels: int | None = None, max_pixels: int | None = None):
        """Reads the numbers from a processor (or a bare image processor); pixel bounds can be overridden."""
        ip = getattr(processor, "image_processor", processor)
        size = getattr(ip, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda k, d=None: getattr(size, k, d)
        lo = min_pixels or get("shortest_edge", None) or getattr(ip, "min_pixels", None) or cls.min_pixels
        hi = max_pixels or get("longest_edge", None) or getattr(ip, "max_pixels", None) or cls.max_pixels
        return cls(
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            min_pixels=int(lo),
            max_pixels=int(hi),
            mean=tuple(float(m) for m in ip.image_mean),
            std=tuple(float(s) for s in ip.image_std),
        )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Qwen2-VL's `smart_resize`: nearest multiples of `patch*merge`, then rescaled into the pixel bounds."""
        factor = self.patch_size * self.merge_size
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"aspect ratio of a {height}x{width} image exceeds 200, which Qwen2-VL rejects")
        h = round(height / factor) * factor
        w = round(width / factor) * factor
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return h, w

    def num_tokens(self, height: int, width: int) -> int:
        """Image placeholder tokens the language model sees for one `height x width` image."""
        h, w = self.target_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images `[B,3,H,W]` in [0, 1] -> `pixel_values [B*gh*gw, 3*T*p*p]` (fp32), `image_grid_thw [B,3]`."""
        b, c, height, width = images.shape
        h, w = self.target_size(height, width)
        x = images.float()
        if (h, w) != (height, width):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; the processor's uint8 resize clips there too
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p)
        # -> [B, gh/m, gw/m, m, m, C, p, p]: patches grouped by the 2x2 windows the merger fuses
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)  # a still image = T identical frames
        pixel_values = x.reshape(b * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=images.device)
        return pixel_values, grid


# ---------------------------------------------------------------------------------------------------------
# the judge
# ---------------------------------------------------------------------------------------------------------


class VLMJudge:
    """Scores images with a frozen Qwen2-VL / Qwen2.5-VL: first-token logits and answer log-probs.

    Sequences are rendered with the processor's chat template (user turn: the images, then the text; then
    the assistant header), tokenised once per distinct text (cached), left-padded so the last position of
    every row is the answer position, and run in batches of `batch_size` sequences. Methods follow the
    caller's grad mode; the registered rewards call them under `no_grad` unless `differentiable=True`.

    Args:
        model: a `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`.
        processor: its processor (tokenizer + chat template + image-processor numbers).
        batch_size: sequences per forward pass.
        min_pixels, max_pixels: override the processor's pixel bounds (fewer pixels = fewer image tokens).
        cache_size: entries of the tokenised-text cache (each prompt is scored G times per step).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        batch_size: int = 8,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        cache_size: int = 4096,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.batch_size = batch_size
        self.preprocess = QwenVisionPreprocess.from_processor(processor, min_pixels=min_pixels, max_pixels=max_pixels)
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self._cache: dict[tuple[str, int], list[int]] = {}
        self._cache_size = cache_size
        self._forward_args = frozenset(inspect.signature(model.forward).parameters)
        if (
            getattr(self.tokenizer, "chat_template", None) is None
            and getattr(processor, "chat_template", None) is None
        ):
            raise ValueError(
                "the VLM processor has no chat template; use an Instruct checkpoint (e.g. Qwen2.5-VL-*-Instruct)"
            )

    # -- tokens ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def single_token_id(self, text: str) -> int:
        """Id of `text` as one token (an answer word such as "Yes"); a clear error if it splits."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"answer {text!r} is {len(ids)} tokens for this tokenizer; pick a single-token answer")
        return int(ids[0])

    def _prefix_ids(self, text: str, num_images: int) -> list[int]:
        """Chat-template tokens of a user turn with `num_images` images then `text`, plus the assistant header.

        Each image is a single `<|image_pad|>` here; `_expand` widens it to the image's token count.
        """
        key = (text, num_images)
        ids = self._cache.get(key)
        if ids is None:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
            messages = [{"role": "user", "content": content}]
            owner = self.processor if hasattr(self.processor, "apply_chat_template") else self.tokenizer
            rendered = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = list(self.tokenizer.encode(rendered, add_special_tokens=False))
            found = sum(i == self.image_token_id for i in ids)
            if found != num_images:
                raise ValueError(f"chat template produced {found} image placeholders for {num_images} images")
            self._remember(key, ids)
        return ids

    def _answer_ids(self, text: str) -> list[int]:
        key = (text, -1)  # -1 images: an answer, never a prefix
        ids = self._cache.get(key)
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            if not ids:
                raise ValueError(f"answer {text!r} has no tokens")
            self._remember(key, ids)
        return ids

    def _remember(self, key: tuple[str, int], ids: list[int]) -> None:
        if len(self._cache) >= self._cache_size:  # drop the oldest entry (dicts keep insertion order)
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = ids

    def _expand(self, ids: list[int], tokens_per_image: int) -> list[int]:
        out: list[int] = []
        for i in ids:
            out.extend([i] * tokens_per_image if i == self.image_token_id else [i])
        return out

    # -- forward --------------------------------------------------------------------------------------------

    def _forward(self, rows: list[list[int]], images: Tensor, keep: int) -> Tensor:
        """Runs left-padded `rows` with `images` (`[N_img,3,H,W]`, in row order); logits of the last `keep`
        positions, fp32 `[R, keep, V]`."""
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for k, r in enumerate(rows):
            input_ids[k, length - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[k, length - len(r) :] = 1
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        pixel_values, grid = self.preprocess(images.to(dev))
        kwargs: dict[str, Any] = {}
        if "mm_token_type_ids" in self._forward_args:  # transformers >= 5 builds M-RoPE positions from it
            kwargs["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        if "logits_to_keep" in self._forward_args:  # only the answer positions: V is ~152k for Qwen
            kwargs["logits_to_keep"] = keep
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values.to(self.dtype),
            image_grid_thw=grid,
            use_cache=False,
            **kwargs,
        )
        return out.logits[:, -keep:].float()

    def first_token_logits(self, images: Tensor, questions: Sequence[str]) -> Tensor:
        """Logits of the first answer token for each (image, question): `[B,3,H,W], B -> [B, V]` fp32."""
        if len(questions) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(questions)} questions")
        n_tok = self.preprocess.num_tokens(images.shape[-2], images.shape[-1])
        out = []
        for s in range(0, len(questions), self.batch_size):
            qs = questions[s : s + self.batch_size]
            rows = [self._expand(self._prefix_ids(q, 1), n_tok) for q in qs]
            out.append(self._forward(rows, images[s : s + len(qs)], keep=1)[:, 0])
        return torch.cat(out)

    def pair_first_token_logits(
        self, images: Tensor, pairs: Sequence[tuple[int, int]], questions: Sequence[str]
    ) -> Tensor:
        """First-answer-token logits for questions about two images each: `images [N,3,H,W]`, `pairs` of
        indices `(image 1, image 2)`, one question per pair -> `[len(pairs), V]` fp32.

        Images are gathered per batch, so G(G-1) ordered pairs never hold G(G-1) image copies at once."""
        if len(pairs) != len(questions):
            raise ValueError(f"got {len(pairs)} pairs but {len(questions)} questions")
        n_tok = self.preprocess.num_tokens(images.shape[-2], images.shape[-1])
        out = []
        for s in range(0, len(questions), self.batch_size):
            qs, chunk = questions[s : s + self.batch_size], pairs[s : s + self.batch_size]
            rows = [self._expand(self._prefix_ids(q, 2), n_tok) for q in qs]
            order = [i for pair in chunk for i in pair]  # placeholder order: a0 b0 a1 b1 ...
            out.append(self._forward(rows, images[order], keep=1)[:, 0])
        return torch.cat(out)

    def yes_probability(self, images: Tensor, questions: Sequence[str], yes: str = "Yes", no: str = "No") -> Tensor:
        """`p = softmax([l_yes, l_no])[yes]` of the first answer token: `[B]` in [0, 1]."""
        logits = self.first_token_logits(images, questions)
        pair = logits[:, [self.single_token_id(yes), self.single_token_id(no)]]
        return pair.softmax(dim=-1)[:, 0]

    def answer_logprob(self, images: Tensor, queries: Sequence[str], answers: Sequence[str]) -> Tensor:
        """Mean log-prob of each answer's tokens given its image and query (PromptEcho): `[B]` fp32, <= 0."""
        if not (len(queries) == len(answers) == images.shape[0]):
            raise ValueError(f"got {images.shape[0]} images, {len(queries)} queries, {len(answers)} answers")
        n_tok = self.preprocess.num_tokens(images.shape[-2], images.shape[-1])
        out = []
        for s in range(0, len(answers), self.batch_size):
            prefixes = [self._expand(self._prefix_ids(q, 1), n_tok) for q in queries[s : s + self.batch_size]]
            targets = [self._answer_ids(a) for a in answers[s : s + self.batch_size]]
            rows = [p + t for p, t in zip(prefixes, targets, strict=True)]
            keep = max(len(t) for t in targets) + 1
            # logits at position i predict token i+1: the last len(t)+1 positions minus the final one
            logp = self._forward(rows, images[s : s + len(rows)], keep=keep).log_softmax(dim=-1)
            for k, t in enumerate(targets):
                n = len(t)
                pred = logp[k, keep - n - 1 : keep - 1]  # [n, V]
                out.append(pred.gather(-1, torch.tensor(t, device=pred.device).unsqueeze(-1)).mean())
        return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------------------


def fill_prompt(template: str, prompt: str) -> str:
    """`template` with `{prompt}` replaced (plain replacement: other braces in prompts are left alone)."""
    return template.replace("{prompt}", prompt)


def _judge(model: Any, processor: Any, device: Any, dtype: Any, **judge_kwargs: Any) -> VLMJudge:
    """A judge from a hub id / local path (resolved and cached), or from a given model object."""
    if isinstance(model, str):
        model, processor = load_vlm(model, device=device, dtype=dtype)
    elif processor is None:
        raise ValueError("pass `processor=` together with a model object (or pass the model as a hub id / path)")
    return VLMJudge(model, processor, **judge_kwargs)


def _grad_context(differentiable: bool):
    return torch.enable_grad() if differentiable else torch.no_grad()


@REWARDS.register("vlm_yes")
def vlm_yes(
    model: Any = DEFAULT_VLM,
    *,
    processor: Any = None,
    question: str = YES_QUESTION,
    yes: str = "Yes",
    no: str = "No",
    invert: bool = False,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    differentiable: bool = False,
    **_: Any,
):
    """p(yes) of a yes/no question about each image (`{prompt}` in `question` is the sample's prompt).

    Args:
        model: hub id or local directory (Qwen2-VL / Qwen2.5-VL), or a loaded model with `processor=`.
        question: the question template; `{prompt}` is replaced by each sample's prompt.
        yes, no: the answer tokens compared (single tokens of the tokenizer).
        invert: return `1 - p(yes)` (for questions where "Yes" is bad, e.g. artifacts).
        differentiable: keep the graph to the pixels (reward-gradient methods); else runs under no_grad.

    Returns:
        reward `(images [B,3,H,W] in [0,1], prompts) -> [B]` fp32 in [0, 1].
    """
    judge = _judge(
        model, processor, device, dtype, batch_size=batch_size, min_pixels=min_pixels, max_pixels=max_pixels
    )
    judge.single_token_id(yes), judge.single_token_id(no)  # fail at build time, not mid-training

    def reward(images: Tensor, prompts: Sequence[str], **columns: Any) -> Tensor:
        check_images(images.detach() if isinstance(images, Tensor) else images, "vlm_yes")
        with _grad_context(differentiable):
            p = judge.yes_probability(images, [fill_prompt(question, pr) for pr in prompts], yes=yes, no=no)
        return (1.0 - p if invert else p).cpu()

    reward.judge = judge  # type: ignore[attr-defined]
    return reward


@REWARDS.register("vlm_artifact")
def vlm_artifact(model: Any = DEFAULT_VLM, *, question: str = ARTIFACT_QUESTION, **kwargs: Any):
    """ArtifactReward: `1 - p(yes)` for "Does this image contain visual artifacts ...? Answer Yes or No."

    Higher = fewer artifacts. Takes the same keyword arguments as `vlm_yes`.
    """
    kwargs.pop("invert", None)
    return vlm_yes(model, question=question, invert=True, **kwargs)


@REWARDS.register("promptecho")
def promptecho(
    model: Any = DEFAULT_VLM,
    *,
    processor: Any = None,
    query: str = ECHO_QUERY,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    differentiable: bool = False,
    **_: Any,
):
    """PromptEcho: mean log-prob of the prompt's tokens as the VLM's answer to `query` about the image.

    Returns:
        reward `(images, prompts) -> [B]` fp32 (<= 0; higher = the image says its prompt more clearly).
    """
    judge = _judge(
        model, processor, device, dtype, batch_size=batch_size, min_pixels=min_pixels, max_pixels=max_pixels
    )

    def reward(images: Tensor, prompts: Sequence[str], **columns: Any) -> Tensor:
        check_images(images.detach() if isinstance(images, Tensor) else images, "promptecho")
        with _grad_context(differentiable):
            return judge.answer_logprob(images, [query] * len(prompts), list(prompts)).cpu()

    reward.judge = judge  # type: ignore[attr-defined]
    return reward


def group_indices(batch_size: int, group_ids: Sequence[Hashable] | None, group_size: int | None) -> list[list[int]]:
    """Sample indices of each group, from a `group_ids` column (any order) or consecutive blocks of `group_size`."""
    if group_ids is not None:
        if isinstance(group_ids, Tensor):  # tensor elements hash by identity; compare values instead
            group_ids = group_ids.tolist()
        if len(group_ids) != batch_size:
            raise ValueError(f"group_ids has {len(group_ids)} entries for {batch_size} images")
        groups: dict[Hashable, list[int]] = {}
        for i, g in enumerate(group_ids):
            groups.setdefault(g, []).append(i)
        return list(groups.values())
    if group_size is None:
        raise ValueError("vlm_pairwise needs a `group_ids` column or `group_size=` (samples p*G .. p*G+G-1)")
    if group_size < 1 or batch_size % group_size:
        raise ValueError(f"batch of {batch_size} is not a whole number of groups of size {group_size}")
    return [list(range(s, s + group_size)) for s in range(0, batch_size, group_size)]


def win_rates(
    p_first: Tensor, pairs: Sequence[tuple[int, int]], size: int, *, hard: bool, tie_margin: float
) -> Tensor:
    """Win rate of each of `size` items from P(i beats j) for each pair `(i, j)` (`p_first [N]`).

    `W[i,j] = p`, `W[j,i] = 1 - p`; with `hard`, each duel becomes 1 / 0, or 0.5 when `|p - 0.5| <= tie_margin`.
    Reward_i = mean over j != i of W[i,j], so the rates of a group average exactly 0.5.
    """
    if size == 1:
        return torch.full((1,), 0.5)
    w = torch.zeros(size, size)
    for (i, j), p in zip(pairs, p_first.float().cpu().tolist(), strict=True):
        if hard:
            p = 0.5 if abs(p - 0.5) <= tie_margin else float(p > 0.5)
        w[i, j], w[j, i] = p, 1.0 - p
    return w.sum(dim=1) / (size - 1)


@REWARDS.register("vlm_pairwise")
def vlm_pairwise(
    model: Any = DEFAULT_VLM,
    *,
    processor: Any = None,
    question: str = PAIRWISE_QUESTION,
    first: str = "1",
    second: str = "2",
    group_size: int | None = None,
    symmetric: bool = True,
    hard: bool = True,
    tie_margin: float = 0.0,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    **_: Any,
):
    """Pref-GRPO pairwise win rate: judge every pair of a group's images, reward = win rate (ties 0.5).

    P(image 1 better) = `softmax([l_first, l_second])[0]` of the first answer token. With `symmetric` each pair
    is judged in both orders and averaged (`(p_ij + 1 - p_ji) / 2`), which cancels the judge's position bias.
    A group of G costs G(G-1) forward passes (G(G-1)/2 without `symmetric`).

    Groups come from the `group_ids` column (one hashable per sample) or, without it, from `group_size`
    (consecutive blocks). All samples of a group must share a prompt.

    Returns:
        reward `(images, prompts, group_ids=None) -> [B]` in [0, 1]; each group's rewards average 0.5.
    """
    judge = _judge(
        model, processor, device, dtype, batch_size=batch_size, min_pixels=min_pixels, max_pixels=max_pixels
    )
    id_first, id_second = judge.single_token_id(first), judge.single_token_id(second)

    def reward(images: Tensor, prompts: Sequence[str], **columns: Any) -> Tensor:
        check_images(images.detach() if isinstance(images, Tensor) else images, "vlm_pairwise")
        groups = group_indices(images.shape[0], columns.get("group_ids"), group_size)
        out = torch.empty(images.shape[0])
        with torch.no_grad():
            for members in groups:
                if len({prompts[i] for i in members}) > 1:
                    raise ValueError(f"vlm_pairwise: a group mixes prompts {sorted({prompts[i] for i in members})}")
                pairs = [(a, b) for a in range(len(members)) for b in range(a + 1, len(members))]
                if not pairs:
                    out[members] = 0.5
                    continue
                order = pairs + [(b, a) for a, b in pairs] if symmetric else pairs
                global_order = [(members[a], members[b]) for a, b in order]
                q = fill_prompt(question, prompts[members[0]])
                logits = judge.pair_first_token_logits(images, global_order, [q] * len(order))
                p = logits[:, [id_first, id_second]].softmax(dim=-1)[:, 0].cpu()
                if symmetric:
                    p = 0.5 * (p[: len(pairs)] + 1.0 - p[len(pairs) :])
                out[members] = win_rates(p, pairs, len(members), hard=hard, tie_margin=tie_margin)
        return out

    reward.judge = judge  # type: ignore[attr-defined]
    return reward
