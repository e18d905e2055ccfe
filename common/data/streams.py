"""Streamed image-text training data: webdataset shards and `datasets` streaming, read in parallel by every
process and DataLoader worker, with exact mid-epoch resume.

How a stream is laid out (nothing is scanned up front; shard sizes come from their `_stats.json`):

- An epoch visits the shards in an order seeded by (seed, epoch); their samples, end to end, are one sequence of
  `total` positions. With P processes and W workers per process there are S = P × W streams, and stream
  `s = rank × W + worker` reads the contiguous positions `[s × total // S, (s + 1) × total // S)`: every sample is
  read exactly once per epoch, by one stream.
- A stream reads blocks of `shuffle_buffer` consecutive samples and takes each block's samples in an order seeded
  by (seed, epoch, block): shard order plus this block shuffle is the shuffling.
- A worker turns its samples into whole batches (bad samples are skipped and counted by reason; with a batch key,
  a row whose key is already in the batch waits for a later one). A batch that an epoch's end cuts short is
  filled from the next epoch, so nothing is dropped; each row keeps the epoch it was read in.
- Each batch comes with its stream's position after it: the epoch, the block, how many of its samples were taken,
  the addresses of waiting rows and the skip counts. The Trainer checkpoints the position of the last batch it
  consumed from each worker, and which worker is next; resuming re-reads only the current block (and the blocks
  of waiting rows), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from common.data.config import DataConfig
from common.data.images import load_image, to_array, to_tensor
from common.data.shards import IMAGE_SUFFIXES, ShardReadError, expand_shards, read_shard, shard_sizes
from common.data.skips import BadImage, Reason, SkipReport

if TYPE_CHECKING:
    from common.data.mapped import ImageTextSplits

POSITION_FORMAT = 1
_REPORTED: set[str] = set()  # broken shards this process has named in the log


def stable_id(key: str) -> int:
    """A 63-bit number for a sample key, the same in every process and run (Python's `hash` of a str is not)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def held_out(key: str, fraction: float) -> bool:
    """Whether a sample belongs to the validation split drawn from the training stream: a fixed `fraction` of
    keys, decided by the key alone, so no scan is needed and every process agrees."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"validate").digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def seeded_generator(seed: int, epoch: int, row: int) -> torch.Generator:
    """The generator of one row's augmentation: the same whether or not the run was resumed."""
    return torch.Generator().manual_seed(hash((seed, epoch, row)) % (2**63))


@dataclass
class Parsed:
    """What a source reads for one sample before the image is decoded."""

    key: str
    image: bytes | None
    caption: Any
    extras: dict[str, Any]


class RawSource(Protocol):
    """Where samples come from: blocks of raw samples, addressed by small JSON-able states."""

    description: str

    def identity(self) -> dict[str, Any]: ...

    def first_block(self, stream: int, streams: int, epoch: int) -> dict[str, Any]: ...

    def read_block(self, block: dict[str, Any], size: int) -> tuple[list[Any], dict[str, Any] | None]: ...

    def parse(self, raw: Any) -> Parsed | str: ...


# ---------------------------------------------------------------- shards


def resolve_shards(spec: str) -> list[str]:
    """Shard paths from a spec (braces, `::`) or a folder (its .tar files, sorted)."""
    if Path(spec).is_dir():
        paths = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not paths:
            raise ValueError(f"{spec} holds no .tar shards")
        return paths
    return expand_shards(spec)


class ShardSource:
    """Webdataset shards read in epoch order; a raw sample is a dict of `__key__` and bytes per suffix, or the
    `Reason` of a sample a broken shard could not give."""

    def __init__(self, spec: str, config: DataConfig, seed: int, *, progress: bool = True) -> None:
        self.shards = resolve_shards(spec)
        missing = [path for path in self.shards if not Path(path).is_file()]
        if len(missing) == len(self.shards):
            raise ValueError(f"none of the {len(self.shards)} shards of {spec!r} exists (first: {missing[0]})")
        if missing and progress:
            print(
                f"vqclip data: skipping {len(missing)} shards of {spec!r} that do not exist: {missing}", file=sys.stderr
            )
        self.shards = [path for path in self.shards if path not in set(missing)]
        self.sizes = shard_sizes(self.shards, progress=progress)
        self.total = sum(self.sizes)
        if self.total == 0:
            raise ValueError(f"the shards of {spec!r} hold no samples")
        self.config, self.seed = config, seed
        self.description = f"{spec} ({self.total} samples in {len(self.shards)} shards)"
        self._cursor: tuple[int, int, Iterator[Any]] | None = None  # (epoch, next position, samples from there)

    def identity(self) -> dict[str, Any]:
        return {"kind": "shards", "shards": [Path(p).name for p in self.shards], "sizes": self.sizes}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def first_block(self, stream: int, streams: int, epoch: int) -> dict[str, Any]:
        lo, hi = stream * self.total // streams, (stream + 1) * self.total // streams
        return {"epoch": epoch, "pos": lo, "end": hi}

    def _samples(self, epoch: int, pos: int, end: int) -> Iterator[Any]:
        """Raw samples of positions pos..end-1 of an epoch's order."""
        order = self._order(epoch)
        sizes = np.asarray(self.sizes)[order]
        ends = np.cumsum(sizes)
        j = int(np.searchsorted(ends, pos, side="right"))
        offset = pos - (int(ends[j - 1]) if j else 0)
        while pos < end:
            shard, size = self.shards[order[j]], int(sizes[j])
            wanted = min(size - offset, end - pos)
            got = 0
            if wanted == 0:
                j, offset = j + 1, 0
                continue
            try:
                for sample in read_shard(shard, offset):
                    yield sample
                    got += 1
                    if got == wanted:
                        break
                else:
                    raise ShardReadError(Reason.TRUNCATED_SHARD, f"{shard}: ended after {offset + got} of {size}")
            except ShardReadError as err:
                if shard not in _REPORTED:  # named once per process; its samples are counted every time
                    _REPORTED.add(shard)
                    print(f"vqclip data: {err}", file=sys.stderr)
                yield from [err.reason] * (wanted - got)
            pos += wanted
            j, offset = j + 1, 0

    def read_block(self, block: dict[str, Any], size: int) -> tuple[list[Any], dict[str, Any] | None]:
        epoch, pos, end = block["epoch"], block["pos"], block["end"]
        if self._cursor is None or self._cursor[:2] != (epoch, pos):
            self._cursor = (epoch, pos, self._samples(epoch, pos, end))
        count = min(size, end - pos)
        raws = [next(self._cursor[2]) for _ in range(count)]
        self._cursor = (epoch, pos + count, self._cursor[2])
        following = {**block, "pos": pos + count}
        return raws, following if pos + count < end else None

    def parse(self, raw: Any) -> Parsed | str:
        if isinstance(raw, str):
            return raw
        key = f"{Path(raw.get('__url__', '')).name}/{raw['__key__']}"
        image = next((raw[suffix] for suffix in IMAGE_SUFFIXES if suffix in raw), None)
        metadata: dict[str, Any] = {}
        if "json" in raw:
            try:
                loaded = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                loaded = None
            if isinstance(loaded, dict):
                metadata = loaded
            elif self.config.caption_key is not None:
                return Reason.UNREADABLE_CAPTION
        if self.config.caption_key is not None:
            caption = metadata.get(self.config.caption_key)
        elif "txt" in raw:
            try:
                caption = raw["txt"].decode("utf-8")
            except UnicodeDecodeError:
                return Reason.UNREADABLE_CAPTION
        else:
            caption = None
        extras = {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))}
        return Parsed(key, image, caption, extras)


