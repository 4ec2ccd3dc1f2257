"""Comparison grids: rows of images (e.g. base vs aligned) for the same prompts and seeds, PNG + JSON sidecar."""

from __future__ import annotations

import json
import textwrap
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
    font = ImageFont.load_default()
    label_w, head_h, foot_h = 90, 44, 14 if scores else 0
    width, height = label_w + n * cell, head_h + len(rows) * (cell + foot_h)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(prompts):
        lines = textwrap.wrap(prompt, width=max(8, cell // 6))[:4]
        for li, line in enumerate(lines):
            draw.text((label_w + j * cell + 2, 2 + 10 * li), line, fill="black", font=font)
    for i, (name, imgs) in enumerate(rows.items()):
        y = head_h + i * (cell + foot_h)
        draw.text((4, y + cell // 2 - 6), name, fill="black", font=font)
        for j in range(n):
            canvas.paste(_to_pil(imgs[j], cell), (label_w + j * cell, y))
            if scores and name in scores:
                draw.text((label_w + j * cell + 2, y + cell + 1), f"{scores[name][j]:.2f}", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    sidecar = {"prompts": list(prompts), "rows": list(rows)}
    if scores:
        sidecar["scores"] = {k: [float(x) for x in v] for k, v in scores.items()}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    return path
