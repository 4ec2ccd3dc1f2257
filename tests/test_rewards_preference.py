"""PickScore, HPSv2 and the LAION aesthetic predictor on tiny random models of their real architectures.

PickScore: a transformers `CLIPModel` directory + a separate processor directory written with the legacy
`CLIPFeatureExtractor` config the real `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` ships. HPSv2: an open_clip
`CLIP` with a `{"state_dict": ...}` checkpoint saved by `torch.save`, as HPS ships it. Aesthetic: a tiny
`CLIPModel` + the MLP head saved as a `.pth` state dict and as safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewards.base import REWARDS
from rewards.hub import WeightsNotFoundError
from rewards.preference import AestheticMLP, aesthetic, hpsv2, pickscore
from rewards.preprocess import ImagePreprocess
from tests._real_weights import assert_matching_caption_wins

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_OPEN_CLIP = "flowalign-test-tiny-hps"
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _legacy_clip_processor_config(size: int) -> dict:
    """The preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K and openai/clip-vit-large-patch14
    (old CLIPFeatureExtractor style: int sizes), at `size`."""
    return {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": OPENAI_MEAN,
        "image_std": OPENAI_STD,
        "resample": 3,
        "size": size,
    }


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, h, w, generator=g) * 255).round() / 255


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _clip_and_processor(model_dir: Path, proc_dir: Path):
    """The official objects: CLIPModel and a CLIPProcessor (tokenizer + image processor) from the directories."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

    processor = CLIPProcessor(
        image_processor=AutoImageProcessor.from_pretrained(proc_dir), tokenizer=AutoTokenizer.from_pretrained(proc_dir)
    )
    return CLIPModel.from_pretrained(model_dir), processor


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, processor dir), like yuvalkirstain/PickScore_v1 + laion/CLIP-ViT-H-14-laion2B-s32B-b79K."""
    from transformers import CLIPConfig, CLIPModel

    from flowalign.tokenizer import clip_tokenizer

    model_dir, proc_dir = tmp_path_factory.mktemp("pickscore"), tmp_path_factory.mktemp("pickscore_processor")
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text.update(max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=32, patch_size=8)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=3.0)
    CLIPModel(config).save_pretrained(model_dir)
    clip_tokenizer().save_pretrained(proc_dir)
    (proc_dir / "preprocessor_config.json").write_text(json.dumps(_legacy_clip_processor_config(32)))
    return model_dir, proc_dir


@pytest.fixture(scope="module")
def tiny_clip_dir(tiny_pickscore, tmp_path_factory) -> Path:
    """Model and processor in one directory, as openai/clip-vit-large-patch14 ships (the aesthetic CLIP)."""
    clip_dir = tmp_path_factory.mktemp("clip_vit_l")
    for f in list(tiny_pickscore[0].iterdir()) + list(tiny_pickscore[1].iterdir()):
        (clip_dir / f.name).write_bytes(f.read_bytes())
    return clip_dir


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A directory holding HPS_v2.1_compressed.pt for a registered tiny open_clip architecture."""
    import open_clip

    root = tmp_path_factory.mktemp("hps")
    (root / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(root / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_OPEN_CLIP).eval()
    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, ckpt / "HPS_v2.1_compressed.pt")
    return ckpt, model


@pytest.fixture(scope="module")
def pickscore_reward(tiny_pickscore):
    model_dir, proc_dir = tiny_pickscore
    return pickscore(str(model_dir), str(proc_dir), device="cpu", batch_size=2)


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


# ---- preprocessing ------------------------------------------------------------------------------------------
def test_legacy_clip_processor_config_is_read_and_matched(tmp_path):
    """PickScore's and the aesthetic head's processors (int `size`/`crop_size` configs): exact without a resize,
    within a pixel level with one (see tests/test_rewards_clip.py for the measured numbers)."""
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(_legacy_clip_processor_config(224)))
    proc = AutoImageProcessor.from_pretrained(tmp_path)
    ours = ImagePreprocess.from_hf_processor(proc)
    assert ours.resize == 224 and ours.crop == (224, 224) and ours.interpolation == "bicubic"
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    x = _images(1, 224, 231)
    assert torch.allclose(ours(x), proc(images=_pil(x[0]), return_tensors="pt")["pixel_values"], atol=1e-5)
    x = _images(1, 333, 300, seed=1)
    d = (ours(x) - proc(images=_pil(x[0]), return_tensors="pt")["pixel_values"]).abs() * std * 255
    assert d.max() <= 1.2 and d.mean() <= 0.35


