"""Map-style image-text sources: read the rows, check every image once, split, and count what was skipped.

Sources (see DESIGN.md, "Data contract"):

- `--train_data_dir` with `metadata.jsonl` (`{"file_name": ..., "text": ..., <extra columns>}`), flat or with
  `train/` and `validation/` (or `test/`) subfolders; the format our own corpora are written in.
- `--train_data_dir` with images and same-named `.txt` captions (`cat.png` + `cat.txt`), flat or with splits.
- `--dataset_name`: anything `datasets` reads: a hub name, a local parquet/arrow/csv/json file, or a directory
  written by `save_to_disk`.

Bad rows (unreadable, truncated, huge or tiny images; missing, empty or non-string captions; broken metadata
lines) are skipped and counted by reason in a `SkipReport`, never fatal. Every image is decoded once by a
threaded scan that finds them; `cache_images` keeps the resized pixels of that scan in memory.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.data.config import DataConfig
from common.data.images import IMAGE_EXTENSIONS, load_image, to_array, to_tensor
from common.data.skips import BadImage, Reason, SkipReport

if TYPE_CHECKING:
    from common.data.streams import StreamData
from common.metadata import METADATA_NAME

VALIDATION_SPLITS = ("validation", "valid", "val", "dev", "test")
DATASET_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
}
_SCAN_CHUNK = 256


@dataclass
class _Rows:
    """Rows of one split: image references, captions, extra columns, printable sources and cached pixels.

    An image reference is a path, or a row number that `fetch` turns into bytes or a path.
    """

    images: list[Any] = field(default_factory=list)
    captions: list[Any] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    fetch: Callable[[Any], str | bytes] | None = None
    pixels: list[np.ndarray] | None = None  # (R, R, 3) uint8 per row, when images are cached

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int, config: DataConfig) -> Image.Image:
        """Row i's image in RGB; raises BadImage."""
        image = self.images[i] if self.fetch is None else self.fetch(self.images[i])
        return load_image(image, max_pixels=config.max_image_pixels, min_side=config.min_image_side)

    def append(self, image: Any, caption: Any, source: str, extra: dict[str, Any]) -> None:
        for name in extra.keys() - self.columns.keys():
            self.columns[name] = [None] * len(self.images)
        for name, values in self.columns.items():
            values.append(extra.get(name))
        self.images.append(image)
        self.captions.append(caption)
        self.sources.append(source)

    def take(self, indices: Sequence[int]) -> _Rows:
        def pick(values: list[Any]) -> list[Any]:
            return [values[i] for i in indices]

        columns = {name: pick(values) for name, values in self.columns.items()}
        pixels = None if self.pixels is None else pick(self.pixels)
        return _Rows(pick(self.images), pick(self.captions), columns, pick(self.sources), self.fetch, pixels)


@dataclass(frozen=True)
class _ArrowImage:
    """Reads the image cell of a row of a `datasets.Dataset` whose image column is `Image(decode=False)`."""

    dataset: Any
    column: str

    def __call__(self, row: int) -> str | bytes:
        cell = self.dataset[row][self.column] or {}
        image = cell["bytes"] if cell.get("bytes") is not None else cell.get("path")
        if image is None:
            raise BadImage(Reason.MISSING_IMAGE, f"row {row}")
        return image


def _read_metadata(directory: Path, config: DataConfig, report: SkipReport) -> _Rows:
    """Rows of `directory/metadata.jsonl`; lines that are not UTF-8 JSON objects are counted and skipped."""
    file_column = config.image_column if config.image_column not in (None, "image") else "file_name"
    rows = _Rows()
    with open(directory / METADATA_NAME, "rb") as lines:
        for raw in lines:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
            except UnicodeDecodeError:
                report.counts[Reason.NON_UTF8_LINE] += 1
                continue
            except (ValueError, RecursionError):
                record = None
            if not isinstance(record, dict):
                report.counts[Reason.INVALID_JSON_LINE] += 1
                continue
            name = record.pop(file_column, None)
            if not isinstance(name, str) or not name:
                report.counts[Reason.MISSING_IMAGE] += 1
                continue
            path = str(directory / name)
            rows.append(path, record.pop(config.caption_column, None), path, record)
    return rows


