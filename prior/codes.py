"""Image codes, encoded once: a dataset run through a trained tokenizer and kept as Arrow data.

A codes folder is a `datasets.DatasetDict` written by `save_to_disk` with `train` and `validation` splits of
`codes` (the flattened code grid, int16 or int32), `text` (the caption) and `source` (the image's path or
"dataset:split:row"), plus `codes_info.json`: the identity of what made it, i.e. the tokenizer folder's
`save_id`, and the data settings and split seed that decide which rows are read and at which resolution.
Loading it for another tokenizer or other data is refused with an error naming the difference. The folder is
written under a temporary name and renamed into place when complete.

    encode_dataset("runs/vqvae", DataConfig(train_data_dir="data/shapes"), "runs/prior/codes")
    train, validation = load_codes("runs/prior/codes", "runs/vqvae")
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from common.data import DataConfig, ImageTextDataset, collate, load_image_text
from common.hub import load_config, read_json
from vqvae.model import VQVAE, VQVAEConfig

INFO_NAME = "codes_info.json"
CODES_FORMAT = 1
RUNTIME_FIELDS = ("dataloader_num_workers", "cache_images")  # data settings that do not change the rows


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


class CodeDataset(torch.utils.data.Dataset):
    """One split of a codes folder, in memory: item i is {"codes": LongTensor(N), "text": str, "index": i}."""

    def __init__(self, table: datasets.Dataset, num_codes: int) -> None:
        column = table.data.column("codes").combine_chunks().flatten().to_numpy()
        self.codes = torch.from_numpy(column.reshape(len(table), num_codes).copy())
        self.captions: list[str] = list(table["text"])
        self.sources: list[str] = list(table["source"])

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"codes": self.codes[i].long(), "text": self.captions[i], "index": i}


def _encode_split(
    model: VQVAE, split: ImageTextDataset, batch_size: int, workers: int, progress: bool, desc: str
) -> datasets.Dataset:
    """The codes, captions and sources of one split, encoded `batch_size` images at a time."""
    num_codes = model.config.grid_size**2
    dtype = "int16" if model.config.codebook_size <= 2**15 else "int32"
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    device = next(model.parameters()).device
    parts = [torch.empty(0, num_codes, dtype=torch.long)]
    with tqdm(total=len(split), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            parts.append(model.encode(batch["pixel_values"].to(device)).flatten(1).cpu())
            bar.update(len(batch["text"]))
    features = datasets.Features(
        {
            "codes": datasets.List(datasets.Value(dtype), length=num_codes),
            "text": datasets.Value("string"),
            "source": datasets.Value("string"),
        }
    )
    columns = {
        "codes": torch.cat(parts).numpy().astype(dtype),
        "text": split.captions,
        "source": [split.source(i) for i in range(len(split))],
    }
    return datasets.Dataset.from_dict(columns, features=features)


def _replace_folder(out_dir: Path, tmp: Path) -> None:
    """Move the complete folder `tmp` to `out_dir`, replacing an empty folder or an older codes folder there."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / INFO_NAME).is_file():
        raise CodesCacheError(f"{out_dir} is not a codes folder (no {INFO_NAME}); refusing to replace it")
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    old = tmp.with_name(f"{tmp.name}-old")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def encode_dataset(
    vqvae: str | os.PathLike,
    data: DataConfig,
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    progress: bool = True,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Path:
    """Encode both splits of `data` (read by `load_image_text` with `seed`) with the tokenizer saved in the folder
    `vqvae`, and write them with their identity to the codes folder `out_dir`, which is returned. The validation
    split must not be empty."""
    identity = {"format": CODES_FORMAT, "vqvae": tokenizer_identity(vqvae), "data": data_identity(data, seed)}
    model = VQVAE.from_pretrained(vqvae, device)
    if data.resolution != model.config.resolution:
        raise CodesCacheError(
            f"the tokenizer in {vqvae} takes {model.config.resolution} px images, the data is read at "
            f"{data.resolution} px (--resolution)"
        )
    splits = load_image_text(data, seed=seed, progress=progress)
    if not len(splits.validation):
        raise CodesCacheError("the data has no validation rows; set --validation_fraction above 0")
    tables = {
        name: _encode_split(model, split, batch_size, data.dataloader_num_workers, progress, f"encoding {name}")
        for name, split in (("train", splits.train), ("validation", splits.validation))
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        datasets.DatasetDict(tables).save_to_disk(str(tmp))
        info = {**identity, "rows": {name: len(table) for name, table in tables.items()}, "report": str(splits.report)}
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _replace_folder(out_dir, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


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
    if not (directory / INFO_NAME).is_file():
        raise CodesCacheError(f"{directory} is not a codes folder (no {INFO_NAME}); make one with encode_dataset")
    info = read_json(directory / INFO_NAME)
    if (
        not isinstance(info, dict)
        or info.get("format") != CODES_FORMAT
        or not all(isinstance(info.get(key), dict) for key in ("vqvae", "data"))
    ):
        raise CodesCacheError(f"{directory / INFO_NAME}: not a codes folder of format {CODES_FORMAT}; encode it again")
    _check_identity(directory, info, vqvae, None if data is None else data_identity(data, seed))
    tables = datasets.load_from_disk(str(directory))
    num_codes = info["vqvae"]["grid_size"] ** 2
    return CodeDataset(tables["train"], num_codes), CodeDataset(tables["validation"], num_codes)


def cached_codes(
    vqvae: str | os.PathLike,
    data: DataConfig,
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[CodeDataset, CodeDataset]:
    """The codes in `directory`, checked to come from this tokenizer and data, after encoding them there if
    the folder does not exist yet."""
    directory = Path(directory)
    if not (directory / INFO_NAME).is_file():
        if progress:
            print(f"vqclip codes: encoding the data into {directory}", file=sys.stderr)
        encode_dataset(vqvae, data, directory, batch_size, progress, seed=seed, device=device)
    train, validation = load_codes(directory, vqvae, data, seed=seed)
    if progress:
        print(f"vqclip codes: {len(train)} train + {len(validation)} validation rows from {directory}", file=sys.stderr)
    return train, validation
