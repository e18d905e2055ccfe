import json
import random

import numpy as np
import pytest

from corpora import shapes
from tests.helpers import folder_digest


def _rows(folder, split):
    lines = (folder / split / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_build_is_deterministic_whatever_the_worker_count(tmp_path):
    shapes.build(tmp_path / "a", 60, resolution=32, seed=3, workers=1, progress=False)
    shapes.build(tmp_path / "b", 60, resolution=32, seed=3, workers=2, progress=False)
    shapes.build(tmp_path / "c", 60, resolution=32, seed=4, workers=1, progress=False)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    assert folder_digest(tmp_path / "a") != folder_digest(tmp_path / "c")


def test_training_split_never_shows_a_heldout_composition(tmp_path):
    counts = shapes.build(tmp_path, 400, resolution=16, seed=0, val_fraction=0.25, workers=1, progress=False)
    assert counts == {"train": 300, "validation": 100}
    train, val = _rows(tmp_path, "train"), _rows(tmp_path, "validation")
    assert len(train) == 300 and len(val) == 100
    assert not any((r["color"], r["shape"], r["background"]) in shapes.HELDOUT for r in train)
    assert not any(r["heldout"] for r in train)
    heldout_val = [r for r in val if r["heldout"]]
    assert 30 <= len(heldout_val) <= 70  # half of validation, by default
    assert all((r["color"], r["shape"], r["background"]) in shapes.HELDOUT for r in heldout_val)
    assert all((tmp_path / "train" / r["file_name"]).is_file() for r in train)


def test_heldout_set_is_fixed_and_keeps_the_demo_prompt():
    assert len(shapes.HELDOUT) == 40
    assert ("blue", "ball", "grass") not in shapes.HELDOUT
    assert shapes._heldout_triples() == shapes.HELDOUT
    # every color, shape and background still appears in training
    seen = set(shapes.SEEN)
    for i, values in enumerate((shapes.COLORS, shapes.SHAPES, shapes.BACKGROUNDS)):
        assert {t[i] for t in seen} == set(values)


def test_captions_parse_back_to_their_scene():
    rng = np.random.default_rng(0)
    for i in range(500):
        scene = shapes.sample_scene(rng)
        text = shapes.caption(scene, random.Random(i))
        parsed = shapes.parse_prompt(text)
        assert {"shape"} <= parsed.keys(), text
        for attribute, value in parsed.items():
            assert getattr(scene, attribute) == value, (text, parsed, scene)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a blue ball on grass", {"color": "blue", "shape": "ball", "background": "grass"}),
        ("Blue sphere lying on green grass!", {"color": "blue", "shape": "ball", "background": "grass"}),
        ("a green star in the night sky", {"color": "green", "shape": "star", "background": "night sky"}),
        ("a tiny white cube on the left, against a blue sky", {
            "color": "white", "shape": "box", "size": "small", "position": "left", "background": "sky"
        }),
        ("a heart", {"shape": "heart"}),
        ("", {}),
    ],
)  # fmt: skip
def test_parse_prompt(prompt, expected):
    assert shapes.parse_prompt(prompt) == expected


def test_render_any_resolution_is_rgb():
    scene = shapes.Scene("red", "star", "brick wall", "large", "center")
    for resolution in (16, 64, 128):
        image = shapes.render(scene, resolution, np.random.default_rng(0))
        assert image.mode == "RGB" and image.size == (resolution, resolution)
    # the object is drawn where the scene says: the center is red, the corner is not
    pixels = np.asarray(shapes.render(scene, 64, np.random.default_rng(1)), dtype=float)
    assert pixels[32, 32, 0] > 150 and pixels[32, 32, 1] < 90
    assert np.abs(pixels[2, 2] - pixels[32, 32]).sum() > 60


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_images"):
        shapes.build("/nonexistent", 1)
    with pytest.raises(ValueError, match="resolution"):
        shapes.build("/nonexistent", 10, resolution=4)


def test_the_command_builds_the_same_world_at_128_px(tmp_path):
    from PIL import Image

    from app.cli import main

    for size in (64, 128):
        args = ["data", "shapes", "--out", str(tmp_path / str(size)), "--num-images", "6", "--resolution", str(size)]
        assert main([*args, "--workers", "1"]) == 0
        assert Image.open(tmp_path / str(size) / "train" / "00000000.png").size == (size, size)
    for split in ("train", "validation"):  # the same scenes and captions; only the pixels differ
        rows = [(tmp_path / str(size) / split / "metadata.jsonl").read_text() for size in (64, 128)]
        assert rows[0] == rows[1]


def test_render_with_box_gives_the_same_picture_and_the_objects_box():
    scene = shapes.Scene("red", "star", "sand", "small", "left")
    image, (left, top, right, bottom) = shapes.render_with_box(scene, 64, np.random.default_rng(3))
    assert image.tobytes() == shapes.render(scene, 64, np.random.default_rng(3)).tobytes()
    background = np.round(shapes._background("sand", 64, np.random.default_rng(3)) * 255).astype(np.uint8)
    changed = (np.asarray(image) != background).any(-1)
    inside = np.zeros_like(changed)
    inside[top:bottom, left:right] = True
    assert changed.any() and not (changed & ~inside).any()  # the object lies within its box
    edges = changed[top], changed[bottom - 1], changed[:, left], changed[:, right - 1]
    assert all(edge.any() for edge in edges)  # and touches each of its sides


def test_reuse_keeps_a_world_built_alike_and_refuses_one_built_otherwise(tmp_path, capsys):
    from app.cli import main

    args = ["data", "shapes", "--out", str(tmp_path / "w"), "--num-images", "6", "--workers", "1", "--reuse"]
    assert main(args) == 0
    first = (tmp_path / "w" / "train" / "metadata.jsonl").stat().st_mtime_ns
    assert main(args) == 0
    assert "already holds this shapes world (6 images, seed 0); kept" in capsys.readouterr().out
    assert (tmp_path / "w" / "train" / "metadata.jsonl").stat().st_mtime_ns == first  # not rebuilt
    assert main([*args[:5], "8", *args[6:]]) == 2
    err = capsys.readouterr().err
    assert "holds a shapes world built with other settings" in err and "(wanted {'train': 7" in err
    assert len(err.strip().splitlines()) == 1
    assert main([*args, "--seed", "1"]) == 2 and "seed 0 (wanted 1)" in capsys.readouterr().err
