"""Decoding one picture: what training reads from every source and what inference reads from a user.

`load_image` decodes a file or bytes fully, applies the EXIF orientation and converts to RGB, raising
`BadImage` (with a `Reason`) for anything unusable; `image_pixels` turns a picture or its path into model
pixels, resized and center-cropped as training images are.
"""

from __future__ import annotations

import io
import os
import stat
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from common.data.skips import BadImage, Reason

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_IMAGE_SIDE = 8
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _check_file(path: str | os.PathLike) -> None:
    """Refuse what is not a non-empty regular file before opening it (a FIFO would block forever)."""
    try:
        info = os.stat(path)
    except FileNotFoundError as err:
        raise BadImage(Reason.MISSING_IMAGE, str(path)) from err
    except OSError as err:
        raise BadImage(Reason.UNREADABLE_IMAGE, str(err)) from err
    if not stat.S_ISREG(info.st_mode):
        raise BadImage(Reason.UNREADABLE_IMAGE, f"{path} is not a regular file")
    if info.st_size == 0:
        raise BadImage(Reason.EMPTY_IMAGE, str(path))


def load_image(
    path_or_bytes: str | os.PathLike | bytes,
    *,
    max_pixels: int | None = Image.MAX_IMAGE_PIXELS,
    min_side: int = MIN_IMAGE_SIDE,
) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation and convert it to RGB; raise `BadImage` if unusable.

    The size limits are checked from the header, before any pixel is decoded. Pillow's own limit
    (`Image.MAX_IMAGE_PIXELS`, whose DecompressionBombError also counts as "image too large") still applies
    when `max_pixels` is larger.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        if len(path_or_bytes) == 0:
            raise BadImage(Reason.EMPTY_IMAGE)
        source: Any = io.BytesIO(path_or_bytes)
    else:
        _check_file(path_or_bytes)
        source = path_or_bytes
    try:
        with Image.open(source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise BadImage(Reason.IMAGE_TOO_LARGE, f"{width}x{height} is over {max_pixels} pixels")
            if min(width, height) < min_side:
                raise BadImage(Reason.IMAGE_TOO_SMALL, f"{width}x{height} has a side under {min_side}")
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise BadImage(Reason.IMAGE_TOO_LARGE, str(err)) from err
    except Exception as err:  # Pillow raises many types for corrupt data; none may stop a scan
        reason = Reason.TRUNCATED_IMAGE if "truncat" in str(err).lower() else Reason.UNREADABLE_IMAGE
        raise BadImage(reason, f"{type(err).__name__}: {err}") from err


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """Grayscale 8-bit version of a 16-bit, 32-bit int or float image.

    16-bit modes use their full range; "I" and "F" the smallest of 0-1 (float only), 0-255, 0-65535 that
    holds the image's maximum, else the maximum itself.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max(initial=0.0))
    ranges = {"F": (1.0, 255.0, 65535.0), "I": (255.0, 65535.0)}.get(image.mode, (65535.0,))
    top = next((r for r in ranges if peak <= r), peak)
    return Image.fromarray(np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of an image of any mode; transparent pixels are composited on white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _scale_to_uint8(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_center_crop(
    image: Image.Image, resolution: int, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    """Scale the shorter side to `resolution` (Lanczos unless `resample` says otherwise) and keep the central
    `resolution` square."""
    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return image.resize((resolution, resolution), resample, box=box)


def to_array(image: Image.Image, resolution: int) -> np.ndarray:
    """(R, R, 3) uint8 pixels of the resized and cropped image."""
    return np.array(resize_center_crop(image, resolution))


def to_tensor(pixels: np.ndarray | Image.Image) -> torch.Tensor:
    """(R, R, 3) uint8 array or RGB image -> float (3, R, R) in [-1, 1]."""
    if isinstance(pixels, Image.Image):
        pixels = np.array(pixels.convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


def image_pixels(image: Image.Image | str | os.PathLike, resolution: int) -> torch.Tensor:
    """(3, R, R) in [-1, 1] from a PIL image or the path to one, made RGB, resized and center-cropped as
    training images are; raises `BadImage` for an unusable file or a picture too small to use, and ValueError for
    anything else."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image or the path to one, got {type(image).__name__}")
    if min(image.size) < MIN_IMAGE_SIDE:  # as a file of that size is
        width, height = image.size
        raise BadImage(Reason.IMAGE_TOO_SMALL, f"{width}x{height} has a side under {MIN_IMAGE_SIDE}")
    return to_tensor(resize_center_crop(to_rgb(image), resolution))
