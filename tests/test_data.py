"""The image-text data layer: every source format, the validation split, RGB conversion and bad rows."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from bad_data import LONG_CAPTION, build_bad_folder, encode, noise
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from common.data import (
    BadImage,
    DataConfig,
    Reason,
    add_data_args,
    collate,
    load_image,
    load_image_text,
    resize_center_crop,
    to_rgb,
)

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def solid(rgb: tuple[int, int, int], size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def color_rows(count: int) -> list[tuple[str, str]]:
    """(name, color) pairs cycling through COLORS."""
    names = list(COLORS)
    return [(f"{i:03d}.png", names[i % len(names)]) for i in range(count)]


def write_imagefolder(directory: Path, count: int, encoding: str = "utf-8") -> None:
    """`count` solid-color PNGs with metadata.jsonl rows {"file_name", "text", "color"}."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, color in color_rows(count):
        solid(COLORS[color]).save(directory / name)
        lines.append(json.dumps({"file_name": name, "text": f"a {color} square", "color": color}))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding=encoding)


def write_txt_folder(directory: Path, count: int) -> None:
    """`count` solid-color PNGs, each with a same-named .txt caption."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, color in color_rows(count):
        solid(COLORS[color]).save(directory / name)
        (directory / name).with_suffix(".txt").write_text(f"a {color} square\n", encoding="utf-8")


def names(dataset) -> list[str]:
    return [Path(dataset.source(i)).name for i in range(len(dataset))]


def expected_pixels(color: str) -> torch.Tensor:
    return torch.tensor(COLORS[color], dtype=torch.float32) / 127.5 - 1


def check_items(dataset, resolution: int) -> None:
    """Every item is a (3, R, R) float tensor in [-1, 1] whose color is the one its caption names."""
    for i in range(len(dataset)):
        item = dataset[i]
        pixels = item["pixel_values"]
        assert pixels.shape == (3, resolution, resolution) and pixels.dtype == torch.float32
        color = item["text"].split()[1]
        assert torch.allclose(pixels, expected_pixels(color)[:, None, None], atol=1e-6)
        assert item["index"] == i and item["text"] == dataset.captions[i]


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """Keep `datasets` off the network and out of the home cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("image_column", [None, "file_name", "image"])
def test_flat_imagefolder_loads_rows_columns_and_pixels(tmp_path, image_column):
    write_imagefolder(tmp_path, 10, encoding="utf-8-sig")  # a byte-order mark must not cost the first row
    config = DataConfig(train_data_dir=str(tmp_path), image_column=image_column, resolution=4)
    splits = load_image_text(config, progress=False)
    assert (len(splits.train), len(splits.validation)) == (9, 1)
    assert sorted(names(splits.train) + names(splits.validation)) == [name for name, _ in color_rows(10)]
    assert splits.report.kept == splits.report.total == 10 and not splits.report.counts
    for split in (splits.train, splits.validation):
        check_items(split, 4)
        assert split.captions == [f"a {color} square" for color in split.column("color")]
    with pytest.raises(KeyError, match="color"):
        splits.train.column("shape")


@pytest.mark.parametrize("validation_name", ["validation", "test"])
def test_imagefolder_with_splits_uses_its_own_validation(tmp_path, validation_name):
    write_imagefolder(tmp_path / "train", 6)
    write_imagefolder(tmp_path / validation_name, 3)
    splits = load_image_text(DataConfig(train_data_dir=str(tmp_path), validation_fraction=0.5), progress=False)
    assert (len(splits.train), len(splits.validation)) == (6, 3)
    assert all(Path(splits.validation.source(i)).parent.name == validation_name for i in range(3))
    check_items(splits.validation, 64)


def write_layout(write, root, layout: str, train: int, validation: int) -> None:
    """`train` rows flat in `root`, or `train` and `validation` rows in train/ and validation/."""
    if layout == "flat":
        write(root, train)
    else:
        write(root / "train", train)
        write(root / "validation", validation)


