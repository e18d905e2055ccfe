"""Streamed data: shards split by process and worker, every sample once per epoch, exact resume, bad samples."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
import threading
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from bad_data import encode, noise, png_claiming
from helpers import folder_digest
from launch import ROOT

from app.cli import main
from common.data import DataConfig, Reason, collate, load_image, load_image_text, to_array, to_tensor
from common.data.shards import (
    ShardSample,
    expand_shards,
    read_shard,
    shard_sizes,
    stats_path,
    write_shard,
    write_shards,
)
from common.data.streams import StreamData, stable_id
from contrastive.evaluate import caption_key
from corpora.shapes import build
from prior.codes import cached_codes, encode_dataset, load_codes
from vqvae.model import PRESETS as VQVAE_PRESETS
from vqvae.model import VQVAE

RES = 16


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory) -> Path:
    """240 training and 60 validation shapes-world pictures, as shards of 64 samples."""
    root = tmp_path_factory.mktemp("shapes")
    build(root / "folder", 300, resolution=RES, seed=0, val_fraction=0.2, workers=1, progress=False)
    splits = load_image_text(DataConfig(train_data_dir=str(root / "folder"), resolution=RES), progress=False)
    write_shards(splits.train, root / "train", 64, seed=0, workers=2, progress=False)
    write_shards(splits.validation, root / "validation", 64, seed=0, workers=2, progress=False)
    return root


def shard_config(root: Path, kind: str = "shards", **fields) -> DataConfig:
    """The shapes world as shards, or (kind "datasets") its imagefolder read with `datasets` streaming."""
    if kind == "datasets":
        return DataConfig(
            dataset_name=str(root / "folder"), streaming=True, resolution=RES, shuffle_buffer=50, **fields
        )
    return DataConfig(
        train_shards=str(root / "train"),
        validation_shards=str(root / "validation"),
        resolution=RES,
        shuffle_buffer=50,
        **fields,
    )


def all_ids(root: Path, kind: str = "shards") -> list[int]:
    """The stable ids of every training sample."""
    if kind == "datasets":
        return [stable_id(str(path)) for path in sorted((root / "folder" / "train").glob("*.png"))]
    ids = []
    for shard in sorted((root / "train").glob("*.tar")):
        ids += [stable_id(f"{shard.name}/{sample['__key__']}") for sample in read_shard(str(shard))]
    return ids


def take(data: StreamData, steps: int, rank: int = 0, world_size: int = 1, position=None, batch_key=None):
    """`steps` batches as (ids, epochs, pixel sums), and the position after them."""
    loader = data.loader(
        batch_size=8, rank=rank, world_size=world_size, transform=None, collate=collate, batch_key=batch_key,
        position=position,
    )  # fmt: skip
    seen = []
    for _ in range(steps):
        batch = next(loader)
        seen.append((batch["index"].tolist(), list(data.last_epochs), batch["pixel_values"].sum().item()))
    return seen, data.position


def test_spec_expansion(tmp_path):
    assert expand_shards("d/{000..002}.tar::e/x.tar") == ["d/000.tar", "d/001.tar", "d/002.tar", "e/x.tar"]
    with pytest.raises(ValueError, match="at least one"):
        expand_shards("  ")


def test_writing_is_deterministic_and_in_img2dataset_layout(shapes_shards, tmp_path):
    splits = load_image_text(DataConfig(train_data_dir=str(shapes_shards / "folder"), resolution=RES), progress=False)
    write_shards(splits.train, tmp_path / "again", 64, seed=0, workers=1, progress=False)
    assert folder_digest(tmp_path / "again") == folder_digest(shapes_shards / "train")
    names = sorted(p.name for p in (shapes_shards / "train").iterdir())
    assert names[:3] == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert shard_sizes(sorted(str(p) for p in (shapes_shards / "train").glob("*.tar"))) == [64, 64, 64, 48]
    with tarfile.open(shapes_shards / "train" / "00000.tar") as tar:
        assert tar.getnames()[:3] == ["000000000.png", "000000000.txt", "000000000.json"]


KINDS = [("shards", 0), ("shards", 2), ("datasets", 0), ("datasets", 2)]


@pytest.mark.parametrize(("kind", "workers"), KINDS)
def test_two_processes_see_every_sample_once_per_epoch(shapes_shards, kind, workers):
    expected = Counter(all_ids(shapes_shards, kind))
    seen: Counter = Counter()
    epochs = Counter()
    for rank in (0, 1):
        data = load_image_text(shard_config(shapes_shards, kind, dataloader_num_workers=workers), progress=False).train
        batches, _ = take(data, 20, rank=rank, world_size=2)  # 160 rows per process: past epoch 0 everywhere
        for ids, batch_epochs, _ in batches:
            seen.update(i for i, e in zip(ids, batch_epochs, strict=True) if e == 0)
            epochs.update(batch_epochs)
    assert seen == expected  # each of the 240 samples exactly once in epoch 0, across both processes
    assert epochs[1] == 2 * 160 - 240  # the rest are epoch 1's: nothing dropped at the epoch's end


def coarse_key(text: str) -> int:
    """A batch key with 12 values: batches of 8 often find theirs taken, so rows wait."""
    return zlib.crc32(text.encode()) % 12


@pytest.mark.parametrize(("kind", "workers"), KINDS)
def test_resume_continues_with_the_same_batches(shapes_shards, kind, workers):
    config = shard_config(shapes_shards, kind, dataloader_num_workers=workers)
    uninterrupted, _ = take(load_image_text(config, progress=False).train, 45, batch_key=coarse_key)
    first, position = take(load_image_text(config, progress=False).train, 17, batch_key=coarse_key)
    position = json.loads(json.dumps(position))  # as a checkpoint stores it
    rest, _ = take(load_image_text(config, progress=False).train, 28, position=position, batch_key=coarse_key)
    assert first + rest == uninterrupted
    assert any(p["waiting"] for p in position["streams"].values())  # rows were waiting at the cut


def test_too_few_distinct_keys_for_a_batch_is_refused(shapes_shards):
    data = load_image_text(shard_config(shapes_shards), progress=False).train
    with pytest.raises(ValueError, match="distinct"):
        take(data, 1, batch_key=lambda text: len(text) % 3)


def test_batches_never_repeat_a_caption(shapes_shards):
    batches, _ = take(load_image_text(shard_config(shapes_shards), progress=False).train, 30, batch_key=caption_key)
    captions = {i: c for i, c in zip(all_ids(shapes_shards), captions_of(shapes_shards), strict=True)}
    for ids, _, _ in batches:
        keys = [caption_key(captions[i]) for i in ids]
        assert len(set(keys)) == len(keys)


def captions_of(root: Path) -> list[str]:
    found = []
    for shard in sorted((root / "train").glob("*.tar")):
        found += [sample["txt"].decode() for sample in read_shard(str(shard))]
    return found


def test_a_resume_with_other_workers_is_refused(shapes_shards):
    _, position = take(load_image_text(shard_config(shapes_shards), progress=False).train, 2)
    other = load_image_text(shard_config(shapes_shards, dataloader_num_workers=2), progress=False).train
    with pytest.raises(ValueError, match="workers"):
        take(other, 1, position=position)


def _raw_shard(path: Path, members: list[tuple[str, bytes]], size: int) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stats_path(path).write_text(json.dumps({"successes": size}))


def test_bad_samples_are_skipped_and_counted(tmp_path, capsys):
    png = encode(noise(16, 16), "PNG")
    jpeg = encode(noise(32, 32), "JPEG")
    good = [ShardSample(encode(noise(16, 16, seed=i), "PNG"), "png", f"picture {i}", {}) for i in range(6)]
    write_shard(tmp_path / "00000.tar", 0, good)
    cases = [  # (members, reason)
        ([("a.png", b"not an image"), ("a.txt", b"text")], Reason.UNREADABLE_IMAGE),
        ([("b.jpg", jpeg[: len(jpeg) // 2]), ("b.txt", b"half")], Reason.TRUNCATED_IMAGE),
        ([("c.png", b""), ("c.txt", b"empty")], Reason.EMPTY_IMAGE),
        ([("d.png", png)], Reason.MISSING_CAPTION),
        ([("e.png", png), ("e.txt", b"  \n")], Reason.EMPTY_CAPTION),
        ([("f.txt", b"no image")], Reason.MISSING_IMAGE),
        ([("g.png", png), ("g.txt", "café".encode("latin-1"))], Reason.UNREADABLE_CAPTION),
        ([("h.png", png_claiming(100_000, 100_000)), ("h.txt", b"bomb")], Reason.IMAGE_TOO_LARGE),
        ([("i.png", encode(noise(1, 1), "PNG")), ("i.txt", b"tiny")], Reason.IMAGE_TOO_SMALL),
    ]
    _raw_shard(tmp_path / "00001.tar", [m for members, _ in cases for m in members], len(cases))
    write_shard(tmp_path / "00002.tar", 2, good)  # then cut short mid-way through its data
    data = (tmp_path / "00002.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[: len(data) // 2])
    write_shard(tmp_path / "00003.tar", 3, good[:4])
    (tmp_path / "00003.tar").write_bytes(b"not a tar file at all" * 100)  # its stats still say 4 samples
    config = DataConfig(
        train_shards=f"{tmp_path}/{{00000..00004}}.tar", validation_shards=str(tmp_path / "00000.tar"), resolution=RES
    )  # 00004.tar does not exist
    train = load_image_text(config, progress=True).train
    ids, _ = take(train, 4)
    counts = train.report().skipped
    for _, reason in cases:
        assert counts[reason] >= 1, reason
    assert counts[Reason.UNREADABLE_SHARD] >= 4 and counts[Reason.TRUNCATED_SHARD] >= 1
    err = capsys.readouterr().err
    assert err.count("00004.tar") == 1 and err.count("00003.tar") == 1  # a broken shard is named once


def test_codes_from_shards_are_encoded_by_every_process_and_new_shards_alone_later(shapes_shards, tmp_path, capsys):
    torch.manual_seed(0)
    VQVAE(VQVAE_PRESETS["tiny"]).save_pretrained(tmp_path / "vqvae")
    train_dir = tmp_path / "train"
    shutil.copytree(shapes_shards / "train", train_dir)
    (train_dir / "00003.tar").rename(tmp_path / "later.tar")  # added after the first encoding
    data = DataConfig(train_shards=str(train_dir), validation_shards=str(shapes_shards / "validation"), resolution=RES)
    barrier = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:  # two "processes", each encoding its share of the parts
        runs = [
            pool.submit(encode_dataset, tmp_path / "vqvae", data, tmp_path / "codes", 16, False, rank=rank,
                        world_size=2, barrier=barrier.wait, replace=False)
            for rank in (0, 1)
        ]  # fmt: skip
        [run.result() for run in runs]
    train, validation = load_codes(tmp_path / "codes", tmp_path / "vqvae", data)
    assert (len(train), len(validation)) == (192, 60)
    tokenizer = VQVAE.from_pretrained(tmp_path / "vqvae")
    pixels = {}
    for shard in sorted(train_dir.glob("*.tar")):
        for sample in read_shard(str(shard)):
            image = load_image(sample["png"])
            pixels[f"{shard.name}/{sample['__key__']}"] = to_tensor(to_array(image, RES))
    expected = tokenizer.encode(torch.stack([pixels[source] for source in train.sources])).flatten(1)
    assert torch.equal(torch.stack([train[i]["codes"] for i in range(len(train))]), expected)

    (tmp_path / "later.tar").rename(train_dir / "00003.tar")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "codes" / "parts").iterdir()}
    capsys.readouterr()
    train, _ = cached_codes(tmp_path / "vqvae", data, tmp_path / "codes", batch_size=16)
    assert len(train) == 240 and "(1 of 5 parts)" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "codes" / "parts").iterdir()}
    assert {name: after[name] for name in before} == before and len(after) == len(before) + 1


@pytest.mark.parametrize("flag", ["train_data_dir", "dataset_name"])
def test_a_shard_folder_given_as_a_folder_or_dataset_says_to_use_train_shards(shapes_shards, flag):
    with pytest.raises(ValueError, match="--train_shards"):
        load_image_text(DataConfig(**{flag: str(shapes_shards / "train")}, resolution=RES), progress=False)


def test_the_data_commands_write_shards_that_train_reads(shapes_shards, tmp_path, capsys):
    args = ["--num-images", "60", "--resolution", str(RES), "--workers", "1", "--samples-per-shard", "25"]
    assert main(["data", "shapes", "--out", str(tmp_path / "shapes"), "--format", "shards", *args]) == 0
    assert sorted(p.name for p in (tmp_path / "shapes" / "train").glob("*.tar")) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    assert main(["data", "shards", "--from", str(shapes_shards / "folder"), "--out", str(tmp_path / "copy")]) == 0
    assert f"--train_shards {tmp_path / 'copy' / 'train'}" in capsys.readouterr().out
    config = DataConfig(
        train_shards=str(tmp_path / "copy" / "train"),
        validation_shards=str(tmp_path / "copy" / "validation"),
        resolution=RES,
    )
    assert len(all_ids(tmp_path / "copy")) == 240 and len(load_image_text(config, progress=False).validation) == 60


@pytest.mark.parametrize(("name", "machines"), [("multi_gpu", 1), ("multi_node", 2)])
def test_the_launch_configs_are_valid_accelerate_configs(name, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    assert (config.distributed_type.value, config.num_machines, config.num_processes) == (
        "MULTI_GPU",
        machines,
        8 * machines,
    )


def test_caching_more_pixels_than_memory_holds_is_refused(shapes_shards, monkeypatch):
    import psutil

    class Small:
        available = 300 * RES * RES * 3  # twice 240 + 60 rows would not fit in half of it

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small)
    config = DataConfig(train_data_dir=str(shapes_shards / "folder"), resolution=RES, cache_images=True)
    with pytest.raises(ValueError, match="--cache_images would hold"):
        load_image_text(config, progress=False)
    assert len(load_image_text(dataclasses.replace(config, cache_images=False), progress=False).train) == 240
