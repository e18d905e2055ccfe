"""Image codes, encoded once: the training data run through a trained tokenizer and kept as sharded Arrow data.

A codes folder holds parts, `train/<part>/` and `validation/<part>/`, each a `datasets.Dataset` written by
`save_to_disk` with the columns `codes` (the flattened code grid, int16 or int32), `text` (the caption) and `source`
(where the image came from), and a `<part>.json` beside it that marks it complete; and `codes_info.json`: the
identity of what made the codes (the tokenizer folder's `save_id`, the data settings and split seed) and the parts
that make up the data. Training memory-maps the parts, so the codes of any number of images take no memory.

The parts: one per shard of `--train_shards` data (adding shards later encodes only the new ones), one per 10,000
rows of a folder or a `datasets` dataset, one per process of a `datasets` stream. Every process encodes its share of
the parts at the same time (part i by process i mod N), writing each under a temporary name that is renamed when
complete, so an interrupted encoding resumes with the parts still missing. All processes must see the folder: put
it on a filesystem the machines share, as their checkpoints are. Codes made with another tokenizer or from other
data are refused with an error naming the difference.

    encode_dataset("runs/vqvae", DataConfig(train_data_dir="data/shapes"), "runs/prior/codes")
    train, validation = load_codes("runs/prior/codes", "runs/vqvae")
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from common.data import DataConfig, SkipReport, load_image_text, to_tensor
from common.data.mapped import load_datasets, split_names
from common.data.streams import DatasetStreamSource, ShardSource, StreamData, held_out, resolve_shards
from common.hub import atomic_write_text, load_config, read_json, respect_umask
from vqvae.model import VQVAE, VQVAEConfig

INFO_NAME = "codes_info.json"
CODES_FORMAT = 2
SPLITS = ("train", "validation")
PART_ROWS = 10_000
# data settings that do not change which rows are read or how: runtime knobs, and the shard specs, whose shards
# are parts of their own (so that a spec can grow)
RUNTIME_FIELDS = ("dataloader_num_workers", "cache_images", "train_shards", "validation_shards", "shuffle_buffer")


class CodesCacheError(ValueError):
    """A codes folder is missing, malformed, or was made with another tokenizer or other data."""


def tokenizer_identity(vqvae: str | os.PathLike) -> dict[str, Any]:
    """The save_id, folder and code grid of the tokenizer saved in `vqvae`."""
    directory = Path(vqvae).resolve()
    config, meta = load_config(VQVAEConfig, directory)
    if meta["save_id"] is None:
        raise CodesCacheError(
            f"{directory / 'config.json'} has no save_id, so its codes cannot be told from another tokenizer's; "
            "save the tokenizer with save_pretrained"
        )
    return {
        "save_id": meta["save_id"],
        "dir": str(directory),
        "codebook_size": config.codebook_size,
        "grid_size": config.grid_size,
    }


def data_identity(data: DataConfig, seed: int) -> dict[str, Any]:
    """The data settings that decide which rows are read and how (local paths made absolute), and the split
    seed."""
    identity: dict[str, Any] = {f.name: getattr(data, f.name) for f in fields(data) if f.name not in RUNTIME_FIELDS}
    for name in ("train_data_dir", "dataset_name"):
        if identity[name] is not None and Path(identity[name]).exists():
            identity[name] = str(Path(identity[name]).resolve())
    return json.loads(json.dumps({**identity, "seed": seed}))  # as read back from codes_info.json (tuples: lists)


# ---------------------------------------------------------------- reading


class CodeDataset(torch.utils.data.Dataset):
    """One split of a codes folder, memory-mapped: item i is {"codes": LongTensor(N), "text": str, "index": i}."""

    def __init__(self, tables: list[datasets.Dataset], num_codes: int) -> None:
        self.tables = tables
        self._chunks: list[tuple[int, int, np.ndarray]] = []  # (first row, table, (rows, num_codes) view)
        start = 0
        for t, table in enumerate(tables):
            for chunk in table.data.column("codes").chunks:  # zero-copy views of the memory-mapped columns
                view = chunk.flatten().to_numpy(zero_copy_only=True).reshape(len(chunk), num_codes)
                self._chunks.append((start, t, view))
                start += len(chunk)
        self._starts = [first for first, _, _ in self._chunks]
        self._table_starts = np.cumsum([0, *(len(table) for table in tables)]).tolist()
        self.num_rows = start

    def __len__(self) -> int:
        return self.num_rows

    def codes(self, i: int) -> np.ndarray:
        """Row i's flattened codes, as stored."""
        c = bisect.bisect_right(self._starts, i) - 1
        first, _, view = self._chunks[c]
        return view[i - first]

    def _column(self, name: str, i: int) -> str:
        t = bisect.bisect_right(self._table_starts, i) - 1
        return self.tables[t].data.column(name)[i - self._table_starts[t]].as_py()

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} of {self.num_rows}")
        return {"codes": torch.from_numpy(self.codes(i).astype(np.int64)), "text": self._column("text", i), "index": i}

    @property
    def captions(self) -> list[str]:
        return [text for table in self.tables for text in table["text"]]

    @property
    def sources(self) -> list[str]:
        return [source for table in self.tables for source in table["source"]]


