"""CLIP score heads, the torch preprocessing they share, and the hub-resolution helpers.

Tiny random CLIP models of the real architectures (open_clip `CLIP`, transformers `CLIPModel`) are built
from configs, saved to a temporary directory and loaded back through the user-facing loading code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.base import REWARDS
from rewards.clip import ClipEncoder, clip_score, clip_score_hf
from rewards.hub import WeightsNotFoundError, load_state_dict, resolve_file
from rewards.preprocess import ImagePreprocess, center_crop
from tests._real_weights import assert_matching_caption_wins

OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_OPEN_CLIP = "flowalign-test-tiny-clip"
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8-representable images in [0, 1] (so the processors see exactly the same pixels)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g) * 255).round() / 255


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _levels(ours: torch.Tensor, ref: torch.Tensor, std=OPENAI_STD) -> tuple[float, float]:
    """Max and mean |difference| in pixel levels (1/255), undoing the normalisation's std."""
    d = (ours - ref).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255
    return float(d.max()), float(d.mean())


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip CLIP: registered config + a safetensors file, and an open_clip-style local directory."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    cfg_path = root / f"{TINY_OPEN_CLIP}.json"
    cfg_path.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_OPEN_CLIP)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "weights.safetensors")
    local = root / "local"  # what `hf download laion/... --local-dir DIR` makes: config + weights
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG, "preprocess_cfg": {}}))
    save_file(state, local / "open_clip_model.safetensors")
    return {"file": root / "weights.safetensors", "dir": local, "model": model.eval()}


