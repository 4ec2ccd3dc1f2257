"""The artifact head: trained on synthetic clean vs artifact images with a tiny frozen encoder, saved, reloaded
as a reward, and driven through its CLI (`main`) on folders of PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rewards.artifact import (
    ArtifactHead,
    fit_head,
    load_head,
    main,
    save_head,
    train_artifact_head,
)
from rewards.base import build_reward

SIZE = 48


# --- synthetic data ---------------------------------------------------------------------------------------


def clean_image(g: torch.Generator) -> torch.Tensor:
    """A smooth two-colour gradient with a soft-edged disc: `[3, SIZE, SIZE]` in [0, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    c0, c1, c2 = torch.rand(3, 3, 1, 1, generator=g)
    angle = float(torch.rand(1, generator=g)) * 2 * math.pi
    t = (math.cos(angle) * xx + math.sin(angle) * yy + 1.5) / 3  # in (0, 1)
    img = c0 * (1 - t) + c1 * t
    cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([0.6, 0.6, 0.2]) + torch.tensor([0.2, 0.2, 0.1])).tolist()
    disc = torch.sigmoid((r - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()) * 40)
    return (img * (1 - disc) + c2 * disc).clamp(0, 1)


def artifact_image(g: torch.Generator) -> torch.Tensor:
    """The same family with 2-3 blocky JPEG-like noise patches (8x8 blocks of random offsets)."""
    img = clean_image(g)
    for _ in range(int(torch.randint(2, 4, (1,), generator=g))):
        y, x = torch.randint(0, SIZE - 16, (2,), generator=g).tolist()
        blocks = (torch.rand(3, 2, 2, generator=g) - 0.5) * 0.8
        noise = (
            blocks.repeat_interleave(8, 1).repeat_interleave(8, 2) + (torch.rand(3, 16, 16, generator=g) - 0.5) * 0.3
        )
        img[:, y : y + 16, x : x + 16] = (img[:, y : y + 16, x : x + 16] + noise).clamp(0, 1)
    return img


def write_pngs(directory: Path, images: list[torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(arr)).save(directory / f"{i:03d}.png")
    return directory


def make_dirs(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(seed)
    clean = write_pngs(root / "clean", [clean_image(g) for _ in range(n)])
    artifact = write_pngs(root / "artifact", [artifact_image(g) for _ in range(n)])
    return clean, artifact


class RandomConvEncoder(nn.Module):
    """A frozen random two-layer conv net, mean- and max-pooled: `[B,3,H,W]` in [0,1] -> `[B, 64]`.

    Random filters respond to local contrast, which is what blocky noise adds."""

    kind, model_id = "random_conv", "test"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.requires_grad_(False)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        h1 = torch.relu(self.conv1(images * 2 - 1))
        h2 = torch.relu(self.conv2(h1))
        return torch.cat([h1.mean((2, 3)), h1.amax((2, 3)), h2.mean((2, 3)), h2.amax((2, 3))], dim=1)


# --- training ---------------------------------------------------------------------------------------------


def test_head_separates_held_out_artifacts(tmp_path):
    clean, artifact = make_dirs(tmp_path, n=40)
    encoder = RandomConvEncoder()
    out = tmp_path / "head.safetensors"
    report = train_artifact_head(clean, artifact, out, encoder=encoder, val_fraction=0.25, seed=0, epochs=100)

    assert (report.n_clean, report.n_artifact, report.n_val, report.n_train) == (40, 40, 20, 60)
    assert report.val_accuracy >= 0.85, report.summary()
    assert report.val_accuracy_clean >= 0.7 and report.val_accuracy_artifact >= 0.7
    assert report.feature_dim == 64 and out.is_file()

    # the saved head, used as a reward on fresh images from both families
    reward = build_reward("artifact_head", head=str(out), encoder=encoder, device="cpu")
    g = torch.Generator().manual_seed(123)
    fresh_clean = torch.stack([clean_image(g) for _ in range(20)])
    fresh_bad = torch.stack([artifact_image(g) for _ in range(20)])
    p_clean, p_bad = reward(fresh_clean, [""] * 20), reward(fresh_bad, [""] * 20)
    assert p_clean.shape == (20,) and torch.isfinite(p_clean).all()
    assert ((p_clean >= 0) & (p_clean <= 1)).all()
    accuracy = torch.cat([p_clean > 0.5, p_bad <= 0.5]).float().mean()
    assert accuracy >= 0.85 and p_clean.mean() > p_bad.mean() + 0.3


def test_mlp_head_and_metadata_round_trip(tmp_path):
    clean, artifact = make_dirs(tmp_path, n=12, seed=1)
    out = tmp_path / "sub" / "mlp.safetensors"
    report = train_artifact_head(clean, artifact, out, encoder=RandomConvEncoder(), hidden=16, epochs=60)
    head, meta = load_head(out)
    assert head.hidden == 16 and head.feature_dim == 64
    assert meta["encoder"] == "random_conv" and meta["model"] == "test" and meta["positive"] == "clean"
    assert meta["feature_dim"] == "64" and float(meta["val_accuracy"]) == pytest.approx(report.val_accuracy)


def test_fit_head_hand_separable():
    # 1-d features: clean at +1..+2, artifact at -2..-1 -> logistic regression separates them perfectly
    x = torch.tensor([[1.0], [1.5], [2.0], [-1.0], [-1.5], [-2.0]])
    y = torch.tensor([1.0, 1, 1, 0, 0, 0])
    head = fit_head(x, y, epochs=100)
    assert ((head(x) > 0).float() == y).all()
    torch.testing.assert_close(head.mean, torch.zeros(1))  # standardisation stats from the training features
    torch.testing.assert_close(head.std, x.std(0, unbiased=False))


def test_save_load_is_exact(tmp_path):
    torch.manual_seed(0)
    head = ArtifactHead(8, hidden=4)
    head.mean.normal_()
    head.std.uniform_(0.5, 2)
    path = save_head(head, tmp_path / "h.safetensors", {"encoder": "clip", "model": "m"})
    loaded, meta = load_head(path)
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x), head(x))
    assert meta["encoder"] == "clip"