class DatasetStreamSource:
    """One split of a `datasets` dataset read with streaming; stream s of S is `split_dataset_by_node(rank=s,
    world_size=S)`, and a block's address holds the dataset's own `state_dict()` at its start."""

    def __init__(self, dataset: Any, config: DataConfig, split: str) -> None:
        import datasets

        from common.data.mapped import check_columns

        check_columns(dataset, config, split)
        self.image_column = config.image_column or "image"
        self.dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.config = config
        self.description = f"{config.dataset_name} ({split})"
        self.split = split
        self._cursor: tuple[tuple[int, int, int, int], Any, Iterator[Any]] | None = None

    def identity(self) -> dict[str, Any]:
        return {"kind": "datasets", "name": self.config.dataset_name, "split": self.split}

    def first_block(self, stream: int, streams: int, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "stream": stream, "streams": streams, "pos": 0, "state": None}

    def read_block(self, block: dict[str, Any], size: int) -> tuple[list[Any], dict[str, Any] | None]:
        from datasets.distributed import split_dataset_by_node

        where = (block["epoch"], block["stream"], block["streams"], block["pos"])
        if self._cursor is None or self._cursor[0] != where:
            view = split_dataset_by_node(self.dataset, rank=block["stream"], world_size=block["streams"])
            view.set_epoch(block["epoch"])
            if block["state"] is not None:
                view.load_state_dict(block["state"])
            # `iter`, unlike `iter(view)`, reads the view as it is inside a DataLoader worker too (it would
            # otherwise split itself among the workers again)
            rows = ({name: values[0] for name, values in batch.items()} for batch in view.iter(batch_size=1))
            self._cursor = (where, view, rows)
        _, view, examples = self._cursor
        raws = list(islice(examples, size))
        following = {**block, "pos": block["pos"] + len(raws), "state": view.state_dict()}
        self._cursor = ((*where[:3], following["pos"]), view, examples)
        return raws, following if len(raws) == size else None

    def parse(self, raw: Any) -> Parsed | str:
        cell = raw.get(self.image_column) or {}
        image = cell.get("bytes")
        path = cell.get("path")
        if image is None and path is not None:
            try:
                image = Path(path).read_bytes()
            except OSError:
                return Reason.MISSING_IMAGE
        key = path if path else hashlib.blake2b(image or b"", digest_size=16).hexdigest()
        caption = raw.get(self.config.caption_column)
        extras = {
            k: v
            for k, v in raw.items()
            if k not in (self.image_column, self.config.caption_column) and isinstance(v, (str, int, float, bool))
        }
        return Parsed(key, image, caption, extras)