def _save_tiny_hf_clip(path: Path, image_size: int = 32, seed: int = 0) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from flowalign.tokenizer import clip_tokenizer

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text.update(max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(size=image_size, crop_size=image_size).save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_clip")
    _save_tiny_hf_clip(path)
    return path


@pytest.fixture(scope="module")
def hf_reward(tiny_hf_clip):
    """The transformers head loaded once through the user-facing factory (tests that only score share it)."""
    return clip_score_hf(str(tiny_hf_clip), device="cpu", batch_size=2)


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    """Offline with an empty Hugging Face cache, whatever this machine has cached."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---- preprocessing matches the official processors ---------------------------------------------------------
def test_crop_and_normalise_match_exactly_on_images_at_the_resize_target():
    """No resize happens (short side already 224), so only crop + normalise are compared: exact.

    224x227 has an odd margin of 3: transformers crops at int(3/2) = 1, torchvision/open_clip at round(1.5) = 2.
    """
    from open_clip.transform import PreprocessCfg, image_transform
    from transformers import CLIPImageProcessor

    x = _images(1, 224, 227)
    hf = CLIPImageProcessor(size=224, crop_size=224)
    ref = hf(images=_pil(x[0]), return_tensors="pt")["pixel_values"]
    assert torch.allclose(ImagePreprocess.from_hf_processor(hf)(x), ref, atol=1e-5)
    oc_ref = image_transform(224, is_train=False)(_pil(x[0]))[None]
    assert torch.allclose(ImagePreprocess.from_open_clip(PreprocessCfg())(x), oc_ref, atol=1e-5)
    assert not torch.allclose(ref, oc_ref, atol=1e-3)  # the two conventions really differ here


def test_center_crop_pads_small_images_like_torchvision():
    import torchvision.transforms.functional as tvF

    x = torch.rand(1, 3, 5, 9)
    assert torch.equal(center_crop(x, (8, 6)), tvF.center_crop(x, [8, 6]))


@pytest.mark.parametrize("size", [(300, 341), (512, 512), (160, 200)])
def test_resize_matches_processors_within_a_pixel_level(size):
    """Resizing (down and up) against transformers' CLIPImageProcessor (torchvision uint8 kernel), its PIL
    backend, and open_clip's transform on PIL images. Both libraries resize uint8 in two passes; we resize
    floats in the same two passes, so only their rounding to 1/255 remains (measured: max 1.06 levels,
    mean 0.30); with `quantize=True` max 2 levels (torchvision's fixed-point weights), mean < 0.03."""
    from open_clip.transform import PreprocessCfg, image_transform
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    x = _images(1, *size, seed=1)
    pil = _pil(x[0])
    hf_tv, hf_pil = CLIPImageProcessor(size=224, crop_size=224), CLIPImageProcessorPil(size=224, crop_size=224)
    cases = [
        (ImagePreprocess.from_hf_processor(hf_tv), hf_tv(images=pil, return_tensors="pt")["pixel_values"]),
        (ImagePreprocess.from_hf_processor(hf_pil), hf_pil(images=pil, return_tensors="pt")["pixel_values"]),
        (ImagePreprocess.from_open_clip(PreprocessCfg()), image_transform(224, is_train=False)(pil)[None]),
    ]
    for ours, ref in cases:
        assert ours(x).shape == ref.shape
        worst, mean = _levels(ours(x), ref)
        assert worst <= 1.2 and mean <= 0.35, (worst, mean)
        worst, mean = _levels(dataclasses.replace(ours, quantize=True)(x), ref)
        assert worst <= 2.0 + 1e-3 and mean <= 0.05, (worst, mean)


def test_single_pass_float_resize_is_exactly_torchvision_on_tensors():
    """open_clip's transform given a float tensor runs one torchvision float pass without clamping: exact."""
    from open_clip.transform import PreprocessCfg, image_transform

    x = _images(1, 300, 341, seed=2)
    ours = dataclasses.replace(ImagePreprocess.from_open_clip(PreprocessCfg()), two_pass=False, clamp=False)
    ref = image_transform(224, is_train=False)(x[0])[None]
    assert ours(x).shape == ref.shape
    assert torch.allclose(ours(x), ref, atol=1e-5)


def test_non_square_open_clip_target_rounds_like_resize_keep_ratio():
    """A non-square open_clip size resizes with ResizeKeepRatio (PIL only; sides rounded), then crops."""
    from open_clip.transform import PreprocessCfg, image_transform

    x = _images(1, 300, 341, seed=3)
    ours = ImagePreprocess.from_open_clip(PreprocessCfg(size=(224, 192)))
    assert ours.resized_size(300, 341) == (224, round(341 / (300 / 224)))
    ref = image_transform((224, 192), is_train=False)(_pil(x[0]))[None]
    assert ours(x).shape == ref.shape == (1, 3, 224, 192)
    worst, mean = _levels(ours(x), ref)
    assert worst <= 1.2 and mean <= 0.35, (worst, mean)


def test_resized_size_follows_each_library():
    p = ImagePreprocess(resize=224, resize_mode="shortest_edge")
    assert p.resized_size(300, 341) == (224, int(224 * 341 / 300))  # torchvision / transformers: floor
    q = ImagePreprocess(resize=(224, 192), resize_mode="fit_longest")
    assert q.resized_size(300, 341) == (round(300 / (341 / 192)), 192)  # open_clip ResizeKeepRatio: round


def test_preprocessing_is_differentiable():
    x = _images(2, 300, 341).requires_grad_(True)
    ImagePreprocess(resize=224, crop=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---- the heads on tiny models ------------------------------------------------------------------------------
def test_open_clip_head_loads_a_checkpoint_file_and_scores(tiny_open_clip):
    reward = clip_score(TINY_OPEN_CLIP, str(tiny_open_clip["file"]), device="cpu", batch_size=2)
    x = _images(5, 40, 50).requires_grad_(True)
    scores = reward(x, ["a red cube", "a blue ball", "a red cube", "a dog", "a cat"])
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert scores.abs().max() <= 1.0 + 1e-5  # raw cosine by default
    scores.sum().backward()
    assert x.grad.abs().sum() > 0


def test_open_clip_head_equals_the_official_open_clip_path(tiny_open_clip):
    """On images at the model's size (no resize), our score equals open_clip's own preprocess + encoders."""
    import open_clip

    x = _images(3, 32, 32)
    prompts = ["a red cube", "a blue ball", "two cats"]
    model, tokenizer = tiny_open_clip["model"], open_clip.get_tokenizer(TINY_OPEN_CLIP)
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_OPEN_CLIP)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(_pil(i)) for i in x]))
        txt = model.encode_text(tokenizer(prompts))
    expected = torch.nn.functional.cosine_similarity(img, txt)
    ours = clip_score(TINY_OPEN_CLIP, str(tiny_open_clip["file"]), device="cpu", scale=100.0)(x, prompts)
    assert torch.allclose(ours, 100 * expected, atol=1e-4)


