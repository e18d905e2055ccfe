"""Contact sheets: a grid of images with optional labels under each."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def make_grid(
    images: Sequence[Image.Image],
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    cell: int = 128,
    pad: int = 4,
) -> Image.Image:
    """Paste `images` (scaled to `cell` px) into rows of `columns`, each with its label below it."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    font = ImageFont.load_default()
    chars = max(8, cell // 6)
    wrapped = [textwrap.wrap(label, chars)[:3] for label in labels] if labels else None
    label_height = 12 * max(len(w) for w in wrapped) + 2 if wrapped else 0
    sheet = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + label_height + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        x = pad + (i % columns) * (cell + pad)
        y = pad + (i // columns) * (cell + label_height + pad)
        resample = Image.NEAREST if image.width <= cell else Image.LANCZOS  # keep pixels crisp when enlarging
        sheet.paste(image.convert("RGB").resize((cell, cell), resample), (x, y))
        if wrapped:
            for line_no, line in enumerate(wrapped[i]):
                draw.text((x, y + cell + 1 + 12 * line_no), line, fill=(0, 0, 0), font=font)
    return sheet


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    return [Image.fromarray(a) for a in to_uint8(pixels)]