@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_txt_captions(tmp_path, layout):
    write_layout(write_txt_folder, tmp_path, layout, 8, 2)
    splits = load_image_text(DataConfig(train_data_dir=str(tmp_path), resolution=8), progress=False)
    assert (len(splits.train), len(splits.validation)) == ((7, 1) if layout == "flat" else (8, 2))
    check_items(splits.train, 8)
    assert splits.train.captions[0].endswith("square")  # the trailing newline is stripped


def test_datasets_parquet_file(tmp_path, offline_datasets):
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    images = [{"bytes": encode(solid(COLORS[c]), "PNG"), "path": None} for c in ("red", "green", "blue")]
    images += [
        {"bytes": b"not an image", "path": None},
        {"bytes": encode(solid((0, 0, 0)), "PNG"), "path": None},
    ]
    table = {
        "image": images,
        "caption": ["a red square", "a green square", "a blue square", "broken", None],
        "label": [0, 1, 2, 3, 4],
    }
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    config = DataConfig(dataset_name=str(path), caption_column="caption", validation_fraction=0, resolution=8)
    splits = load_image_text(config, progress=False)
    assert splits.train.captions == ["a red square", "a green square", "a blue square"]
    assert splits.train.column("label") == [0, 1, 2]
    assert splits.train.source(2) == f"{path}:train:2"
    assert splits.report.counts == {Reason.UNREADABLE_IMAGE: 1, Reason.MISSING_CAPTION: 1}
    check_items(splits.train, 8)
    with pytest.raises(ValueError, match="'text' is not a column"):
        load_image_text(DataConfig(dataset_name=str(path)), progress=False)


def test_datasets_saved_to_disk_with_path_column(tmp_path, offline_datasets):
    write_imagefolder(tmp_path / "images", 5)

    def split(rows):
        paths = [str(tmp_path / "images" / name) for name, _ in rows]
        return datasets.Dataset.from_dict({"path": paths, "text": [f"a {c} square" for _, c in rows]})

    rows = color_rows(5)
    datasets.DatasetDict(train=split(rows[:3]), validation=split(rows[3:])).save_to_disk(str(tmp_path / "saved"))
    config = DataConfig(dataset_name=str(tmp_path / "saved"), image_column="path", resolution=8)
    splits = load_image_text(config, progress=False)
    assert (len(splits.train), len(splits.validation)) == (3, 2)
    check_items(splits.validation, 8)


# ---------------------------------------------------------------- validation split and sampling


@pytest.mark.parametrize(("count", "fraction", "held_out"), [(1, 0.05, 0), (2, 0.05, 1), (40, 0.1, 4), (40, 0, 0)])
def test_random_validation_split_is_seeded_and_disjoint(tmp_path, count, fraction, held_out):
    write_imagefolder(tmp_path, count)
    config = DataConfig(train_data_dir=str(tmp_path), validation_fraction=fraction, resolution=8)

    def split(seed):
        splits = load_image_text(config, seed=seed, progress=False)
        return names(splits.train), names(splits.validation)

    train, validation = split(0)
    assert len(validation) == held_out
    assert sorted(train + validation) == [name for name, _ in color_rows(count)]
    assert split(0) == (train, validation)
    if held_out > 1:
        assert split(1)[1] != validation


def test_max_train_samples_is_a_seeded_subset(tmp_path):
    write_imagefolder(tmp_path, 40)
    config = DataConfig(train_data_dir=str(tmp_path), validation_fraction=0.1, max_train_samples=10)
    first = load_image_text(config, seed=3, progress=False)
    again = load_image_text(config, seed=3, progress=False)
    assert (len(first.train), len(first.validation)) == (10, 4)
    assert names(first.train) == names(again.train) and names(first.validation) == names(again.validation)
    assert not set(names(first.train)) & set(names(first.validation))


