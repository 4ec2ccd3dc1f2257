"""Comparison grids: rows of images (e.g. base vs aligned) for the same prompts and seeds, PNG + JSON sidecar."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _to_pil(image: torch.Tensor, cell: int) -> Image.Image:
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(np.ascontiguousarray(arr))
    # Nearest-neighbour keeps tiny images (32 px) honest: no smoothing that hides artefacts.
    resample = Image.NEAREST if pil.width < cell else Image.LANCZOS
    return pil.resize((cell, cell), resample)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels as `font` draws them (a word longer than a line keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def comparison_grid(
    rows: dict[str, torch.Tensor],
    prompts: Sequence[str],
    path: str | Path,
    *,
    cell: int = 128,
    scores: dict[str, Sequence[float]] | None = None,
) -> Path:
    """Writes a grid with one row per entry of `rows` ([N,3,H,W] each, same N as prompts) and a JSON sidecar.

    Columns are prompts (captions above), rows are labelled on the left; optional per-image scores are
    printed under each image.
    """
    n = len(prompts)
    for name, imgs in rows.items():
        if imgs.shape[0] != n:
            raise ValueError(f"row {name!r} has {imgs.shape[0]} images for {n} prompts")
    # Pillow's default font at its own 10 px draws spaces 2 px wide ("twosquares"); 12 px reads as words.
    font, line_h, gap = ImageFont.load_default(size=12), 14, 6
    label_w, head_h, foot_h = 90, 4 * line_h + 4, line_h + 2 if scores else 0
    pitch_x, pitch_y = cell + gap, cell + foot_h + gap
    canvas = Image.new("RGB", (label_w + n * pitch_x, head_h + len(rows) * pitch_y), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(prompts):
        for li, line in enumerate(_wrap(prompt, font, cell - 2)[:4]):
            draw.text((label_w + j * pitch_x + 1, 2 + line_h * li), line, fill="black", font=font)
    for i, (name, imgs) in enumerate(rows.items()):
        y = head_h + i * pitch_y
        draw.text((4, y + cell // 2 - 6), name, fill="black", font=font)
        for j in range(n):
            x = label_w + j * pitch_x
            canvas.paste(_to_pil(imgs[j], cell), (x, y))
            # A hairline frame: generated backgrounds are near-white, so cells would otherwise run together.
            draw.rectangle((x - 1, y - 1, x + cell, y + cell), outline=(190, 190, 190))
            if scores and name in scores:
                draw.text((x + 1, y + cell + 1), f"{scores[name][j]:.2f}", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    sidecar = {"prompts": list(prompts), "rows": list(rows)}
    if scores:
        sidecar["scores"] = {k: [float(x) for x in v] for k, v in scores.items()}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    return path
