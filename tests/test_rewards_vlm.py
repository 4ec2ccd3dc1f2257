"""VLM judges on a tiny random Qwen2(.5)-VL saved to disk and loaded back through `rewards.vlm.load_vlm`.

The tiny model (tests/_tiny_vlm.py) has a 20-token word-level vocabulary; questions are mostly `[UNK]`,
which is fine: the checks are shapes, ranges, invariants and agreement with independent computations.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import build_reward
from rewards.vlm import (
    ARTIFACT_QUESTION,
    ECHO_QUERY,
    PAIRWISE_QUESTION,
    YES_QUESTION,
    QwenVisionPreprocess,
    fill_prompt,
    group_indices,
    load_vlm,
    win_rates,
)
from tests._tiny_vlm import save_tiny_vlm, tiny_processor

PROMPTS = ["a red cat", "a blue dog", "cat", "a dog a cat a red dog"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return str(save_tiny_vlm(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), "qwen2_5_vl"))


@pytest.fixture(scope="module")
def images():
    # inside [0.2, 0.8]: bicubic overshoot stays clear of the [0, 1] clip, so the processor's float path
    # (which does not clip) is an exact reference
    g = torch.Generator().manual_seed(0)
    return 0.2 + 0.6 * torch.rand(4, 3, 64, 80, generator=g)


def _smooth_image(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6 * xx * yy)]).clamp(0, 1)


# --- preprocessing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 80), (56, 56), (100, 37), (300, 200)])
def test_preprocess_matches_processor_on_float_input(shape):
    proc = tiny_processor()
    pre = QwenVisionPreprocess.from_processor(proc)
    # values kept inside [0.1, 0.9] so bicubic overshoot never reaches our clip to [0, 1] (the float
    # processor path does not clip; its uint8 path does, see the next test)
    x = (0.1 + 0.8 * _smooth_image(*shape))[None].repeat(2, 1, 1, 1)
    pv, grid = pre(x)
    ref = proc.image_processor(images=list(x), do_rescale=False, return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(pv, ref["pixel_values"], atol=1e-5, rtol=0)


def test_preprocess_matches_processor_on_8bit_image():
    # The processor resizes uint8 pixels (rounding to 1/255): at most ~1 level of 1/255 on a smooth image,
    # i.e. 1 / 255 / std(0.26) ~ 0.015 in normalised units.
    proc = tiny_processor()
    pre = QwenVisionPreprocess.from_processor(proc)
    u8 = (_smooth_image(123, 211) * 255).round().to(torch.uint8)
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy())
    ref = proc.image_processor(images=[pil], return_tensors="pt")
    pv, grid = pre(u8[None].float() / 255)
    assert torch.equal(grid, ref["image_grid_thw"])
    diff = (pv - ref["pixel_values"]).abs()
    assert diff.max() < 0.02 and diff.mean() < 0.006


def test_smart_resize_bounds_and_reference():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    pre = QwenVisionPreprocess(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    for h, w in [(10, 10), (1000, 700), (64, 400), (64, 4000), (512, 512)]:
        th, tw = pre.target_size(h, w)
        assert (th, tw) == smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 16)
        assert th % 28 == 0 and tw % 28 == 0
        if max(h, w) / min(h, w) < 10:  # extreme ratios keep one side at 28 and may exceed max_pixels
            assert 56 * 56 <= th * tw <= 28 * 28 * 16
    assert pre.num_tokens(56, 84) == (4 * 6) // 4


def test_preprocess_is_differentiable():
    pre = QwenVisionPreprocess(min_pixels=28 * 28, max_pixels=56 * 56)
    x = torch.rand(1, 3, 40, 50, requires_grad=True)
    pv, _ = pre(x)
    pv.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- yes / no ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_vlm_yes_loads_and_scores(family, tmp_path, images):
    path = save_tiny_vlm(tmp_path / family, family)
    reward = build_reward("vlm_yes", model=str(path), device="cpu", batch_size=3)
    p = reward(images, PROMPTS)
    assert p.shape == (4,) and p.dtype == torch.float32
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()


def test_yes_probability_equals_processor_path(vlm_dir, images):
    """Independent computation: the official processor builds the inputs, the model gives the logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reward = build_reward("vlm_yes", model=vlm_dir, device="cpu", batch_size=4)
    got = reward(images, PROMPTS)

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    processor = AutoProcessor.from_pretrained(vlm_dir)
    yes_id, no_id = processor.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    expected = []
    for img, prompt in zip(images, PROMPTS, strict=True):
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": fill_prompt(YES_QUESTION, prompt)}],
            }
        ]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[img], do_rescale=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        # p = softmax([l_yes, l_no])[yes] = 1 / (1 + exp(l_no - l_yes))
        expected.append(1.0 / (1.0 + math.exp(float(logits[no_id] - logits[yes_id]))))
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)