def _read_info(directory: Path) -> dict[str, Any]:
    if not (directory / INFO_NAME).is_file():
        raise CodesCacheError(f"{directory} is not a codes folder (no {INFO_NAME}); make one with encode_dataset")
    info = read_json(directory / INFO_NAME)
    if (
        not isinstance(info, dict)
        or info.get("format") != CODES_FORMAT
        or not all(isinstance(info.get(key), dict) for key in ("vqvae", "data", "parts"))
    ):
        raise CodesCacheError(f"{directory / INFO_NAME}: not a codes folder of format {CODES_FORMAT}; encode it again")
    return info


def _check_identity(directory: Path, info: dict[str, Any], vqvae: str | os.PathLike | None, data: dict | None) -> None:
    """Raise CodesCacheError when the folder was made with another tokenizer or from other data."""
    redo = f"delete {directory} or pass another --codes_cache"
    if vqvae is not None:
        made, wanted = info["vqvae"], tokenizer_identity(vqvae)
        if made["save_id"] != wanted["save_id"]:
            raise CodesCacheError(
                f"the codes in {directory} were made with another tokenizer ({made['dir']}, save_id "
                f"{made['save_id']}), not with {wanted['dir']} (save_id {wanted['save_id']}); {redo}"
            )
    if data is not None:
        for name in sorted(info["data"].keys() | data.keys()):
            made, wanted = info["data"].get(name), data.get(name)
            if made != wanted:
                raise CodesCacheError(
                    f"the codes in {directory} were made from data with {name}={made!r}, not {name}={wanted!r}; {redo}"
                )


def load_codes(
    directory: str | os.PathLike,
    vqvae: str | os.PathLike | None = None,
    data: DataConfig | None = None,
    *,
    seed: int = 0,
) -> tuple[CodeDataset, CodeDataset]:
    """The train and validation splits of a codes folder. With the tokenizer folder `vqvae` and/or the `data`
    config (and split `seed`), refuse a folder made with another tokenizer or from other data."""
    directory = Path(directory)
    info = _read_info(directory)
    _check_identity(directory, info, vqvae, None if data is None else data_identity(data, seed))
    num_codes = info["vqvae"]["grid_size"] ** 2
    splits = []
    for split in SPLITS:
        names = [name for name, rows in info["parts"][split].items() if rows > 0]
        splits.append(
            CodeDataset([datasets.load_from_disk(str(directory / split / name)) for name in names], num_codes)
        )
    return splits[0], splits[1]


# ---------------------------------------------------------------- writing


@dataclass
class _Job:
    """A part to encode: `read(counts)` gives (split, pixels (3, R, R) in [-1, 1], text, source) rows and counts
    the samples it skips; `splits` are the splits it writes a part of."""

    name: str
    splits: tuple[str, ...]
    read: Callable[[Counter[str]], Iterator[tuple[str, torch.Tensor, str, str]]]


def _part_name(path: str) -> str:
    """A part name for a shard: its file name and a digest of its full path (two sources may share file names)."""
    digest = hashlib.blake2b(str(Path(path).resolve()).encode(), digest_size=4).hexdigest()
    return f"{Path(path).name.removesuffix('.tar')}-{digest}"


def _stream_job(name: str, data: StreamData, split: str | None, holdout: float | None, stream=(0, 1)) -> _Job:
    """A part of a stream's epoch-0 rows: all in `split`, or (split None) routed by key to train or validation."""

    def read(counts: Counter[str]) -> Iterator[tuple[str, torch.Tensor, str, str]]:
        for row in data.epoch_rows(*stream, counts=counts):
            where = split or ("validation" if holdout and held_out(row.key, holdout) else "train")
            yield where, to_tensor(row.pixels), row.text, row.key

    return _Job(name, SPLITS if split is None else (split,), read)