def test_reward_is_differentiable_through_the_encoder(tmp_path):
    torch.manual_seed(0)
    path = save_head(ArtifactHead(64), tmp_path / "h.safetensors", {"encoder": "random_conv", "model": "test"})
    reward = build_reward("artifact_head", head=str(path), encoder=RandomConvEncoder(), device="cpu")
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    reward(x, ["", ""]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.head.parameters())  # a frozen judge: no gradients kept for it


def test_feature_dim_mismatch_is_clear(tmp_path):
    path = save_head(ArtifactHead(10), tmp_path / "h.safetensors", {"encoder": "random_conv", "model": "test"})
    reward = build_reward("artifact_head", head=str(path), encoder=RandomConvEncoder(), device="cpu")
    with pytest.raises(ValueError, match="64-d features but the head"):
        reward(torch.rand(1, 3, 32, 32), [""])


# --- errors -----------------------------------------------------------------------------------------------


def test_bad_dirs_give_clear_errors(tmp_path):
    clean, artifact = make_dirs(tmp_path, n=3)
    enc = RandomConvEncoder()
    out = tmp_path / "h.safetensors"
    with pytest.raises(FileNotFoundError, match="--clean directory .*missing.* does not exist"):
        train_artifact_head(tmp_path / "missing", artifact, out, encoder=enc)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="--artifact directory .*empty.* has no images"):
        train_artifact_head(clean, tmp_path / "empty", out, encoder=enc)
    (artifact / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        train_artifact_head(clean, artifact, out, encoder=enc)
    single = write_pngs(tmp_path / "single", [torch.rand(3, 8, 8)])
    with pytest.raises(ValueError, match="at least 2 per class"):
        train_artifact_head(clean, single, out, encoder=enc)
    with pytest.raises(ValueError, match="val_fraction"):
        train_artifact_head(clean, clean, out, encoder=enc, val_fraction=1.0)
    assert not out.exists()


def test_load_head_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a flowalign artifact head"):
        load_head(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="flowalign artifact train"):
        load_head(tmp_path / "nope.safetensors")


# --- CLI --------------------------------------------------------------------------------------------------


def _save_tiny_clip(path: Path) -> Path:
    """A tiny random transformers CLIP (vision 32 px, patch 8) with an offline tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from flowalign.tokenizer import clip_tokenizer

    tok = clip_tokenizer(words=["a", "photo"])
    text = dict(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _save_tiny_dino(path: Path) -> Path:
    """A tiny random Dinov2Model (patch 4, 32 px crop) with a BitImageProcessor, saved like a hub snapshot."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, patch_size=4, image_size=32
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return path


@pytest.mark.parametrize(("kind", "dim"), [("clip", 16), ("dino", 24)])
def test_main_trains_through_the_encoder_loaders(tmp_path, capsys, kind, dim):
    """`flowalign artifact train --encoder KIND --model DIR` on PNG folders, loading a tiny CLIP / DINOv2 from disk
    through the same loaders as real weights; the reward then rebuilds the encoder from the head's metadata."""
    model_dir = (_save_tiny_clip if kind == "clip" else _save_tiny_dino)(tmp_path / f"tiny_{kind}")
    clean, artifact = make_dirs(tmp_path, n=6)
    out = tmp_path / "head.safetensors"
    argv = ["--clean", str(clean), "--artifact", str(artifact), "--out", str(out), "--encoder", kind]
    code = main([*argv, "--model", str(model_dir), "--epochs", "50", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "6 clean, 6 artifact" in printed
    head, meta = load_head(out)
    assert meta["encoder"] == kind and meta["model"] == str(model_dir) and head.feature_dim == dim

    reward = build_reward("artifact_head", head=str(out), device="cpu")
    p = reward(torch.rand(3, 3, 40, 40), ["a", "b", "c"])
    assert p.shape == (3,) and torch.isfinite(p).all() and ((p > 0) & (p < 1)).all()


def test_main_reports_bad_dirs(tmp_path, capsys):
    code = main(["--clean", str(tmp_path / "nope"), "--artifact", str(tmp_path), "--out", str(tmp_path / "h")])
    assert code == 2
    assert "--clean directory" in capsys.readouterr().err


# --- pairs, encoder identity, overlapping folders, image modes ------------------------------------------------


def test_matched_pairs_stay_together_and_the_ranking_is_reported(tmp_path, monkeypatch):
    import rewards.artifact as artifact_module
    from rewards.artifact import list_images, read_image, split_pairs

    g = torch.Generator().manual_seed(3)
    clean_imgs = [clean_image(g) for _ in range(20)]
    bad_imgs = [img.clone() for img in clean_imgs]  # each artifact image made from its clean one, same name
    for img in bad_imgs:
        img[:, 8:24, 8:24] = (img[:, 8:24, 8:24] + (torch.rand(3, 16, 16, generator=g) - 0.5) * 0.8).clamp(0, 1)
    clean, artifact = write_pngs(tmp_path / "clean", clean_imgs), write_pngs(tmp_path / "artifact", bad_imgs)
    write_pngs(tmp_path / "clean" / "extra", [clean_image(g) for _ in range(4)])  # unpaired clean images
    encoder, out = RandomConvEncoder(), tmp_path / "head.safetensors"
    used = []  # the split training really made, not one rebuilt here

    def spy(*args, **kwargs):
        used.append(split_pairs(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(artifact_module, "split_pairs", spy)
    report = train_artifact_head(clean, artifact, out, encoder=encoder, val_fraction=0.25, seed=0, epochs=100)

    c_files, a_files = list_images(clean, "c"), list_images(artifact, "a")
    ((tr_c, va_c, tr_a, va_a, held),) = used
    assert len(held) == report.n_val_pairs == 5 and all(c_files[c].stem == a_files[a].stem for c, a in held)
    trained_names = {c_files[i].stem for i in tr_c} | {a_files[i].stem for i in tr_a}
    assert not trained_names & {c_files[c].stem for c, _ in held}, "a held-out pair's partner was trained on"
    # the reported ranking figures, recomputed from the saved head's scores of the held-out files
    reward = build_reward("artifact_head", head=str(out), encoder=encoder, device="cpu")

    def scores(files):
        return reward(torch.stack([read_image(f) for f in files]), [""] * len(files))

    pc, pa = scores([c_files[c] for c, _ in held]), scores([a_files[a] for _, a in held])
    pair_wins = [float(c > a) + 0.5 * float(c == a) for c, a in zip(pc, pa, strict=True)]
    assert report.val_pair_accuracy == pytest.approx(sum(pair_wins) / len(pair_wins))
    all_c, all_a = scores([c_files[i] for i in va_c]), scores([a_files[i] for i in va_a])
    wins = sum(float(c > a) + 0.5 * float(c == a) for c in all_c for a in all_a)
    assert report.val_auc == pytest.approx(wins / (len(all_c) * len(all_a)))
    assert "matched pairs" in report.summary()


def test_an_encoder_other_than_the_trained_one_is_refused(tmp_path):
    clean, artifact = make_dirs(tmp_path, n=6)
    out = tmp_path / "head.safetensors"
    train_artifact_head(clean, artifact, out, encoder=RandomConvEncoder(seed=0), epochs=10)
    build_reward("artifact_head", head=str(out), encoder=RandomConvEncoder(seed=0), device="cpu")  # the same: fine
    with pytest.raises(ValueError, match="not the one this artifact head was trained on"):
        build_reward("artifact_head", head=str(out), encoder=RandomConvEncoder(seed=1), device="cpu")  # same width


def test_overlapping_folders_and_a_directory_as_out_are_refused(tmp_path):
    clean, artifact = make_dirs(tmp_path, n=3)
    enc, out = RandomConvEncoder(), tmp_path / "h.safetensors"
    with pytest.raises(ValueError, match="overlap"):
        train_artifact_head(clean, clean, out, encoder=enc)
    with pytest.raises(ValueError, match="overlap"):
        train_artifact_head(tmp_path, artifact, out, encoder=enc)  # clean would list the artifact images too
    with pytest.raises(ValueError, match="is a directory"):
        train_artifact_head(clean, artifact, tmp_path, encoder=enc)
    assert not out.exists()


def test_read_image_handles_16_bit_alpha_and_exif_rotation(tmp_path):
    from rewards.artifact import read_image

    grey = np.full((4, 6), 32768, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.shape == (3, 4, 6) and torch.allclose(img, torch.full_like(img, 32768 / 65535), atol=1e-4)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and img[:, 3, 0].tolist() == [1.0, 1.0, 1.0]  # white behind
    wide = Image.new("RGB", (6, 4), (0, 0, 255))
    exif = wide.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to view
    wide.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (3, 6, 4)


def test_two_images_of_one_name_in_a_folder_are_refused(tmp_path):
    clean, artifact = make_dirs(tmp_path, n=4)
    Image.open(clean / "001.png").convert("RGB").save(clean / "001.jpg")  # which one pairs with artifact/001?
    with pytest.raises(ValueError, match="several images named '001'"):
        train_artifact_head(clean, artifact, tmp_path / "h.safetensors", encoder=RandomConvEncoder())