@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_exclude_leaves_out_rows_by_column_value(tmp_path, layout):
    write_layout(write_imagefolder, tmp_path, layout, 12, 12)
    everything = load_image_text(DataConfig(train_data_dir=str(tmp_path)), progress=False)
    colors = set(everything.train.column("color"))
    left_out = sorted(colors)[:2]
    config = DataConfig(train_data_dir=str(tmp_path), exclude=tuple(f"color={c}" for c in left_out))
    splits = load_image_text(config, progress=False)
    for split in (splits.train, splits.validation):
        assert len(split) and not set(split.column("color")) & set(left_out)
    kept = sum(c not in left_out for c in everything.train.column("color") + everything.validation.column("color"))
    assert len(splits.train) + len(splits.validation) == kept
    with pytest.raises(ValueError, match="no column 'style'"):
        load_image_text(DataConfig(train_data_dir=str(tmp_path), exclude=("style=x",)), progress=False)
    with pytest.raises(ValueError, match="COLUMN=VALUE"):
        DataConfig(exclude=("style",))


# ---------------------------------------------------------------- single images


def array_image(values: list[list[float]], dtype: str) -> Image.Image:
    return Image.fromarray(np.array(values, dtype=dtype))


def palette_image(index: int) -> Image.Image:
    image = Image.new("P", (2, 1), index)
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    ("image", "rgb"),
    [
        (Image.new("RGBA", (2, 2), (255, 0, 0, 0)), (255, 255, 255)),
        (Image.new("RGBA", (2, 2), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),
        (Image.new("LA", (2, 2), (50, 0)), (255, 255, 255)),
        (Image.new("LA", (2, 2), (50, 255)), (50, 50, 50)),
        (palette_image(0), (255, 255, 255)),
        (palette_image(1), (200, 100, 50)),
        (Image.new("CMYK", (2, 2), (255, 0, 0, 0)), (0, 255, 255)),
        (Image.new("CMYK", (2, 2), (0, 0, 0, 255)), (0, 0, 0)),
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (array_image([[65535, 0]], "uint16"), (255, 255, 255)),
        (array_image([[257, 65535]], "uint16"), (1, 1, 1)),
        (array_image([[65535, 0]], ">u2"), (255, 255, 255)),
        (array_image([[32768, 255]], "int32"), (128, 128, 128)),
        (array_image([[200, 0]], "int32"), (200, 200, 200)),
        (array_image([[0.5, 1.0]], "float32"), (128, 128, 128)),
        (array_image([[200.0, 10.0]], "float32"), (200, 200, 200)),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else None,
)
def test_to_rgb_gives_the_right_pixels(image, rgb):
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert np.abs(np.array(converted.getpixel((0, 0))) - rgb).max() <= 1


def test_to_rgb_honors_a_transparent_color_key():
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    image.putpixel((1, 0), (9, 9, 9))
    image.info["transparency"] = (1, 2, 3)
    converted = to_rgb(image)
    assert converted.getpixel((0, 0)) == (255, 255, 255) and converted.getpixel((1, 0)) == (9, 9, 9)


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 16))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display after rotating 90 degrees clockwise: the left edge goes to the top
    (tmp_path / "rotated.jpg").write_bytes(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (16, 32)
    red, blue = loaded.getpixel((8, 4)), loaded.getpixel((8, 28))
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]


@pytest.mark.parametrize("size", [(48, 16), (16, 48)])
def test_resize_center_crop_keeps_the_middle(size):
    image = Image.new("RGB", size, (255, 0, 0))
    third = min(size)
    middle = (third, 0, 2 * third, third) if size[0] > size[1] else (0, third, third, 2 * third)
    image.paste((0, 255, 0), middle)
    cropped = np.asarray(resize_center_crop(image, 8)).astype(int)
    assert cropped.shape == (8, 8, 3)
    assert np.abs(cropped[1:-1, 1:-1] - [0, 255, 0]).max() <= 2  # Lanczos lets the border bleed in a little
    assert cropped[..., 0].max() < 32 and cropped[..., 1].min() > 240


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 80), st.integers(1, 80), st.integers(1, 24))
def test_resize_center_crop_always_gives_a_square(width, height, resolution):
    assert resize_center_crop(Image.new("RGB", (width, height)), resolution).size == (resolution, resolution)