def _jobs(data: DataConfig, seed: int, world_size: int, progress: bool) -> list[_Job]:
    """The parts of the configured data, in a fixed order."""
    holdout = None if data.validation_shards is not None else data.validation_fraction
    if data.train_shards is not None:
        jobs = [
            _stream_job(
                _part_name(path), StreamData(ShardSource(path, data, seed, progress=False), data, seed), None, holdout
            )
            for path in resolve_shards(data.train_shards)
        ]
        for path in resolve_shards(data.validation_shards) if data.validation_shards else []:
            source = ShardSource(path, data, seed, progress=False)
            jobs.append(_stream_job(_part_name(path), StreamData(source, data, seed), "validation", None))
        return jobs
    if data.streaming:
        loaded = load_datasets(data, streaming=True)
        train, validation = split_names(loaded, data)
        jobs = [
            _stream_job(
                f"stream-{rank:05d}-of-{world_size:05d}",
                StreamData(DatasetStreamSource(loaded[train], data, train), data, seed),
                None,
                None if validation else data.validation_fraction,
                (rank, world_size),
            )
            for rank in range(world_size)
        ]
        if validation:
            source = DatasetStreamSource(loaded[validation], data, validation)
            jobs.append(_stream_job("stream-validation", StreamData(source, data, seed), "validation", None))
        return jobs
    splits = load_image_text(data, seed=seed, progress=progress)
    if not len(splits.validation):
        raise CodesCacheError("the data has no validation rows; set --validation_fraction above 0")
    jobs = []
    for split, rows in (("train", splits.train), ("validation", splits.validation)):
        for k, start in enumerate(range(0, len(rows), PART_ROWS)):

            def read(counts: Counter[str], rows=rows, split=split, start=start) -> Iterator[Any]:
                for i in range(start, min(start + PART_ROWS, len(rows))):
                    item = rows[i]
                    yield split, item["pixel_values"], item["text"], rows.source(i)

            jobs.append(_Job(f"{split}-rows-{k:05d}", (split,), read))
    return jobs


def _features(num_codes: int, dtype: str) -> datasets.Features:
    return datasets.Features(
        {
            "codes": datasets.List(datasets.Value(dtype), length=num_codes),
            "text": datasets.Value("string"),
            "source": datasets.Value("string"),
        }
    )


def _encode_job(model: VQVAE, job: _Job, out_dir: Path, batch_size: int, bar: tqdm) -> dict[str, Any]:
    """Encode one part and write it into each of its splits; returns its record (rows per split, skips)."""
    num_codes = model.config.grid_size**2
    dtype = "int16" if model.config.codebook_size <= 2**15 else "int32"
    device = next(model.parameters()).device
    columns = {split: {"codes": [], "text": [], "source": []} for split in job.splits}
    pending: list[tuple[str, torch.Tensor, str, str]] = []
    counts: Counter[str] = Counter()

    def flush() -> None:
        pixels = torch.stack([p for _, p, _, _ in pending]).to(device)
        codes = model.encode(pixels).flatten(1).cpu().numpy().astype(dtype)
        for (split, _, text, source), row in zip(pending, codes, strict=True):
            columns[split]["codes"].append(row)
            columns[split]["text"].append(text)
            columns[split]["source"].append(source)
        bar.update(len(pending))
        pending.clear()

    for row in job.read(counts):
        pending.append(row)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    record = {"rows": {}, "skipped": dict(SkipReport(0, counts).skipped)}
    for split, values in columns.items():
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        record["rows"][split] = len(values["text"])
        if values["text"]:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{job.name}-", dir=folder))
            table = datasets.Dataset.from_dict(
                {"codes": np.stack(values["codes"]), "text": values["text"], "source": values["source"]},
                features=_features(num_codes, dtype),
            )
            table.save_to_disk(str(tmp))  # (datasets' own progress bar is off: this function shows one)
            respect_umask(tmp)
            if (folder / job.name).exists():
                shutil.rmtree(folder / job.name)
            os.replace(tmp, folder / job.name)
    return record


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / "parts" / f"{name}.json"