def _hps_letterbox(x: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's evaluation transform, written from its description: on the float tensor, the long side bicubic to
    `size` (antialiased), the short side zero-padded to a square (floor half before), OpenAI statistics."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    h, w = x.shape[-2:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    y = tvf.resize(x, [nh, nw], InterpolationMode.BICUBIC, antialias=True)
    ph, pw = size - nh, size - nw
    y = tvf.pad(y, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0.0)
    return tvf.normalize(y, list(OPENAI_MEAN), list(OPENAI_STD))


@pytest.mark.parametrize(("h", "w"), [(32, 32), (48, 40), (40, 64), (333, 500)])
def test_hps_preprocessing_is_hpsv2s_letterbox_not_open_clips_crop(tiny_hps, h, w):
    """HPSv2 evaluates with its own fork's transform (long side to the input size, zero padding), so a
    non-square image keeps its borders; open_clip's stock transform would crop them."""
    ckpt_dir, _ = tiny_hps
    reward = hpsv2("v2.1", str(ckpt_dir), model=TINY_OPEN_CLIP, device="cpu")
    x = _images(2, h, w)
    expected = torch.stack([_hps_letterbox(i, 32) for i in x])
    torch.testing.assert_close(reward.encoder.preprocess(x), expected, atol=1e-5, rtol=0)


# ---- PickScore ----------------------------------------------------------------------------------------------
def test_pickscore_is_logit_scale_times_cosine_as_the_reference_code(tiny_pickscore, pickscore_reward):
    model_dir, proc_dir = tiny_pickscore
    x, prompts = _images(3, 32, 32), ["a red cube", "a blue ball", "a red cube"]
    model, processor = _clip_and_processor(model_dir, proc_dir)
    with torch.no_grad():  # PickScore's published inference snippet
        img = model.get_image_features(**processor(images=[_pil(i) for i in x], return_tensors="pt"))
        txt = model.get_text_features(**processor(text=prompts, padding=True, truncation=True, return_tensors="pt"))
        img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (img * txt).sum(-1)
    scores = pickscore_reward(x, prompts)
    assert torch.allclose(scores, expected, atol=1e-4)
    assert pickscore_reward.scale == pytest.approx(float(torch.tensor(3.0).exp()), rel=1e-5)


def test_pickscore_batches_with_gradients(pickscore_reward):
    x = _images(5, 40, 36).requires_grad_(True)
    scores = pickscore_reward(x, ["a", "b", "c", "a", "b"])
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad.abs().sum() > 0


# ---- HPSv2 --------------------------------------------------------------------------------------------------
def test_hpsv2_loads_the_state_dict_checkpoint_and_scores_raw_cosine(tiny_hps):
    import open_clip

    ckpt_dir, model = tiny_hps
    reward = hpsv2("v2.1", str(ckpt_dir), model=TINY_OPEN_CLIP, device="cpu")  # a directory holding the file
    same = hpsv2("v2.1", str(ckpt_dir / "HPS_v2.1_compressed.pt"), model=TINY_OPEN_CLIP, device="cpu")
    x, prompts = _images(3, 32, 32), ["a", "b", "c"]
    with torch.no_grad():  # hpsv2.score: normalised features, diag(image @ text.T)
        tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP)
        _, _, preprocess = open_clip.create_model_and_transforms(TINY_OPEN_CLIP)
        img = model.encode_image(torch.stack([preprocess(_pil(i)) for i in x]), normalize=True)
        txt = model.encode_text(tokenizer(prompts), normalize=True)
    expected = (img @ txt.T).diagonal()
    scores = reward(x, prompts)
    assert torch.allclose(scores, expected, atol=1e-4) and torch.allclose(same(x, prompts), expected, atol=1e-4)
    y = _images(2, 48, 40).requires_grad_(True)
    reward(y, ["a", "b"]).sum().backward()
    assert y.grad.abs().sum() > 0


class _NotATensor:
    pass


def test_hpsv2_refuses_checkpoints_that_need_arbitrary_unpickling(tiny_hps, tmp_path):
    _, model = tiny_hps
    torch.save({"state_dict": model.state_dict(), "extra": _NotATensor()}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="only loads weights_only checkpoints or safetensors"):
        hpsv2("v2.1", str(tmp_path), model=TINY_OPEN_CLIP, device="cpu")


def test_hpsv2_rejects_unknown_versions():
    with pytest.raises(ValueError, match="valid: v2, v2.1"):
        hpsv2("v3")