def test_load_image_reasons(tmp_path):
    good = encode(solid((1, 2, 3), 16), "PNG")
    noisy = encode(noise(16, 16), "PNG")
    cases = [
        (b"", {}, Reason.EMPTY_IMAGE),
        (b"junk", {}, Reason.UNREADABLE_IMAGE),
        (tmp_path / "absent.png", {}, Reason.MISSING_IMAGE),
        (tmp_path, {}, Reason.UNREADABLE_IMAGE),
        (good, {"max_pixels": 255}, Reason.IMAGE_TOO_LARGE),
        (good, {"min_side": 17}, Reason.IMAGE_TOO_SMALL),
        (noisy[: len(noisy) // 2], {}, Reason.TRUNCATED_IMAGE),
    ]
    for source, limits, reason in cases:
        with pytest.raises(BadImage) as caught:
            load_image(source, **limits)
        assert caught.value.reason == reason and isinstance(caught.value, ValueError)
    assert load_image(good, max_pixels=256, min_side=16).getpixel((0, 0)) == (1, 2, 3)


# ---------------------------------------------------------------- bad rows


@pytest.mark.parametrize("layout", ["metadata", "txt"])
def test_bad_folder_keeps_exactly_the_good_rows(tmp_path, capsys, layout):
    folder = build_bad_folder(tmp_path / "bad", layout)
    config = DataConfig(train_data_dir=str(folder.root), resolution=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_image_text(config, progress=True)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert set(names(splits.train) + names(splits.validation)) == folder.kept
    assert splits.report.counts == folder.expected
    assert (splits.report.kept, splits.report.total) == (len(folder.kept), folder.total)
    captions = splits.train.captions + splits.validation.captions
    assert LONG_CAPTION[: config.max_caption_chars] in captions
    summary = [line for line in capsys.readouterr().err.splitlines() if "vqclip data:" in line]
    assert len(summary) == 1 and f"kept {len(folder.kept)} of {folder.total} rows" in summary[0]

    cached = load_image_text(DataConfig(train_data_dir=str(folder.root), resolution=8, cache_images=True))
    for split, cached_split in ((splits.train, cached.train), (splits.validation, cached.validation)):
        assert names(split) == names(cached_split)
        for i in range(len(split)):
            pixels = split[i]["pixel_values"]
            assert pixels.shape == (3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1
            assert torch.equal(pixels, cached_split[i]["pixel_values"])


# ---------------------------------------------------------------- errors, flags, batches


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --train_data_dir"):
        load_image_text(DataConfig(), progress=False)
    with pytest.raises(ValueError, match="exactly one of --train_data_dir"):
        load_image_text(DataConfig(train_data_dir=str(tmp_path), dataset_name="x"), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_text(DataConfig(train_data_dir=str(tmp_path / "nowhere")), progress=False)
    with pytest.raises(ValueError, match="no usable rows .* kept 0 of 0 rows"):
        load_image_text(DataConfig(train_data_dir=str(tmp_path)), progress=False)
    write_imagefolder(tmp_path, 3)
    with pytest.raises(ValueError, match="no usable rows .* 3 missing caption.* 'caption' caption"):
        load_image_text(DataConfig(train_data_dir=str(tmp_path), caption_column="caption"), progress=False)
    with pytest.raises(ValueError, match="validation_fraction"):
        DataConfig(validation_fraction=1.0)


def test_flags_map_onto_the_config():
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    assert DataConfig.from_args(parser.parse_args([])) == DataConfig()
    flags = "--dataset_name d --dataset_config_name c --image_column img --caption_column cap --resolution 32"
    flags += " --validation_fraction 0.2 --max_train_samples 7 --dataloader_num_workers 2 --cache_images"
    flags += " --exclude style=a --exclude color=b"
    config = DataConfig.from_args(parser.parse_args(flags.split()))
    assert config == DataConfig(
        dataset_name="d",
        dataset_config_name="c",
        image_column="img",
        caption_column="cap",
        resolution=32,
        validation_fraction=0.2,
        max_train_samples=7,
        dataloader_num_workers=2,
        cache_images=True,
        exclude=("style=a", "color=b"),
    )


def test_dataloader_batches(tmp_path):
    write_imagefolder(tmp_path, 6)
    splits = load_image_text(DataConfig(train_data_dir=str(tmp_path), resolution=8), progress=False)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["text"] == splits.train.captions[:4]
    assert batch["index"].tolist() == [0, 1, 2, 3]