# ---------------------------------------------------------------- batches


@dataclass
class Row:
    key: str
    pixels: np.ndarray  # (R, R, 3) uint8
    text: str
    epoch: int

    def sample(self) -> dict[str, Any]:
        """The row as a dataset item: {"pixel_values": (3, R, R) in [-1, 1], "text", "index"}."""
        return {"pixel_values": to_tensor(self.pixels), "text": self.text, "index": stable_id(self.key)}


def _caption_reason(caption: Any) -> str | None:
    if caption is None:
        return Reason.MISSING_CAPTION
    if not isinstance(caption, str):
        return Reason.NON_STRING_CAPTION
    if not caption.strip():
        return Reason.EMPTY_CAPTION
    return None


class _Stream:
    """One stream's samples turned into batches, and its position."""

    def __init__(self, data: StreamData, stream: int, streams: int, settings: dict[str, Any]) -> None:
        self.data, self.source, self.config = data, data.source, data.config
        self.stream, self.streams = stream, streams
        self.batch_size = settings["batch_size"]
        self.transform = settings["transform"]
        self.batch_key = settings["batch_key"]
        self.counts: Counter[str] = Counter()
        self.waiting: list[tuple[list[Any], Row]] = []  # ([block, index], row)
        self.rows_this_epoch = 0
        position = settings["position"]
        if position is None:
            self.epoch = 0
            self._load(self.source.first_block(stream, streams, 0))
        else:
            self.epoch = position["epoch"]
            self._load(position["block"])
            self.taken = position["taken"]
            self.counts.update(position["counts"])
            self.rows_this_epoch = position["rows_this_epoch"]
            self._restore_waiting(position["waiting"])

    def _load(self, block: dict[str, Any]) -> None:
        self.block = block
        self.raws, self.following = self.source.read_block(block, self.config.shuffle_buffer)
        rng = np.random.default_rng([self.data.seed, block["epoch"], block["pos"]])
        self.order = rng.permutation(len(self.raws)).tolist()
        self.taken = 0

    def _restore_waiting(self, addresses: list[list[Any]]) -> None:
        blocks: dict[str, list[Any]] = {json.dumps(self.block, sort_keys=True): self.raws}
        for block, index in addresses:
            name = json.dumps(block, sort_keys=True)
            if name not in blocks:
                blocks[name] = self.source.read_block(block, self.config.shuffle_buffer)[0]
            row = self._row(blocks[name][index], block["epoch"], Counter())
            assert row is not None, "a waiting row no longer decodes"
            self.waiting.append(([block, index], row))

    def _next_raw(self) -> tuple[list[Any], Any]:
        while self.taken >= len(self.order):
            if self.following is None:  # the epoch is over for this stream
                if self.rows_this_epoch == 0:
                    raise ValueError(
                        f"stream {self.stream} of {self.streams} found no usable sample in a whole epoch of "
                        f"{self.source.description} ({SkipReport(0, self.counts)})"
                    )
                self.epoch, self.rows_this_epoch = self.epoch + 1, 0
                self._load(self.source.first_block(self.stream, self.streams, self.epoch))
            else:
                self._load(self.following)
        index = self.order[self.taken]
        self.taken += 1
        return [self.block, index], self.raws[index]

    def _row(self, raw: Any, epoch: int, counts: Counter[str]) -> Row | None:
        """The decoded row of a raw sample, or None (counted in `counts` by reason, unless it is held out for
        validation or left out by --exclude)."""
        parsed = self.source.parse(raw)
        if isinstance(parsed, str):
            counts[parsed] += 1
            return None
        if self.data.holdout is not None and held_out(parsed.key, self.data.holdout) != self.data.want_held_out:
            return None
        if any(str(parsed.extras.get(name)) == value for name, value in self.data.excluded):
            return None
        reason = _caption_reason(parsed.caption) or (Reason.MISSING_IMAGE if parsed.image is None else None)
        if reason is not None:
            counts[reason] += 1
            return None
        try:
            config = self.config
            image = load_image(parsed.image, max_pixels=config.max_image_pixels, min_side=config.min_image_side)
        except BadImage as err:
            counts[err.reason] += 1
            return None
        caption = parsed.caption.strip()
        if len(caption) > self.config.max_caption_chars:
            counts[Reason.CAPTION_TRUNCATED] += 1
            caption = caption[: self.config.max_caption_chars]
        return Row(parsed.key, to_array(image, self.config.resolution), caption, epoch)

    def position(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "block": self.block,
            "taken": self.taken,
            "rows_this_epoch": self.rows_this_epoch,
            "waiting": [address for address, _ in self.waiting],
            "counts": dict(self.counts),
        }

    def _check_waiting(self) -> None:
        limit = max(4 * self.batch_size, self.config.shuffle_buffer)
        if len(self.waiting) > limit:
            raise ValueError(
                f"{limit} rows are waiting for a batch without their caption: {self.source.description} has too "
                f"few distinct captions for batches of {self.batch_size}; lower --train_batch_size"
            )

    def batches(self) -> Iterator[tuple[list[Row], dict[str, Any]]]:
        while True:
            batch: list[Row] = []
            keys: set[Hashable] = set()
            still_waiting = []
            for address, row in self.waiting:  # rows deferred by earlier batches go first
                key = self.batch_key(row.text)
                if len(batch) < self.batch_size and key not in keys:
                    batch.append(row)
                    keys.add(key)
                else:
                    still_waiting.append((address, row))
            self.waiting = still_waiting
            while len(batch) < self.batch_size:
                address, raw = self._next_raw()
                row = self._row(raw, self.epoch, self.counts)
                if row is None:
                    continue
                self.rows_this_epoch += 1
                if self.batch_key is not None:
                    key = self.batch_key(row.text)
                    if key in keys:
                        self.waiting.append((address, row))
                        self._check_waiting()
                        continue
                    keys.add(key)
                batch.append(row)
            yield batch, self.position()