def _read_caption_file(path: Path, max_chars: int) -> str | None:
    """The start of a .txt caption (enough to tell it is too long), or None when there is none.

    Raises OSError or ValueError when it is not a regular UTF-8 text file.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file")
    with path.open(encoding="utf-8") as file:
        return file.read(max_chars + 1)


def _read_txt_captions(directory: Path, config: DataConfig, report: SkipReport) -> _Rows:
    """Rows of the images under `directory` with same-named .txt captions; a lone .txt is a missing image."""
    paths = sorted(directory.rglob("*"))
    images = [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {p.with_suffix("") for p in images}
    report.counts.update(Reason.MISSING_IMAGE for p in paths if p.suffix == ".txt" and p.with_suffix("") not in stems)
    rows = _Rows()
    for path in images:
        try:
            caption = _read_caption_file(path.with_suffix(".txt"), config.max_caption_chars)
        except (OSError, ValueError):
            report.counts[Reason.UNREADABLE_CAPTION] += 1
            continue
        rows.append(str(path), caption, str(path), {})
    return rows


def refuse_shard_folder(path: Path, flag: str) -> None:
    """A folder of webdataset shards (as img2dataset writes them) is read with --train_shards, not as a folder of
    images or of parquet files (which would give metadata without images)."""
    if path.is_dir() and not (path / METADATA_NAME).is_file() and any(path.glob("*.tar")):
        raise ValueError(
            f"{flag} {path} holds webdataset shards (.tar files, as img2dataset writes them): read them with "
            f"--train_shards {path}"
        )


def _read_folder(config: DataConfig, report: SkipReport) -> tuple[_Rows, _Rows | None]:
    """Train and (if the folder has one) validation rows of `config.train_data_dir`."""
    root = Path(config.train_data_dir)
    if not root.is_dir():
        raise ValueError(f"--train_data_dir {root} does not exist or is not a folder")
    refuse_shard_folder(root, "--train_data_dir")

    def read(directory: Path) -> _Rows:
        if (directory / METADATA_NAME).is_file():
            return _read_metadata(directory, config, report)
        return _read_txt_captions(directory, config, report)

    if (root / METADATA_NAME).is_file() or not (root / "train").is_dir():
        return read(root), None
    validation = next((root / name for name in VALIDATION_SPLITS if (root / name).is_dir()), None)
    return read(root / "train"), None if validation is None else read(validation)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def looks_like_a_path(name: str) -> bool:
    """Whether a name that is no existing file or folder can only have been meant as one: a Hub dataset name is
    `NAME` or `OWNER/NAME` with no file suffix, and its owner is not a local folder (`data/shapez` is a typo)."""
    parts = name.split("/")
    return (
        name.startswith((".", "/", "~"))
        or name.endswith("/")
        or len(parts) > 2
        or os.sep != "/"
        and os.sep in name
        or Path(name).suffix.lower() in (*DATASET_FILE_BUILDERS, ".txt", ".tar", *IMAGE_EXTENSIONS)
        or len(parts) == 2
        and Path(parts[0]).is_dir()
    )


def _load_hub_dataset(name: str, config_name: str | None, streaming: bool) -> Any:
    """`datasets.load_dataset(name)` for a name that is no local path; a name that cannot be found says so."""
    import datasets

    missing = f"{name} is neither an existing file or folder nor a dataset reachable on the Hub"
    if looks_like_a_path(name):
        raise ValueError(f"{missing} (it names no Hub dataset; is the path mistyped?)")
    try:
        return datasets.load_dataset(name, config_name, streaming=streaming)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, HFValidationError
        raise ValueError(f"{missing} ({_first_line(err)})") from None


def load_datasets(config: DataConfig, *, streaming: bool = False) -> dict[str, Any]:
    """The splits of `config.dataset_name` (a hub name, a local data file or folder, or a `save_to_disk` folder):
    `datasets.Dataset`s, or with `streaming` `datasets.IterableDataset`s."""
    import datasets  # here, not at the top: only --dataset_name needs it, and it is slow to import

    name = config.dataset_name
    path = Path(name)
    refuse_shard_folder(path, "--dataset_name")
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(name)
        if streaming:
            splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            return {split: table.to_iterable_dataset() for split, table in splits.items()}
    elif path.is_file():
        builder = DATASET_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"--dataset_name {name}: cannot read {path.suffix!r} files")
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a broken file is said once, below, not logged
        try:
            loaded = datasets.load_dataset(builder, data_files=name, streaming=streaming)
        except datasets.exceptions.DatasetGenerationError as err:  # the cause says what is wrong with the file
            raise ValueError(f"{name} cannot be read as {builder} data: {_first_line(err.__cause__ or err)}") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
    elif path.exists():
        loaded = datasets.load_dataset(name, config.dataset_config_name, streaming=streaming)
    else:
        loaded = _load_hub_dataset(name, config.dataset_config_name, streaming)
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        return {"train": loaded}
    return dict(loaded)


def _read_datasets(config: DataConfig) -> tuple[_Rows, _Rows | None]:
    """Train and (if the dataset has one) validation rows of `config.dataset_name`."""
    import datasets

    loaded = load_datasets(config)
    train, validation = split_names(loaded, config)
    image_column = config.image_column or "image"

    def read(split: str) -> _Rows:
        dataset = loaded[split]
        check_columns(dataset, config, split)
        images = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        extra = [
            name
            for name, feature in dataset.features.items()
            if name not in (image_column, config.caption_column)
            and isinstance(feature, (datasets.Value, datasets.ClassLabel))
        ]
        table = dataset.select_columns([config.caption_column, *extra]).to_dict()
        return _Rows(
            images=list(range(len(dataset))),
            captions=table.pop(config.caption_column),
            columns=table,
            sources=[f"{config.dataset_name}:{split}:{row}" for row in range(len(dataset))],
            fetch=_ArrowImage(images, image_column),
        )

    return read(train), None if validation is None else read(validation)


def split_names(loaded: dict[str, Any], config: DataConfig) -> tuple[str, str | None]:
    """The training split's name and the validation split's, if the dataset has one."""
    if "train" not in loaded and len(loaded) != 1:
        raise ValueError(f"--dataset_name {config.dataset_name}: no 'train' split among {list(loaded)}")
    train = "train" if "train" in loaded else next(iter(loaded))
    validation = next((name for name in VALIDATION_SPLITS if name in loaded and name != train), None)
    return train, validation


def check_columns(dataset: Any, config: DataConfig, split: str) -> None:
    """Refuse a dataset without the image or caption column, naming the flag and the columns it has."""
    columns = list(dataset.features) if dataset.features is not None else []
    for role, column in (("image", config.image_column or "image"), ("caption", config.caption_column)):
        if column not in columns:
            raise ValueError(
                f"--{role}_column {column!r} is not a column of {config.dataset_name} ({split}); columns: {columns}"
            )


# ---------------------------------------------------------------- checks, split and scan


def _exclude(rows: _Rows, specs: Sequence[str]) -> _Rows:
    """The rows whose metadata matches none of the `COLUMN=VALUE` specs."""
    drop = [False] * len(rows)
    for spec in specs:
        name, value = spec.split("=", 1)
        if name not in rows.columns:
            raise ValueError(f"--exclude {spec}: the data has no column {name!r}; columns: {sorted(rows.columns)}")
        drop = [d or (v is not None and str(v) == value) for d, v in zip(drop, rows.columns[name], strict=True)]
    return rows.take([i for i, d in enumerate(drop) if not d])


def _check_captions(rows: _Rows, report: SkipReport) -> _Rows:
    """Rows whose caption is a non-blank string (stripped); the others are counted and dropped."""
    keep, captions = [], []
    for i, caption in enumerate(rows.captions):
        if caption is None:
            report.counts[Reason.MISSING_CAPTION] += 1
        elif not isinstance(caption, str):
            report.counts[Reason.NON_STRING_CAPTION] += 1
        elif not caption.strip():
            report.counts[Reason.EMPTY_CAPTION] += 1
        else:
            keep.append(i)
            captions.append(caption.strip())
    rows = rows.take(keep)
    rows.captions = captions
    return rows


def _validation_size(count: int, fraction: float) -> int:
    """`fraction` of `count` rows, at least one when there are two or more, always leaving one to train on."""
    return min(count - 1, max(1, round(count * fraction))) if count >= 2 and fraction > 0 else 0


def _sample(rows: _Rows, count: int, rng: np.random.Generator) -> tuple[_Rows, _Rows]:
    """`count` random rows (kept in their order) and the others."""
    chosen = np.zeros(len(rows), dtype=bool)
    chosen[rng.permutation(len(rows))[:count]] = True
    return rows.take(np.flatnonzero(chosen).tolist()), rows.take(np.flatnonzero(~chosen).tolist())


def _scan_threads() -> int:
    """One scan thread per core this process may use, at most 8 (decoding releases the GIL)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def _threaded_map(function: Callable[[int], Any], count: int, *, progress: bool, desc: str) -> list[Any]:
    """[function(i) for i in range(count)] on a thread pool, in chunks, with a progress bar."""
    chunks = [range(start, min(start + _SCAN_CHUNK, count)) for start in range(0, count, _SCAN_CHUNK)]
    results: list[Any] = []
    executor = ThreadPoolExecutor(_scan_threads())
    try:
        with tqdm(total=count, desc=desc, unit="img", disable=not progress) as bar:
            for chunk in executor.map(lambda positions: [function(i) for i in positions], chunks):
                results += chunk
                bar.update(len(chunk))
    finally:
        executor.shutdown(cancel_futures=True)
    return results