def test_open_clip_head_loads_a_local_directory(tiny_open_clip):
    for model in (str(tiny_open_clip["dir"]), f"local-dir:{tiny_open_clip['dir']}"):
        encoder = ClipEncoder(model, device="cpu")
        assert encoder.backend == "open_clip"
        feats = encoder.image_features(_images(2, 32, 32))
        assert feats.shape == (2, 16) and torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_hf_clip_head_equals_the_official_processor_and_model(tiny_hf_clip, hf_reward):
    from transformers import CLIPModel, CLIPProcessor

    x = _images(3, 32, 32)
    prompts = ["a red cube", "a blue ball", "two cats on a sofa"]
    model, processor = CLIPModel.from_pretrained(tiny_hf_clip), CLIPProcessor.from_pretrained(tiny_hf_clip)
    inputs = processor(text=prompts, images=[_pil(i) for i in x], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal() / model.logit_scale.exp()
    assert torch.allclose(hf_reward(x, prompts), expected, atol=1e-4)


def test_hf_clip_head_scores_batches_with_gradients(hf_reward):
    x = _images(5, 48, 40).requires_grad_(True)
    scores = hf_reward(x, ["a", "b", "a", "c", "a"])  # batch_size=2: chunks of 2, 2, 1
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad.abs().sum() > 0
    hf_reward.encoder.batch_size = 8
    try:
        assert torch.allclose(hf_reward(x.detach(), ["a", "b", "a", "c", "a"]), scores.detach(), atol=1e-5)
    finally:
        hf_reward.encoder.batch_size = 2


def test_dtype_placement_keeps_similarity_fp32(tiny_hf_clip):
    encoder = ClipEncoder(str(tiny_hf_clip), device="cpu", dtype="bf16")
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    sims = encoder.similarity(_images(2, 32, 32), ["a", "b"])
    assert sims.dtype == torch.float32 and torch.isfinite(sims).all()


def test_text_features_are_cached_per_prompt(tiny_hf_clip):
    encoder = ClipEncoder(str(tiny_hf_clip), device="cpu", cache_size=3)  # the bare encoder, as other heads use it
    calls: list[list[str]] = []
    encode = encoder._encode_text

    def counting(prompts):
        calls.append(list(prompts))
        return encode(prompts)

    encoder._encode_text = counting
    group = ["a cat"] * 4 + ["a dog"] * 4  # 2 prompts x G=4
    first = encoder.text_features(group)
    assert calls == [["a cat", "a dog"]]  # each distinct prompt encoded once
    assert torch.equal(encoder.text_features(group), first) and len(calls) == 1  # then from the cache
    encoder.text_features(["p1", "p2", "p3"])  # cache_size=3 evicts the least recently used
    assert set(encoder._text_cache) == {"p1", "p2", "p3"}


def test_registered_names():
    assert {"clip_score", "clip_score_hf"} <= set(REWARDS.names())


def test_rejects_mismatched_prompts_and_bad_images(hf_reward):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        hf_reward(_images(2, 32, 32), ["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hf_reward(_images(1, 32, 32) * 3, ["a"])


# ---- missing weights: one clear error ----------------------------------------------------------------------
def _assert_one_clear_error(excinfo, *needles: str) -> None:
    err = excinfo.value
    assert isinstance(err, FileNotFoundError) and isinstance(err, WeightsNotFoundError)
    assert err.__cause__ is None and err.__suppress_context__  # raised `from None`: one message, not three
    for needle in needles:
        assert needle in str(err), (needle, str(err))


def test_missing_hf_weights_offline_raise_one_clear_error(offline_empty_cache):
    with pytest.raises(WeightsNotFoundError) as excinfo:
        clip_score_hf("openai/clip-vit-large-patch14", device="cpu")
    _assert_one_clear_error(
        excinfo,
        "clip_score_hf",
        "'openai/clip-vit-large-patch14'",
        "hf download openai/clip-vit-large-patch14 --local-dir DIR",
        "huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR",
        "model='DIR'",
    )


def test_missing_open_clip_tag_offline_raise_one_clear_error(offline_empty_cache):
    with pytest.raises(WeightsNotFoundError) as excinfo:
        clip_score("ViT-L-14", "openai", device="cpu")
    _assert_one_clear_error(
        excinfo,
        "timm/vit_large_patch14_clip_224.openai",
        "open_clip_pytorch_model.bin --local-dir DIR",
        "pretrained='DIR/open_clip_pytorch_model.bin'",
    )


def test_bad_local_paths_say_which_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor a Hugging Face Hub id"):
        clip_score_hf(str(tmp_path / "nope" / "clip"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is incomplete: no config.json"):
        clip_score_hf(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(FileNotFoundError, match="has no 'weights.bin'"):
        resolve_file(tmp_path / "empty", "weights.bin", what="x", kwarg="head")


class _NotATensor:
    pass


def test_state_dicts_load_safely_or_not_at_all(tmp_path):
    torch.save({"state_dict": {"module.w": torch.ones(2)}, "epoch": 3}, tmp_path / "ok.pt")
    assert list(load_state_dict(tmp_path / "ok.pt")) == ["w"]  # unwrapped, DataParallel prefix stripped
    torch.save({"w": torch.ones(2), "obj": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="never arbitrary pickles"):
        load_state_dict(tmp_path / "evil.pt")


# ---- real weights (slow; need the Hugging Face cache or network) -------------------------------------------
@pytest.mark.slow
def test_real_open_clip_matching_caption_wins():
    try:
        reward = clip_score("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))
    assert_matching_caption_wins(reward)


@pytest.mark.slow
def test_real_hf_clip_matching_caption_wins():
    try:
        reward = clip_score_hf("openai/clip-vit-large-patch14", device="cpu")
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))
    assert_matching_caption_wins(reward)
    assert np.isfinite(reward.encoder.logit_scale)