class _StreamBatches(torch.utils.data.IterableDataset):
    """The batches of this process's streams: worker w of a DataLoader plays stream role (w + rotation) % W."""

    def __init__(self, data: StreamData, rank: int, world_size: int, workers: int, settings: dict[str, Any]) -> None:
        self.data, self.rank, self.world_size, self.workers, self.settings = data, rank, world_size, workers, settings

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        role = ((info.id if info is not None else 0) + self.settings["rotation"]) % self.workers
        settings = {**self.settings, "position": self.settings["positions"].get(str(role))}
        stream = _Stream(self.data, self.rank * self.workers + role, self.world_size * self.workers, settings)
        transform, collate = self.settings["transform"], self.settings["collate"]
        for rows, position in stream.batches():
            samples = [row.sample() for row in rows]
            if transform is not None:
                samples = [
                    transform(sample, seeded_generator(self.data.seed, row.epoch, sample["index"]))
                    for row, sample in zip(rows, samples, strict=True)
                ]
            yield collate(samples), {"role": role, "position": position, "epochs": [row.epoch for row in rows]}


def _unbatched(item: Any) -> Any:
    return item


class StreamData:
    """Training data read as a stream; what the Trainer draws batches from (see the module docstring).

    `position` is the JSON-able state to checkpoint after the batches consumed so far; pass it back as
    `loader(..., position=...)` to continue exactly there."""

    def __init__(
        self,
        source: RawSource,
        config: DataConfig,
        seed: int,
        *,
        holdout: float | None = None,
        want_held_out: bool = False,
    ) -> None:
        self.source, self.config, self.seed = source, config, seed
        self.holdout, self.want_held_out = holdout, want_held_out
        self.excluded = [tuple(spec.split("=", 1)) for spec in config.exclude]
        self.position: dict[str, Any] | None = None

    def loader(
        self,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        transform: Callable | None,
        collate: Callable[[list[dict]], Any],
        batch_key: Callable[[str], Hashable] | None,
        position: dict[str, Any] | None = None,
    ) -> Iterator[Any]:
        """Batches of this process forever; after each, `self.position` is where the stream stands."""
        workers = max(1, self.config.dataloader_num_workers)
        expected = {
            "format": POSITION_FORMAT,
            "source": self.source.identity(),
            "world_size": world_size,
            "workers": workers,
        }
        if position is not None:
            found = {key: position.get(key) for key in expected}
            if found != expected:
                changed = sorted(key for key in expected if found[key] != expected[key])
                raise ValueError(
                    f"the checkpoint's data position was made with other {', '.join(changed)}; resume with the "
                    "same data, process count and --dataloader_num_workers"
                )
        positions = dict(position["streams"]) if position else {}
        rotation = position["next_role"] if position else 0
        settings = {
            "batch_size": batch_size,
            "transform": transform,
            "collate": collate,
            "batch_key": batch_key,
            "positions": positions,
            "rotation": rotation,
        }
        dataset = _StreamBatches(self, rank, world_size, workers, settings)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.config.dataloader_num_workers, collate_fn=_unbatched
        )
        for batch, info in loader:
            positions[str(info["role"])] = info["position"]
            self.position = {**expected, "streams": dict(positions), "next_role": (info["role"] + 1) % workers}
            self.last_epochs = info["epochs"]
            yield batch

    def report(self) -> SkipReport:
        """Samples skipped so far by this process's streams, by reason."""
        counts: Counter[str] = Counter()
        for position in (self.position or {}).get("streams", {}).values():
            counts.update(position["counts"])
        return SkipReport(0, counts)

    def epoch_rows(self, stream: int = 0, streams: int = 1, counts: Counter[str] | None = None) -> Iterator[Row]:
        """The usable rows of epoch 0 of one stream, in the order training reads them; skipped samples are counted
        in `counts` by reason."""
        settings = {"batch_size": 1, "transform": None, "collate": None, "batch_key": None, "position": None}
        reader = _Stream(self, stream, streams, settings)
        counts = Counter() if counts is None else counts
        while reader.following is not None or reader.taken < len(reader.order):
            _, raw = reader._next_raw()
            row = reader._row(raw, 0, counts)
            if row is not None:
                yield row

    def rows(self, limit: int) -> tuple[list[Row], SkipReport]:
        """The first `limit` usable rows of epoch 0 (read as one stream), and what was skipped on the way: a
        validation set held in memory."""
        counts: Counter[str] = Counter()
        found = list(islice(self.epoch_rows(counts=counts), limit))
        return found, SkipReport(len(found), counts)


