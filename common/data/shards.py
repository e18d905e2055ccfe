"""Webdataset tar shards in img2dataset's layout: naming them, knowing their sizes, reading and writing them.

A shard `00000.tar` holds samples `000000000.jpg` (or `.png`, `.webp`), `000000000.txt` (the caption) and
`000000000.json` (metadata; `--caption_key` takes the caption from it instead), grouped by the key before the
first dot. Beside it img2dataset writes `00000.parquet` and `00000_stats.json`, whose `successes` is the number of
samples in the shard; `write_shards` writes the same. A spec names shards as open_clip does: brace expansion
(`data/{00000..00099}.tar`) and several sources joined with `::`.

Sizes come from the `_stats.json` files, so nothing is read before training starts; a shard without one is
counted by reading its tar headers (data is skipped, not read).
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from common.data.skips import Reason

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
STATS_SUFFIX = "_stats.json"


class ShardReadError(Exception):
    """A shard could not be read to the end; `reason` is a `Reason` for the samples it did not give."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def expand_shards(spec: str) -> list[str]:
    """The shard paths a spec names, in order: `::`-joined sources, each brace-expanded."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("a shard spec must name at least one .tar file, e.g. 'data/shards/{00000..00009}.tar'")
    paths = [path for path in expand_urls(spec.strip()) if path]
    if not paths:
        raise ValueError(f"shard spec {spec!r} names no files")
    return paths


def stats_path(shard: str | os.PathLike) -> Path:
    """img2dataset's `<name>_stats.json` beside `<name>.tar`."""
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".tar") + STATS_SUFFIX)


def _count_samples(shard: str) -> int:
    """Samples in a shard, from its tar headers (member data is skipped); 0 for a shard that cannot be opened."""
    keys, last = 0, None
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isreg() or "." not in Path(member.name).name:
                    continue
                key = _split_name(member.name)[0]
                if key != last:
                    keys, last = keys + 1, key
    except (OSError, tarfile.TarError, EOFError):
        pass  # counted as far as it reads; the samples past that are reported when training reaches them
    return keys


def _split_name(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name, as webdataset groups them: the key is everything before the first dot of
    the base name."""
    folder, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{folder}/{key}" if folder else key), suffix


def _stated_size(shard: str) -> int | None:
    """The sample count in a shard's `_stats.json`, or None when there is none (or it is unreadable)."""
    try:
        stats = json.loads(stats_path(shard).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    count = stats.get("successes") if isinstance(stats, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def shard_sizes(shards: Sequence[str], *, progress: bool = True) -> list[int]:
    """Samples in each shard: from its `_stats.json`, else counted from its tar headers."""
    sizes = [_stated_size(shard) for shard in shards]
    unknown = [i for i, size in enumerate(sizes) if size is None]
    if unknown:
        if progress:
            print(
                f"vqclip data: {len(unknown)} of {len(shards)} shards have no {STATS_SUFFIX}; counting their "
                "samples from the tar headers (write shards with `vqclip data shards` to skip this)",
                file=sys.stderr,
            )
        with ThreadPoolExecutor(8) as pool:
            counted = tqdm(
                pool.map(_count_samples, [shards[i] for i in unknown]),
                total=len(unknown),
                desc="counting shard samples",
                disable=not progress,
            )
            for i, count in zip(unknown, counted, strict=True):
                sizes[i] = count
    return sizes  # type: ignore[return-value]


def read_shard(shard: str, start: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of a shard from sample `start` on: dicts of `__key__` and one `bytes` value per suffix
    ("jpg", "txt", "json", ...). Raises ShardReadError when the file cannot be opened or ends early."""
    try:
        handle = open(shard, "rb")  # noqa: SIM115 - closed in the finally below, after the generator is done
    except OSError as err:
        raise ShardReadError(Reason.UNREADABLE_SHARD, f"{shard}: {err.strerror or err}") from err
    try:
        files = ({**f, "__url__": shard} for f in tar_file_iterator(handle))
        for i, sample in enumerate(group_by_keys(files)):
            if i >= start:
                yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        detail = str(err).split(" @ ")[0]  # webdataset appends the stream's repr
        truncated = isinstance(err, EOFError) or "end of" in detail
        reason = Reason.TRUNCATED_SHARD if truncated else Reason.UNREADABLE_SHARD
        raise ShardReadError(reason, f"{shard}: {detail}") from err
    finally:
        handle.close()


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardSample:
    """One sample to write: the image file's bytes and suffix, the caption and the metadata."""

    image: bytes
    suffix: str  # "jpg", "png", ...
    caption: str
    metadata: dict[str, Any]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed times: the same samples give the same bytes
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _image_suffix(data: bytes) -> tuple[bytes, str]:
    """The bytes and shard suffix of an image file: JPEG, PNG and WebP as they are, other formats as PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        suffix = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image.format or "")
        if suffix is not None:
            return data, suffix
        out = io.BytesIO()
        image.save(out, "PNG")
        return out.getvalue(), "png"


class ShardableRows(Protocol):
    """What `write_shards` reads: rows with captions, image file bytes and metadata (an ImageTextDataset)."""

    captions: list[str]

    def __len__(self) -> int: ...

    def image_file(self, i: int) -> bytes: ...

    def metadata(self, i: int) -> dict[str, Any]: ...


def write_shards(
    rows: ShardableRows,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 10_000,
    *,
    seed: int = 0,
    workers: int = 4,
    progress: bool = True,
) -> list[Path]:
    """Write every row into shards `OUT/00000.tar`, ... in img2dataset's layout, in a seeded random order (so
    that shard order and a shuffle buffer mix the data well), `workers` shards at a time. The same rows and
    arguments give the same bytes. Returns the shard paths."""
    if not 1 <= samples_per_shard <= 10_000:
        raise ValueError(f"--samples-per-shard must be from 1 to 10000 (keys have 4 digits), got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    jobs = [order[start : start + samples_per_shard] for start in range(0, len(order), samples_per_shard)]

    def write(job: tuple[int, list[int]]) -> Path:
        index, members = job
        samples = []
        for i in members:
            image, suffix = _image_suffix(rows.image_file(i))
            samples.append(ShardSample(image, suffix, rows.captions[i], rows.metadata(i)))
        path = out / f"{index:05d}.tar"
        write_shard(path, index, samples)
        return path

    with ThreadPoolExecutor(max(1, workers)) as pool:
        written = list(
            tqdm(pool.map(write, enumerate(jobs)), total=len(jobs), desc="writing shards", disable=not progress)
        )
    return written


def write_shard(path: str | os.PathLike, shard_index: int, samples: Sequence[ShardSample]) -> int:
    """Write `samples` as one shard in img2dataset's layout: the tar (keys: 5-digit shard + 4-digit index), its
    `_stats.json` and its `.parquet` of metadata. The tar is written under a temporary name and renamed last, so a
    crash never leaves a shard that looks complete. Returns the number of samples written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    rows = []
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, sample in enumerate(samples):
            key = f"{shard_index:05d}{i:04d}"
            metadata = {**sample.metadata, "key": key, "caption": sample.caption}
            _tar_member(tar, f"{key}.{sample.suffix}", sample.image)
            _tar_member(tar, f"{key}.txt", sample.caption.encode("utf-8"))
            _tar_member(tar, f"{key}.json", json.dumps(metadata, sort_keys=True).encode("utf-8"))
            rows.append({"key": key, "caption": sample.caption, "status": "success"})
    schema = pa.schema([(name, pa.string()) for name in ("key", "caption", "status")])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path.with_suffix(".parquet"))
    stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0}
    stats_path(path).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return len(rows)