# ---- aesthetic ----------------------------------------------------------------------------------------------
def test_aesthetic_mlp_has_the_published_layout():
    head = AestheticMLP()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }
    dropouts = [m.p for m in head.layers if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2, 0.2, 0.1]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_scores_normalised_clip_features(tiny_clip_dir, tmp_path, fmt):
    from safetensors.torch import save_file

    clip_dir = tiny_clip_dir
    torch.manual_seed(2)
    head = AestheticMLP(input_dim=16).eval()
    if fmt == "pth":
        torch.save(head.state_dict(), tmp_path / "aesthetic-model.pth")
        source = str(tmp_path)  # a directory holding the default file name
    else:
        save_file(head.state_dict(), tmp_path / "head.safetensors")
        source = str(tmp_path / "head.safetensors")
    reward = aesthetic(source, str(clip_dir), device="cpu")
    x = _images(3, 32, 32)
    model, processor = _clip_and_processor(clip_dir, clip_dir)
    with torch.no_grad():
        feats = model.get_image_features(**processor(images=[_pil(i) for i in x], return_tensors="pt"))
        feats = getattr(feats, "pooler_output", feats)
        expected = head(feats / feats.norm(dim=-1, keepdim=True))
    assert torch.allclose(reward(x, ["", "", ""]), expected, atol=1e-4)
    y = _images(2, 40, 40).requires_grad_(True)
    reward(y, ["", ""]).sum().backward()
    assert y.grad.abs().sum() > 0


def test_aesthetic_rejects_a_head_for_another_width(tiny_pickscore, tmp_path):
    model_dir, proc_dir = tiny_pickscore
    torch.save(AestheticMLP(input_dim=24).state_dict(), tmp_path / "aesthetic-model.pth")
    reward = aesthetic(str(tmp_path), str(model_dir), processor=str(proc_dir), device="cpu")
    with pytest.raises(ValueError, match="16-d features but the head expects 24-d"):
        reward(_images(1, 32, 32), [""])


# ---- registration and missing weights ----------------------------------------------------------------------
def test_registered_names():
    assert {"pickscore", "hpsv2", "aesthetic"} <= set(REWARDS.names())


@pytest.mark.parametrize(
    ("build", "needles"),
    [
        (
            lambda local: pickscore(device="cpu"),
            ["'yuvalkirstain/PickScore_v1'", "hf download yuvalkirstain/PickScore_v1 --local-dir DIR", "model='DIR'"],
        ),
        (
            lambda local: pickscore(str(local[0]), device="cpu"),  # local model, its processor missing
            [
                "'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'",
                "hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --local-dir DIR",
                "processor='DIR'",
            ],
        ),
        (
            lambda local: hpsv2(device="cpu"),
            [
                "'xswu/HPSv2' (file 'HPS_v2.1_compressed.pt')",
                "hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir DIR",
                "checkpoint='DIR/HPS_v2.1_compressed.pt'",
            ],
        ),
        (
            lambda local: aesthetic(device="cpu"),
            [
                "'trl-lib/ddpo-aesthetic-predictor' (file 'aesthetic-model.pth')",
                "head='DIR/aesthetic-model.pth'",
            ],
        ),
    ],
    ids=["pickscore-model", "pickscore-processor", "hpsv2", "aesthetic"],
)
def test_missing_weights_offline_raise_one_clear_error(offline_empty_cache, tiny_pickscore, build, needles):
    with pytest.raises(WeightsNotFoundError) as excinfo:
        build(tiny_pickscore)
    err = excinfo.value
    assert isinstance(err, FileNotFoundError) and err.__cause__ is None and err.__suppress_context__
    for needle in needles:
        assert needle in str(err), (needle, str(err))


# ---- real weights (slow; need the Hugging Face cache or network) -------------------------------------------
@pytest.mark.slow
def test_real_pickscore_prefers_the_matching_caption():
    try:
        reward = pickscore("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device="cpu")
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))
    assert_matching_caption_wins(reward)


@pytest.mark.slow
def test_real_hpsv2_prefers_the_matching_caption():
    try:
        reward = hpsv2("v2.1", device="cpu")  # xswu/HPSv2 HPS_v2.1_compressed.pt on open_clip ViT-H-14
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))
    assert_matching_caption_wins(reward)


@pytest.mark.slow
def test_real_aesthetic_prefers_a_smooth_picture_to_noise():
    """trl-lib/ddpo-aesthetic-predictor on openai/clip-vit-large-patch14: scores land in the predictor's
    1-10 range and a smooth colour field beats uniform noise."""
    try:
        reward = aesthetic(device="cpu")
    except WeightsNotFoundError as exc:
        pytest.skip(str(exc))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 256), torch.linspace(0, 1, 256), indexing="ij")
    smooth = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.8 - 0.5 * xx])[None]
    noise = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    s = reward(torch.cat([smooth, noise]), ["", ""])
    assert ((s > 1) & (s < 10)).all() and s[0] > s[1], s