def _sources(config: DataConfig, seed: int, progress: bool) -> tuple[RawSource, RawSource | None, RawSource]:
    """The training source, the validation source if the data has its own, and a second reader of the training
    source (the validation rows are then held out of it)."""
    if config.train_shards is not None:
        validation = None
        if config.validation_shards is not None:
            validation = ShardSource(config.validation_shards, config, seed, progress=progress)
        train = ShardSource(config.train_shards, config, seed, progress=progress)
        return train, validation, ShardSource(config.train_shards, config, seed, progress=False)
    from common.data.mapped import load_datasets, split_names

    loaded = load_datasets(config, streaming=True)
    train_split, validation_split = split_names(loaded, config)
    validation = (
        None if validation_split is None else DatasetStreamSource(loaded[validation_split], config, validation_split)
    )
    return (
        DatasetStreamSource(loaded[train_split], config, train_split),
        validation,
        DatasetStreamSource(loaded[train_split], config, train_split),
    )


def load_stream(config: DataConfig, *, seed: int = 0, progress: bool = True) -> ImageTextSplits:
    """The training stream and the validation rows (in memory) of shards or a `datasets` stream; see
    `common.data.load_image_text`."""
    from common.data.mapped import ImageTextDataset, ImageTextSplits, _Rows

    train_source, validation_source, second_reader = _sources(config, seed, progress)
    if validation_source is not None:
        train = StreamData(train_source, config, seed)
        validation_data = StreamData(validation_source, config, seed)
    else:
        fraction = config.validation_fraction
        train = StreamData(train_source, config, seed, holdout=fraction)
        validation_data = StreamData(second_reader, config, seed, holdout=fraction, want_held_out=True)
    rows, report = validation_data.rows(config.max_validation_samples or 1000)
    if not rows:
        raise ValueError(
            f"no validation rows in {validation_data.source.description} ({report}); give a validation split "
            "(--validation_shards) or a --validation_fraction above 0"
        )
    validation = ImageTextDataset(
        _Rows(
            images=[None] * len(rows),
            captions=[row.text for row in rows],
            sources=[row.key for row in rows],
            pixels=[row.pixels for row in rows],
        ),
        config,
    )
    if progress:
        print(
            f"vqclip data: streaming {train.source.description}; {len(rows)} validation rows in memory ({report})",
            file=sys.stderr,
        )
    return ImageTextSplits(train, validation, report)