def _scan(rows: _Rows, config: DataConfig, report: SkipReport, *, progress: bool, desc: str) -> _Rows:
    """The rows whose image decodes, with long captions cut (and resized pixels when caching)."""
    pixels: list[Any] | None = [None] * len(rows) if config.cache_images else None

    def check(i: int) -> str | None:
        try:
            image = rows.load(i, config)
        except BadImage as err:
            return err.reason
        if pixels is not None:
            pixels[i] = to_array(image, config.resolution)
        return None

    with warnings.catch_warnings():  # load_image checks the size itself
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        reasons = _threaded_map(check, len(rows), progress=progress, desc=desc)
    report.counts.update(reason for reason in reasons if reason is not None)
    rows.pixels = pixels
    rows = rows.take([i for i, reason in enumerate(reasons) if reason is None])
    limit = config.max_caption_chars
    report.counts.update(Reason.CAPTION_TRUNCATED for caption in rows.captions if len(caption) > limit)
    rows.captions = [caption[:limit] for caption in rows.captions]
    return rows


class ImageTextDataset(torch.utils.data.Dataset):
    """Checked image-caption rows: item i is {"pixel_values": (3, R, R) in [-1, 1], "text", "index"}."""

    def __init__(self, rows: _Rows, config: DataConfig) -> None:
        self._rows = rows
        self._config = config

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._rows.pixels is not None:
            pixels = self._rows.pixels[i]
        else:
            pixels = to_array(self._rows.load(i, self._config), self._config.resolution)
        return {"pixel_values": to_tensor(pixels), "text": self._rows.captions[i], "index": i}

    @property
    def captions(self) -> list[str]:
        return self._rows.captions

    def column(self, name: str) -> list[Any]:
        """Values of an extra metadata column (e.g. "color"), None where a row lacks it."""
        if name not in self._rows.columns:
            raise KeyError(f"no column {name!r}; extra columns: {sorted(self._rows.columns)}")
        return self._rows.columns[name]

    def source(self, i: int) -> str:
        """The image's path, or "dataset:split:row" for rows of a `datasets` dataset."""
        return self._rows.sources[i]

    def image_file(self, i: int) -> bytes:
        """The bytes of row i's image file as stored (not decoded, not resized)."""
        image = self._rows.images[i] if self._rows.fetch is None else self._rows.fetch(self._rows.images[i])
        return image if isinstance(image, bytes) else Path(image).read_bytes()

    def metadata(self, i: int) -> dict[str, Any]:
        """Row i's extra metadata columns that it has."""
        return {name: values[i] for name, values in self._rows.columns.items() if values[i] is not None}


