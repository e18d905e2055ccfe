"""One entry point for every source (folders and datasets are read in full, shards and streams as streams), and
writing any source as shards."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common.data.config import DataConfig
from common.data.mapped import ImageTextSplits, load_mapped
from common.data.shards import write_shards
from common.data.streams import load_stream

T = TypeVar("T")


def load_image_text(config: DataConfig, *, seed: int = 0, progress: bool = True) -> ImageTextSplits:
    """Read, check and split the configured data.

    Folders and `datasets` datasets (`load_mapped`): the validation split is the dataset's own, else a `seed`ed
    random `validation_fraction` of the rows; every image is decoded once by a scan, bad rows are counted in
    `.report`. Shards and `datasets` streaming (`load_stream`): nothing is scanned; the training split is a
    `StreamData` that counts bad rows as training reads them, and the validation rows are read into memory.
    With `progress` (pass `accelerator.is_main_process`), shows progress and prints one summary line to stderr.
    """
    config.check_source()
    if config.is_stream:
        return load_stream(config, seed=seed, progress=progress)
    return load_mapped(config, seed=seed, progress=progress)


def source_config(spec: str, **settings: Any) -> DataConfig:
    """The config that reads `spec`: a folder of images (with metadata.jsonl, .txt captions or splits) as
    --train_data_dir, anything else (a `save_to_disk` folder, a data file, a hub name) as --dataset_name."""
    path = Path(spec)
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if path.is_dir() and not saved:
        return DataConfig(train_data_dir=spec, **settings)
    return DataConfig(dataset_name=spec, **settings)


def write_splits_as_shards(
    config: DataConfig,
    out: str | os.PathLike,
    samples_per_shard: int = 10_000,
    *,
    seed: int = 0,
    workers: int = 4,
    progress: bool = True,
) -> dict[str, int]:
    """Write the splits the data layer reads from `config` as shards in `OUT/train/` and `OUT/validation/`;
    returns the rows written per split."""
    splits = load_image_text(config, seed=seed, progress=progress)
    written = {}
    for name, rows in (("train", splits.train), ("validation", splits.validation)):
        if len(rows):
            write_shards(rows, Path(out) / name, samples_per_shard, seed=seed, workers=workers, progress=progress)
            written[name] = len(rows)
    return written


def build_corpus(build: Callable[[Path], T], out: str | os.PathLike, output_format: str, samples_per_shard: int) -> T:
    """Run `build(folder)` (a corpus builder writing an imagefolder) into `out`, or with `output_format` "shards"
    into a temporary folder that is then written as shards into `out` and removed."""
    if output_format == "folder":
        return build(Path(out))
    if output_format != "shards":
        raise ValueError(f"--format must be folder or shards, got {output_format!r}")
    Path(out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-corpus-", dir=out) as folder:
        result = build(Path(folder))
        write_splits_as_shards(DataConfig(train_data_dir=folder, validation_fraction=0.0), out, samples_per_shard)
    return result


def add_format_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that writes a corpus as an imagefolder or as shards."""
    parser.add_argument(
        "--format",
        choices=("folder", "shards"),
        default="folder",
        help="an imagefolder, or webdataset shards in OUT/train/ and OUT/validation/ (default: %(default)s)",
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=10_000, help="with --format shards (default: %(default)s)"
    )