def test_batching_and_padding_do_not_change_scores(vlm_dir, images):
    batched = build_reward("vlm_yes", model=vlm_dir, device="cpu", batch_size=4)(images, PROMPTS)
    single = build_reward("vlm_yes", model=vlm_dir, device="cpu", batch_size=1)
    one_by_one = torch.cat([single(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)


def test_vlm_artifact_is_one_minus_yes(vlm_dir, images):
    artifact = build_reward("vlm_artifact", model=vlm_dir, device="cpu")(images, PROMPTS)
    yes = build_reward("vlm_yes", model=vlm_dir, device="cpu", question=ARTIFACT_QUESTION)(images, PROMPTS)
    torch.testing.assert_close(artifact, 1.0 - yes)
    assert ((artifact >= 0) & (artifact <= 1)).all()


def test_models_are_loaded_once_and_cached_text(vlm_dir, images):
    r1 = build_reward("vlm_yes", model=vlm_dir, device="cpu")
    r2 = build_reward("vlm_artifact", model=vlm_dir, device="cpu")
    assert r1.judge.model is r2.judge.model
    r1(images, PROMPTS)
    n = len(r1.judge._cache)
    r1(images, PROMPTS)  # same prompts again: nothing new to tokenise
    assert len(r1.judge._cache) == n


def test_multi_token_answer_is_rejected(vlm_dir):
    with pytest.raises(ValueError, match="single-token"):
        build_reward("vlm_yes", model=vlm_dir, device="cpu", yes="Yes No")


def test_rejects_images_outside_unit_range(vlm_dir):
    reward = build_reward("vlm_yes", model=vlm_dir, device="cpu")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(torch.full((1, 3, 56, 56), 2.0), ["cat"])


def test_non_qwen_checkpoint_is_rejected(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        load_vlm(str(tmp_path), device="cpu")


def test_missing_hub_weights_offline_give_one_clear_error():
    from rewards.hub import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="hf download flowalign-test/no-such-vlm"):
        load_vlm("flowalign-test/no-such-vlm", device="cpu")


def test_missing_local_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_vlm(str(tmp_path / "does-not-exist"), device="cpu")


# --- PromptEcho -------------------------------------------------------------------------------------------


def test_promptecho_equals_mean_token_logprob(vlm_dir, images):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    got = build_reward("promptecho", model=vlm_dir, device="cpu", batch_size=3)(images, PROMPTS)
    assert got.shape == (4,) and torch.isfinite(got).all() and (got <= 0).all()

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    processor = AutoProcessor.from_pretrained(vlm_dir)
    for k, (img, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ECHO_QUERY}]}]
        prefix = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[prefix + prompt], images=[img], do_rescale=False, return_tensors="pt")
        target = processor.tokenizer.encode(prompt, add_special_tokens=False)
        with torch.no_grad():
            logp = model(**inputs).logits[0].log_softmax(-1)
        n, length = len(target), inputs["input_ids"].shape[1]
        # position i predicts token i+1: the prompt occupies the last n positions
        expected = np.mean([float(logp[length - n - 1 + i, t]) for i, t in enumerate(target)])
        assert abs(float(got[k]) - expected) < 1e-4


# --- pairwise ---------------------------------------------------------------------------------------------


def test_win_rates_hand_computed():
    # P(0 beats 1) = 0.8, P(0 beats 2) = 0.3, P(1 beats 2) = 0.5
    p, pairs = torch.tensor([0.8, 0.3, 0.5]), [(0, 1), (0, 2), (1, 2)]
    soft = win_rates(p, pairs, 3, hard=False, tie_margin=0.0)
    # r0 = (0.8 + 0.3) / 2, r1 = (0.2 + 0.5) / 2, r2 = (0.7 + 0.5) / 2
    torch.testing.assert_close(soft, torch.tensor([0.55, 0.35, 0.60]))
    hard = win_rates(p, pairs, 3, hard=True, tie_margin=0.0)
    # duels: 0 beats 1, 2 beats 0, 1-2 tie (0.5 each): r0 = 1/2, r1 = 0.5/2, r2 = 1.5/2
    torch.testing.assert_close(hard, torch.tensor([0.5, 0.25, 0.75]))
    wide = win_rates(p, pairs, 3, hard=True, tie_margin=0.35)  # |0.8-0.5| and |0.3-0.5| are ties now
    torch.testing.assert_close(wide, torch.full((3,), 0.5))
    assert win_rates(torch.empty(0), [], 1, hard=True, tie_margin=0.0).tolist() == [0.5]


def test_group_indices():
    assert group_indices(4, None, 2) == [[0, 1], [2, 3]]
    assert group_indices(4, ["a", "b", "a", "b"], None) == [[0, 2], [1, 3]]
    assert group_indices(4, torch.tensor([7, 3, 7, 3]), None) == [[0, 2], [1, 3]]  # by value, not identity
    with pytest.raises(ValueError, match="group_ids"):
        group_indices(4, None, None)
    with pytest.raises(ValueError, match="whole number"):
        group_indices(5, None, 2)


