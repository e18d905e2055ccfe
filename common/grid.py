"""Contact sheets: a grid of images with optional labels under each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LINE_HEIGHT = 12  # px per label line
LABEL_LINES = 3
WORD_GAP = 4  # px between the words of a label: the default font's space is 2 px, which runs words together


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
    wrapped = [_wrap(label, font, cell) for label in labels] if labels else None
    label_height = LINE_HEIGHT * max(len(w) for w in wrapped) + 2 if wrapped else 0
    sheet = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + label_height + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        x = pad + (i % columns) * (cell + pad)
        y = pad + (i // columns) * (cell + label_height + pad)
        resample = Image.NEAREST if image.width <= cell else Image.LANCZOS  # keep pixels crisp when enlarging
        sheet.paste(image.convert("RGB").resize((cell, cell), resample), (x, y))
        if wrapped:
            for line_no, line in enumerate(wrapped[i]):
                left = x
                for word in line:
                    draw.text((left, y + cell + 1 + LINE_HEIGHT * line_no), word, fill=(0, 0, 0), font=font)
                    left += font.getlength(word) + WORD_GAP
    return sheet


def _wrap(label: str, font: ImageFont.ImageFont, width: int) -> list[list[str]]:
    """The words of `label` in lines at most `width` px wide (at most LABEL_LINES; a word too wide is cut)."""
    lines: list[list[str]] = [[]]
    used = 0.0
    for word in label.split():
        while len(word) > 1 and font.getlength(word) > width:
            word = word[:-1]
        size = font.getlength(word)
        if lines[-1] and used + WORD_GAP + size > width:
            lines.append([])
            used = 0.0
        used += (WORD_GAP if lines[-1] else 0) + size
        lines[-1].append(word)
    return lines[:LABEL_LINES]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    return [Image.fromarray(a) for a in to_uint8(pixels)]
