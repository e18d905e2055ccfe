"""A data folder seeded with every kind of bad image-text row, and what a loader must make of it.

`build_bad_folder(root)` writes an imagefolder (`metadata.jsonl`), or with `layout="txt"` images with
same-named .txt captions, and returns the file names of the rows that must be kept and the expected count
per `common.data.Reason`. Every file is tiny; the decompression bombs are PNG headers that claim a huge size.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.data import Reason

LONG_CAPTION = "a red ball on grass " * 5000  # 100,000 characters
_NO_CAPTION = object()
_DIRECTORY = "directory"
_FIFO = "fifo"


@dataclass(frozen=True)
class BadFolder:
    root: Path
    kept: frozenset[str]  # file names of the rows that must load
    expected: Counter[str]  # skipped rows per reason, plus Reason.CAPTION_TRUNCATED for kept rows

    @property
    def total(self) -> int:
        return len(self.kept) + sum(n for r, n in self.expected.items() if r != Reason.CAPTION_TRUNCATED)


@dataclass(frozen=True)
class _Case:
    name: str
    data: bytes | str | None  # file contents, _DIRECTORY, _FIFO, or None for no file
    caption: object  # a str, _NO_CAPTION, an int (metadata only) or raw bytes (txt only)
    reason: str | None = None  # why the row is skipped; None when it is kept


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """The image saved in `fmt`, as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image (noise compresses badly, so truncating its file cuts into the pixel data)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims width x height pixels: a decompression bomb for free."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _good_images() -> dict[str, bytes]:
    """Usable images of every awkward mode and format."""
    rng = np.random.default_rng(1)
    palette = noise(16, 16).convert("P")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return {
        "rgb.png": encode(noise(16, 16), "PNG"),
        "wide.jpg": encode(noise(32, 16), "JPEG"),
        "thin.png": encode(noise(8, 40), "PNG"),
        "gray.png": encode(noise(16, 16).convert("L"), "PNG"),
        "bilevel.png": encode(noise(16, 16).convert("1"), "PNG"),
        "gray16.png": encode(Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)), "PNG"),
        "int32.tif": encode(Image.fromarray(rng.integers(0, 70000, (16, 16), dtype=np.int32)), "TIFF"),
        "float.tif": encode(Image.fromarray(rng.random((16, 16), dtype=np.float32)), "TIFF"),
        "palette.png": encode(palette, "PNG", transparency=0),
        "rgba.png": encode(noise(16, 16).convert("RGBA"), "PNG"),
        "la.png": encode(noise(16, 16).convert("LA"), "PNG"),
        "cmyk.jpg": encode(noise(16, 16).convert("CMYK"), "JPEG"),
        "rotated.jpg": encode(noise(16, 24), "JPEG", exif=exif.tobytes()),
    }


def _cases(layout: str) -> list[_Case]:
    png, jpeg = encode(noise(32, 32), "PNG"), encode(noise(32, 32), "JPEG")
    small = encode(noise(16, 16, seed=2), "PNG")
    cases = [_Case(name, data, f"a test image named {name}") for name, data in _good_images().items()]
    cases += [
        _Case("long_caption.png", small, LONG_CAPTION),
        _Case("empty.png", b"", "an empty file", Reason.EMPTY_IMAGE),
        _Case("truncated.png", png[: len(png) // 2], "half a PNG", Reason.TRUNCATED_IMAGE),
        _Case("truncated.jpg", jpeg[: len(jpeg) // 2], "half a JPEG", Reason.TRUNCATED_IMAGE),
        _Case("text.png", b"this is text, not a PNG\n", "a text file", Reason.UNREADABLE_IMAGE),
        _Case("folder.png", _DIRECTORY, "a directory", Reason.UNREADABLE_IMAGE),
        _Case("missing.png", None, "an image that is not there", Reason.MISSING_IMAGE),
        _Case("one_pixel.png", encode(noise(1, 1), "PNG"), "one pixel", Reason.IMAGE_TOO_SMALL),
        _Case("bomb.png", png_claiming(100_000, 100_000), "over twice Pillow's limit", Reason.IMAGE_TOO_LARGE),
        _Case("big.png", png_claiming(10_000, 10_000), "over Pillow's limit", Reason.IMAGE_TOO_LARGE),
        _Case("no_caption.png", small, _NO_CAPTION, Reason.MISSING_CAPTION),
        _Case("blank_caption.png", small, " \n\t ", Reason.EMPTY_CAPTION),
    ]
    if hasattr(os, "mkfifo"):  # opening a FIFO blocks until a writer comes: the loader must not open it
        cases.append(_Case("pipe.png", _FIFO, "a named pipe", Reason.UNREADABLE_IMAGE))
    if layout == "metadata":
        cases.append(_Case("number_caption.png", small, 42, Reason.NON_STRING_CAPTION))
    else:
        cases.append(_Case("latin1_caption.png", small, "café".encode("latin-1"), Reason.UNREADABLE_CAPTION))
    return cases


# Metadata lines that are not rows, each with the reason it is skipped.
_BAD_LINES = (
    ('{"file_name": "rgb.png", "text": "café"}\n'.encode("latin-1"), Reason.NON_UTF8_LINE),
    (b'{"file_name": "rgb.png", "text": \n', Reason.INVALID_JSON_LINE),
    (b'["rgb.png", "a list, not an object"]\n', Reason.INVALID_JSON_LINE),
    (b'{"text": "a caption without a file name"}\n', Reason.MISSING_IMAGE),
)


def _write_file(path: Path, data: bytes | str | None) -> None:
    if data == _DIRECTORY:
        path.mkdir()
    elif data == _FIFO:
        os.mkfifo(path)
    elif isinstance(data, bytes):
        path.write_bytes(data)


def build_bad_folder(root: str | Path, layout: str = "metadata") -> BadFolder:
    """Write the bad folder at `root` ("metadata": metadata.jsonl; "txt": .txt captions)."""
    if layout not in ("metadata", "txt"):
        raise ValueError(f"layout must be 'metadata' or 'txt', got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases = _cases(layout)
    expected = Counter(case.reason for case in cases if case.reason is not None)
    expected[Reason.CAPTION_TRUNCATED] = 1
    lines = []
    for case in cases:
        _write_file(root / case.name, case.data)
        if layout == "metadata":
            row = {"file_name": case.name} | ({} if case.caption is _NO_CAPTION else {"text": case.caption})
            lines.append(json.dumps(row).encode() + b"\n")
        elif isinstance(case.caption, bytes):
            (root / case.name).with_suffix(".txt").write_bytes(case.caption)
        elif case.caption is not _NO_CAPTION:
            (root / case.name).with_suffix(".txt").write_text(str(case.caption), encoding="utf-8")
    if layout == "metadata":
        lines += [line for line, _ in _BAD_LINES] + [b"\n"]
        expected.update(reason for _, reason in _BAD_LINES)
        (root / "metadata.jsonl").write_bytes(b"".join(lines))
    kept = frozenset(case.name for case in cases if case.reason is None)
    return BadFolder(root, kept, expected)