@dataclass
class ImageTextSplits:
    """What `load_image_text` returns."""

    train: ImageTextDataset | StreamData  # a stream for shards and `datasets` streaming
    validation: ImageTextDataset
    report: SkipReport  # of the scan; a stream's training rows are counted as training reads them


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items into {"pixel_values": (B, 3, R, R), "text": [B], "index": (B,)}."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "text": [item["text"] for item in batch],
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
    }


def _check_cache_fits(rows: int, config: DataConfig) -> None:
    """Refuse --cache_images when the resized pixels would take more than half the memory available now."""
    if not config.cache_images:
        return
    import psutil

    needed = rows * config.resolution**2 * 3
    available = psutil.virtual_memory().available
    if needed > available / 2:
        raise ValueError(
            f"--cache_images would hold {needed / 2**30:.1f} GiB of pixels ({rows} rows at {config.resolution} px) "
            f"in each process, over half of the {available / 2**30:.1f} GiB available; leave it out, or write the "
            "data as shards (vqclip data shards) and train with --train_shards"
        )


def load_mapped(config: DataConfig, *, seed: int = 0, progress: bool = True) -> ImageTextSplits:
    """Read, check and split a folder or a `datasets` dataset, every image decoded once by a scan.

    The validation split is the dataset's own, else a `seed`ed random `validation_fraction` of the rows
    (sized from the rows with a caption, drawn from those whose image decodes). `max_train_samples` keeps a
    `seed`ed subset of the training rows, chosen before the scan so that a large dataset is not read in full.
    With `progress` (pass `accelerator.is_main_process`), shows the scan's progress and prints one summary
    line to stderr; the counts are always in `.report`.
    """
    config.check_source()
    report = SkipReport()
    train, validation = _read_folder(config, report) if config.train_data_dir else _read_datasets(config)
    rng = np.random.default_rng(seed)
    total = len(train) + (len(validation) if validation is not None else 0)
    if config.exclude:
        train = _exclude(train, config.exclude)
        validation = None if validation is None else _exclude(validation, config.exclude)
    excluded = total - len(train) - (len(validation) if validation is not None else 0)
    train = _check_captions(train, report)
    held_out = _validation_size(len(train), config.validation_fraction) if validation is None else 0
    if config.max_train_samples is not None and len(train) > config.max_train_samples + held_out:
        train, _ = _sample(train, config.max_train_samples + held_out, rng)
    _check_cache_fits(len(train) + (len(validation) if validation is not None else 0), config)
    train = _scan(train, config, report, progress=progress, desc="checking images")
    if validation is None:
        validation, train = _sample(train, min(held_out, max(len(train) - 1, 0)), rng)
    else:
        validation = _check_captions(validation, report)
        validation = _scan(validation, config, report, progress=progress, desc="checking validation images")
    report.kept = len(train) + len(validation)
    if len(train) == 0:
        expected = (
            f"images listed in metadata.jsonl with a {config.caption_column!r} caption, or images with "
            "same-named .txt captions"
            if config.train_data_dir
            else f"an image column and a {config.caption_column!r} caption column"
        )
        source = config.train_data_dir or config.dataset_name
        raise ValueError(f"no usable rows in {source}: {report}. Expected {expected}.")
    if progress:
        left_out = f"; left out {excluded} rows by --exclude" if config.exclude else ""
        counts = f"{len(train)} train + {len(validation)} validation rows{left_out}"
        print(f"vqclip data: {counts}; {report}", file=sys.stderr)
    return ImageTextSplits(ImageTextDataset(train, config), ImageTextDataset(validation, config), report)