def test_pair_logits_equal_processor_path(vlm_dir, images):
    """Two images in one user turn, in order: the judge's sequence equals the official processor's."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reward = build_reward("vlm_pairwise", model=vlm_dir, device="cpu", group_size=2)
    question = fill_prompt(PAIRWISE_QUESTION, "a red cat")
    got = reward.judge.pair_first_token_logits(images, [(2, 0), (1, 3)], [question, question])

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    processor = AutoProcessor.from_pretrained(vlm_dir)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    for row, (a, b) in enumerate([(2, 0), (1, 3)]):
        inputs = processor(text=[text], images=[images[a], images[b]], do_rescale=False, return_tensors="pt")
        with torch.no_grad():
            expected = model(**inputs).logits[0, -1]
        torch.testing.assert_close(got[row], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("hard", [True, False])
def test_pairwise_win_rates_average_half_per_group(vlm_dir, hard):
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(6, 3, 56, 56, generator=g)
    group_ids = [0, 1, 0, 1, 0, 1]  # interleaved groups of 3
    prompts = ["a red cat" if gid == 0 else "a blue dog" for gid in group_ids]
    reward = build_reward("vlm_pairwise", model=vlm_dir, device="cpu", hard=hard, batch_size=4)
    r = reward(imgs, prompts, group_ids=group_ids)
    assert r.shape == (6,) and torch.isfinite(r).all() and ((r >= 0) & (r <= 1)).all()
    for gid in (0, 1):
        members = [i for i, x in enumerate(group_ids) if x == gid]
        assert abs(float(r[members].mean()) - 0.5) < 1e-6
    if hard:  # win rates over 2 opponents with ties at 0.5 are multiples of 1/4
        assert torch.allclose(r * 4, (r * 4).round())


def test_pairwise_group_size_and_errors(vlm_dir):
    imgs = torch.rand(4, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    reward = build_reward("vlm_pairwise", model=vlm_dir, device="cpu", group_size=2, symmetric=False)
    r = reward(imgs, ["cat", "cat", "dog", "dog"])
    torch.testing.assert_close(r[:2].sum(), torch.tensor(1.0))
    torch.testing.assert_close(r[2:].sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="mixes prompts"):
        reward(imgs, ["cat", "dog", "dog", "dog"])
    no_groups = build_reward("vlm_pairwise", model=vlm_dir, device="cpu")
    with pytest.raises(ValueError, match="group_ids"):
        no_groups(imgs, ["cat"] * 4)


# --- real weights (slow; skipped by default) ----------------------------------------------------------------


def _real_judge_or_skip(name: str, **kwargs):
    from rewards.hub import WeightsNotFoundError

    try:  # FLOWALIGN_QWEN_VL: a local copy (`hf download Qwen/Qwen2.5-VL-3B-Instruct --local-dir DIR`)
        return build_reward(name, model=os.environ.get("FLOWALIGN_QWEN_VL", "Qwen/Qwen2.5-VL-3B-Instruct"), **kwargs)
    except (WeightsNotFoundError, FileNotFoundError, OSError) as e:
        pytest.skip(f"Qwen2.5-VL-3B-Instruct weights unavailable: {e}")


def _red_square() -> torch.Tensor:
    img = torch.ones(1, 3, 448, 448)
    img[:, 1:, 112:336, 112:336] = 0.0  # a red square on white
    return img


@pytest.mark.slow
def test_real_qwen_yes_prefers_matching_caption():
    """Expected: p(yes) for "a red square on a white background" > 0.5 > p(yes) for "a dog on a beach"."""
    reward = _real_judge_or_skip("vlm_yes")
    img = _red_square().repeat(2, 1, 1, 1)
    p = reward(img, ["a red square on a white background", "a dog on a beach"])
    assert p[0] > 0.5 > p[1]


@pytest.mark.slow
def test_real_qwen_promptecho_prefers_matching_caption():
    """Expected: the matching caption has a higher mean token log-prob than a mismatching one."""
    reward = _real_judge_or_skip("promptecho")
    img = _red_square().repeat(2, 1, 1, 1)
    e = reward(img, ["a red square on a white background", "a dog running on a beach"])
    assert e[0] > e[1]


@pytest.mark.slow
def test_real_qwen_artifact_question_penalises_noise_blocks():
    """Expected: an image with heavy blocky noise patches scores lower on `vlm_artifact` than the clean one."""
    reward = _real_judge_or_skip("vlm_artifact")
    clean = _red_square()
    broken = clean.clone()
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 28, 28, generator=g)
    broken[:, :, 100:324, 100:324] = torch.nn.functional.interpolate(noise, size=(224, 224), mode="nearest")
    r = reward(torch.cat([clean, broken]), ["a red square", "a red square"])
    assert r[0] > r[1]


@pytest.mark.slow
def test_real_qwen_pairwise_prefers_matching_image():
    """Expected: in a group {red square, blue noise} for "a red square", the red square wins (rate 1 vs 0)."""
    reward = _real_judge_or_skip("vlm_pairwise", group_size=2)
    other = torch.rand(1, 3, 448, 448, generator=torch.Generator().manual_seed(0)) * torch.tensor([0, 0, 1.0]).view(
        1, 3, 1, 1
    )
    r = reward(torch.cat([_red_square(), other]), ["a red square"] * 2)
    assert r[0] > r[1]
