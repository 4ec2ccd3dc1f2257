"""DINO similarity and the Adv-GRPO discriminator head, on a tiny random `Dinov2Model` saved and reloaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from rewards.base import REWARDS
from rewards.dino import DinoDiscriminator, DinoEncoder, dino_discriminator, dino_similarity
from rewards.hub import WeightsNotFoundError
from rewards.preprocess import ImagePreprocess

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g) * 255).round() / 255


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _dinov2_processor(short: int = 256, crop: int = 224):
    """The image processor config facebook/dinov2-* ship (BitImageProcessor, bicubic, ImageNet statistics)."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        size={"shortest_edge": short},
        crop_size={"height": crop, "width": crop},
        resample=3,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> Path:
    """A tiny Dinov2Model (patch 4, 32x32 crop -> 8x8 patches) + its processor, saved like a hub snapshot."""
    from transformers import Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("dinov2")
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=32
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(path)
    _dinov2_processor(short=36, crop=32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward(tiny_dino):
    return dino_similarity(str(tiny_dino), device="cpu", batch_size=3)


# ---- preprocessing -----------------------------------------------------------------------------------------
def test_crop_and_normalise_match_bit_image_processor_exactly():
    """256 x 259: no resize (short side already 256), crop 224 at transformers' floor offsets (16, 17)."""
    proc = _dinov2_processor()
    x = _images(1, 256, 259)
    ref = proc(images=_pil(x[0]), return_tensors="pt")["pixel_values"]
    ours = ImagePreprocess.from_hf_processor(proc)
    assert ours.resize == 256 and ours.crop == (224, 224) and ours.crop_offset == "floor"
    assert torch.allclose(ours(x), ref, atol=1e-5)


@pytest.mark.parametrize("size", [(300, 341), (512, 512), (200, 180)])
def test_resize_matches_bit_image_processor_within_a_pixel_level(size):
    """Same two-pass resize as the processor's uint8 kernel; only its rounding to 1/255 remains (measured:
    max 1.10 levels, mean 0.32; with `quantize=True` max 2 levels, mean < 0.01)."""
    proc = _dinov2_processor()
    x = _images(1, *size, seed=1)
    ref = proc(images=_pil(x[0]), return_tensors="pt")["pixel_values"]
    ours = ImagePreprocess.from_hf_processor(proc)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for pre, max_levels, mean_levels in ((ours, 1.2, 0.35), (dataclasses.replace(ours, quantize=True), 2.001, 0.05)):
        d = (pre(x) - ref).abs() * std * 255
        assert d.max() <= max_levels and d.mean() <= mean_levels, (float(d.max()), float(d.mean()))


# ---- the encoder and the similarity head -------------------------------------------------------------------
def test_encoder_loads_from_a_directory_and_returns_tokens(tiny_dino):
    encoder = DinoEncoder(str(tiny_dino), device="cpu")
    cls, patches = encoder.tokens(_images(2, 40, 48))
    assert cls.shape == (2, 32) and patches.shape == (2, 64, 32) and encoder.patch_grid() == (8, 8)
    feats = encoder.image_features(_images(2, 40, 48))
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert encoder.image_features(_images(2, 40, 48), patch=True).shape == (2, 64)


def test_encoder_matches_the_official_processor_and_model(tiny_dino):
    from transformers import AutoImageProcessor, Dinov2Model

    x = _images(2, 36, 40)  # short side 36 = no resize: crop + normalise + model
    proc, model = AutoImageProcessor.from_pretrained(tiny_dino), Dinov2Model.from_pretrained(tiny_dino)
    with torch.no_grad():
        expected = model(**proc(images=[_pil(i) for i in x], return_tensors="pt")).pooler_output
    cls, _ = DinoEncoder(str(tiny_dino), device="cpu").tokens(x)
    assert torch.allclose(cls, expected, atol=1e-4)


def test_similarity_scores_with_gradients_and_self_similarity_one(reward):
    x = _images(4, 40, 48).requires_grad_(True)
    ref = _images(1, 50, 50, seed=7)[0]
    scores = reward(x, ["p"] * 4, reference_images=[ref, ref, ref, x[3].detach()])
    assert scores.shape == (4,) and torch.isfinite(scores).all() and scores.abs().max() <= 1 + 1e-5
    assert float(scores[3].detach()) == pytest.approx(1.0, abs=1e-5)  # an image against itself
    scores[:3].sum().backward()
    assert x.grad[:3].abs().sum() > 0


def test_references_as_paths_and_lists(reward, tmp_path):
    ref_a, ref_b = _images(1, 30, 30, seed=3)[0], _images(1, 64, 48, seed=4)[0]
    _pil(ref_a).save(tmp_path / "a.png")
    x = _images(1, 32, 32, seed=5).expand(3, -1, -1, -1).clone()  # one image against a, b, and [a, b]
    by_tensor = reward(x, ["p"] * 3, reference_images=[ref_a, ref_b, [ref_a, ref_b]])
    by_path = reward(x, ["p"] * 3, reference_images=[tmp_path / "a.png", ref_b, [str(tmp_path / "a.png"), ref_b]])
    assert torch.allclose(by_tensor, by_path, atol=1e-5)  # PNG round trip is exact for uint8 pixels
    assert by_tensor[2] == pytest.approx(float(by_tensor[:2].mean()), abs=1e-5)  # reduce="mean" over refs
    assert str(tmp_path / "a.png") in reward._path_cache


def test_shared_references_are_encoded_once(reward):
    calls = []
    tokens = reward.encoder.tokens

    def counting(images):
        calls.append(images.shape[0])
        return tokens(images)

    reward.encoder.tokens = counting
    try:
        ref = _images(1, 32, 32, seed=9)[0]
        reward(_images(4, 32, 32), ["p"] * 4, reference_images=[ref] * 4)  # one prompt, G = 4
    finally:
        del reward.encoder.tokens
    assert calls == [1, 4]  # the shared reference once, then the 4 samples


def test_patch_weight_mixes_in_the_mean_patch_cosine(tiny_dino):
    x, ref = _images(2, 32, 32), _images(1, 32, 32, seed=11)[0]
    cls_only = dino_similarity(str(tiny_dino), device="cpu")(x, ["p"] * 2, reference_images=[ref, ref])
    both = dino_similarity(str(tiny_dino), device="cpu", patch_weight=0.4)(x, ["p"] * 2, reference_images=[ref, ref])
    encoder = DinoEncoder(str(tiny_dino), device="cpu")
    _, patches = encoder.tokens(torch.cat([x, ref[None]]))
    mean_patch = torch.nn.functional.normalize(patches.mean(1), dim=-1)
    patch_cos = mean_patch[:2] @ mean_patch[2]
    assert torch.allclose(both, 0.6 * cls_only + 0.4 * patch_cos, atol=1e-5)


def test_missing_or_mismatched_column_is_a_clear_error(reward):
    with pytest.raises(ValueError, match="needs a 'reference_images' column"):
        reward(_images(2, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 'reference_images' entries"):
        reward(_images(2, 32, 32), ["a", "b"], reference_images=[_images(1, 32, 32)[0]])


# ---- the Adv-GRPO discriminator head -----------------------------------------------------------------------
def test_discriminator_weights_cls_and_64_patch_cells(tmp_path):
    head = DinoDiscriminator(dim=32, hidden=16)  # grid 8 -> 64 cells, 0.7 CLS + 0.3 patches
    cls, patches = torch.randn(3, 32), torch.randn(3, 256, 32)  # a 16 x 16 patch grid (DINOv2 at 224)
    cls_logit, cells = head.logits(cls, patches, (16, 16))
    assert cells.shape == (3, 64)
    expected = 0.7 * torch.sigmoid(cls_logit) + 0.3 * torch.sigmoid(cells).mean(-1)
    assert torch.allclose(head(cls, patches, (16, 16)), expected)
    head.save(tmp_path / "d.safetensors")
    loaded = DinoDiscriminator.load(tmp_path / "d.safetensors")
    assert torch.allclose(loaded(cls, patches, (16, 16)), head(cls, patches, (16, 16)))
    torch.save(head.state_dict(), tmp_path / "d.pt")
    with pytest.raises(ValueError, match="safetensors"):
        DinoDiscriminator.load(tmp_path / "d.pt")


def test_discriminator_learns_to_separate_real_from_fake():
    torch.manual_seed(0)
    head = DinoDiscriminator(dim=8, hidden=16, grid=2)
    real = (torch.randn(16, 8) + 1, torch.randn(16, 16, 8) + 1)
    fake = (torch.randn(16, 8) - 1, torch.randn(16, 16, 8) - 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = head.loss(real, fake, (4, 4)).detach().item()
    for _ in range(60):
        opt.zero_grad()
        head.loss(real, fake, (4, 4)).backward()
        opt.step()
    assert head.loss(real, fake, (4, 4)).detach().item() < 0.5 * first
    assert head(*real, (4, 4)).mean() > 0.8 and head(*fake, (4, 4)).mean() < 0.2


def test_discriminator_reward_loads_head_and_model(tiny_dino, tmp_path):
    DinoDiscriminator(dim=32, hidden=8, grid=4).save(tmp_path / "dino_discriminator.safetensors")
    fn = dino_discriminator(str(tmp_path), str(tiny_dino), device="cpu")
    x = _images(3, 40, 40).requires_grad_(True)
    scores = fn(x, ["p"] * 3)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    scores.sum().backward()
    assert x.grad.abs().sum() > 0


def test_registered_names():
    assert {"dino_similarity", "dino_discriminator"} <= set(REWARDS.names())


def test_missing_weights_offline_raise_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(WeightsNotFoundError) as excinfo:
        dino_similarity("facebook/dinov2-base", device="cpu")
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, FileNotFoundError) and excinfo.value.__cause__ is None
    assert "'facebook/dinov2-base'" in msg and "hf download facebook/dinov2-base --local-dir DIR" in msg
    assert "model='DIR'" in msg


# ---- real weights (slow) -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_dinov2_prefers_a_near_copy_of_the_reference():
    """A lightly noised copy of the reference is closer (in DINOv2 CLS space) than an unrelated image."""
    try:
        fn = dino_similarity("facebook/dinov2-small", device="cpu")
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    ref = torch.stack([xx, yy, (xx * yy) ** 0.5])  # a smooth colour field
    near = (ref + 0.03 * torch.randn_like(ref)).clamp(0, 1)
    other = torch.zeros_like(ref)
    other[:, 60:160, 60:160] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)  # a red square on black
    scores = fn(torch.stack([near, other]), ["p", "p"], reference_images=[ref, ref])
    assert scores[0] > scores[1], scores
