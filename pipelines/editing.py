"""The region an edit redraws: masks and boxes, the code cells they touch, and the soft edge of the blend.

A mask is a black-and-white picture of the edited image's size (white = redraw), as a PIL image or a 2-D NumPy
array (bool, 0/1 or 0/255), or a box `(left, top, right, bottom)` in the image's pixels. It is resized and
center-cropped with the image, to the tokenizer's resolution, where any pixel it touches counts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.data import MIN_IMAGE_SIDE, load_image, resize_center_crop, to_rgb

MaskInput = Image.Image | np.ndarray | Sequence[float]  # a mask picture, or a box (left, top, right, bottom)
BLEND_EDGE = 3  # pixels over which an edit fades into the kept picture outside its mask


def edit_picture(image: Image.Image | str | os.PathLike) -> Image.Image:
    """The RGB picture to edit, from a PIL image or a path; ValueError if it is too small to edit."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image or the path to one, got {type(image).__name__}")
    if min(image.size) < MIN_IMAGE_SIDE:
        width, height = image.size
        raise ValueError(f"the picture is {width}x{height} pixels; editing needs at least {MIN_IMAGE_SIDE} a side")
    return to_rgb(image)


def _box_mask(box: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    width, height = size
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise ValueError(f"a box is four numbers (left, top, right, bottom), got {tuple(box)!r}")
    left, top, right, bottom = box
    if not (left < right and top < bottom):
        raise ValueError(f"the box {tuple(box)} is empty: it needs left < right and top < bottom")
    if left < 0 or top < 0 or right > width or bottom > height:
        raise ValueError(f"the box {tuple(box)} reaches outside the {width}x{height} picture")
    mask = np.zeros((height, width), bool)
    mask[math.floor(top) : math.ceil(bottom), math.floor(left) : math.ceil(right)] = True
    return mask


def _picture_mask(mask: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    if isinstance(mask, Image.Image):
        values = np.asarray(mask.convert("L") if mask.mode != "1" else mask)
    else:
        values = mask
        if values.ndim != 2:
            raise ValueError(f"a mask array must be 2-D (height, width), got shape {values.shape}")
    if values.shape != (height, width):
        found = f"{values.shape[1]}x{values.shape[0]}"
        raise ValueError(f"the mask is {found} pixels but the picture is {width}x{height}; give one of its size")
    if values.dtype == bool:
        return values
    found = set(np.unique(values).tolist())
    if not (found <= {0, 1} or found <= {0, 255}):
        raise ValueError("the mask must be black and white only (white = redraw); it has other values")
    return values > 0


def edit_region(mask: MaskInput, size: tuple[int, int], resolution: int) -> torch.Tensor:
    """(resolution, resolution) bool: the pixels the mask (or box) covers in a picture of `size` (width,
    height) once resized and center-cropped to `resolution`; ValueError for a bad or empty mask."""
    if isinstance(mask, (Image.Image, np.ndarray)):
        full = _picture_mask(mask, size)
    elif isinstance(mask, (tuple, list)):
        full = _box_mask(mask, size)
    else:
        raise ValueError(f"mask must be a PIL image, a NumPy array or a box (left, top, right, bottom), got {mask!r}")
    if not full.any():
        raise ValueError("the mask is empty: nothing to redraw (white marks what to redraw)")
    picture = Image.fromarray(full.astype(np.uint8) * 255)
    region = np.asarray(resize_center_crop(picture, resolution, Image.Resampling.BOX)) > 0
    if not region.any():
        raise ValueError("the mask lies outside the central square of the picture, which is all the model sees")
    return torch.from_numpy(region)


def code_cells(region: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(grid_size, grid_size) bool: the code cells any pixel of `region` (R, R) touches."""
    cell = region.shape[-1] // grid_size
    return F.max_pool2d(region[None, None].float(), cell)[0, 0] > 0


def soft_edge(region: torch.Tensor, width: int) -> torch.Tensor:
    """(R, R) float blend weight: 1 on `region`, falling linearly to 0 over `width` pixels outside it."""
    mask = region[None, None].float()
    rings = [F.max_pool2d(mask, 2 * k + 1, stride=1, padding=k) for k in range(width)]
    return torch.stack(rings).mean(0)[0, 0]


def outline(picture: Image.Image, region: torch.Tensor, color: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    """`picture` (the size of `region`) with the pixels just outside the region painted in `color`."""
    grown = F.max_pool2d(region[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    pixels = np.array(picture.convert("RGB"))
    pixels[(grown & ~region).cpu().numpy()] = color
    return Image.fromarray(pixels)