def encode_dataset(
    vqvae: str | os.PathLike,
    data: DataConfig,
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    progress: bool = True,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    replace: bool = True,
) -> Path:
    """Encode the parts of `data` (read as `load_image_text` reads it with `seed`) that `out_dir` does not hold yet
    with the tokenizer saved in the folder `vqvae`, and write `codes_info.json`; returns `out_dir`.

    Process `rank` of `world_size` encodes parts rank, rank + world_size, ...; every process calls this, and
    `barrier` waits for all of them. A folder made with another tokenizer or from other data is replaced
    (`replace`) or refused. The validation split must not be empty."""
    identity = {"format": CODES_FORMAT, "vqvae": tokenizer_identity(vqvae), "data": data_identity(data, seed)}
    model = VQVAE.from_pretrained(vqvae, device)
    if data.resolution != model.config.resolution:
        raise CodesCacheError(
            f"the tokenizer in {vqvae} takes {model.config.resolution} px images, the data is read at "
            f"{data.resolution} px (--resolution)"
        )
    out_dir = Path(out_dir)
    if not replace and not data.is_stream and _complete(out_dir, identity):
        return out_dir  # a folder or dataset read in full has no parts to add: no need to scan it again
    if rank == 0:
        _prepare_folder(out_dir, identity, replace)
    barrier()
    jobs = _jobs(data, seed, world_size, progress)
    datasets.disable_progress_bars()
    mine = [
        job for i, job in enumerate(jobs) if i % world_size == rank and not _record_path(out_dir, job.name).is_file()
    ]
    missing = sum(not _record_path(out_dir, job.name).is_file() for job in jobs)
    if progress and missing:
        print(f"vqclip codes: encoding the data into {out_dir} ({missing} of {len(jobs)} parts)", file=sys.stderr)
    with tqdm(desc=f"encoding {len(mine)} parts", unit="img", disable=not (progress and mine)) as bar:
        for job in mine:
            record = _encode_job(model, job, out_dir, batch_size, bar)
            atomic_write_text(_record_path(out_dir, job.name), json.dumps({**record, "identity": identity}) + "\n")
    barrier()
    records = {}
    for job in jobs:
        path = _record_path(out_dir, job.name)
        if not path.is_file():
            raise CodesCacheError(
                f"{path} is missing after every process encoded its parts: all machines must see {out_dir} "
                "(put --output_dir or --codes_cache on a shared filesystem)"
            )
        records[job.name] = read_json(path)
    parts = {split: {name: r["rows"].get(split, 0) for name, r in records.items()} for split in SPLITS}
    if not sum(parts["validation"].values()):
        raise CodesCacheError("the data has no validation rows; set --validation_fraction above 0")
    skipped: Counter[str] = Counter()
    for record in records.values():
        skipped.update(record["skipped"])
    if rank == 0:
        rows = {split: sum(parts[split].values()) for split in SPLITS}
        info = {**identity, "parts": parts, "rows": rows, "skipped": dict(skipped)}
        atomic_write_text(out_dir / INFO_NAME, json.dumps(info, indent=2) + "\n")
    barrier()
    return out_dir


def _complete(out_dir: Path, identity: dict[str, Any]) -> bool:
    """Whether `out_dir` holds finished codes made with `identity` (another identity is an error)."""
    if not (out_dir / INFO_NAME).is_file():
        return False
    info = _read_info(out_dir)
    _check_identity(out_dir, info, identity["vqvae"]["dir"], identity["data"])
    return True


def _prepare_folder(out_dir: Path, identity: dict[str, Any], replace: bool) -> None:
    """Make `out_dir` a codes folder for `identity`: new, or emptied of codes made otherwise (`replace`), whose
    finished parts with the same identity are kept."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "parts").is_dir():
        if (out_dir / INFO_NAME).is_file():
            raise CodesCacheError(f"{out_dir} holds codes in an older format; delete it to encode the data again")
        raise CodesCacheError(f"{out_dir} is not a codes folder (no {INFO_NAME}); refusing to replace it")
    for record in sorted((out_dir / "parts").glob("*.json")) if out_dir.exists() else []:
        made = read_json(record).get("identity")
        if made == identity:
            continue
        if not replace:
            info = {**made, "parts": {}} if isinstance(made, dict) else {}
            _check_identity(out_dir, info, identity["vqvae"]["dir"], identity["data"])
        for split in SPLITS:
            shutil.rmtree(out_dir / split / record.name.removesuffix(".json"), ignore_errors=True)
        record.unlink()
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob("*/.tmp-*"):  # parts an interrupted run was writing
        shutil.rmtree(leftover, ignore_errors=True)


def cached_codes(
    vqvae: str | os.PathLike,
    data: DataConfig,
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> tuple[CodeDataset, CodeDataset]:
    """The codes of `data` in `directory`, checked to come from this tokenizer and data, after encoding the parts
    it does not hold yet (all of them the first time; new shards later)."""
    directory = Path(directory)
    encode_dataset(
        vqvae, data, directory, batch_size, progress, seed=seed, device=device, rank=rank, world_size=world_size,
        barrier=barrier, replace=False,
    )  # fmt: skip
    train, validation = load_codes(directory, vqvae, data, seed=seed)
    if progress:
        print(f"vqclip codes: {len(train)} train + {len(validation)} validation rows from {directory}", file=sys.stderr)
    return train, validation
