"""The image embedding index, its search, the search pipeline and the `vqclip index` / `vqclip search` commands."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from app import cli
from app import search as search_cli
from common.cli import ArgumentParser
from common.config import Config
from common.data import DataConfig, Reason, load_image_text
from common.hub import ModelLoadError, PretrainedModel
from contrastive.index import EMBEDDINGS_NAME, INDEX_NAME, ImageIndex, IndexLoadError, SearchHit, model_identity
from pipelines.image_search import PLACEHOLDER_GREY, ImageSearchPipeline

COLORS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (235, 225, 30),
    "white": (245, 245, 245),
    "purple": (130, 30, 190),
}


@dataclass
class StubConfig(Config):
    resolution: int = 16
    embed_dim: int = 8
    seed: int = 0


class StubModel(PretrainedModel):
    """A deterministic stand-in for the contrastive model.

    An image's embedding is its mean color (0-1) plus a small fixed random projection of its pixels; a text's
    is the color it names, so "red" finds red images. Texts naming no color give NaN (to test that check).
    """

    config_class = StubConfig

    def __init__(self, config: StubConfig) -> None:
        super().__init__(config)
        generator = torch.Generator().manual_seed(config.seed)
        pixels = 3 * config.resolution**2
        self.register_buffer("projection", torch.randn(pixels, config.embed_dim - 3, generator=generator) * 0.01)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        mean_color = (pixels.mean(dim=(2, 3)) + 1) / 2
        return F.normalize(torch.cat([mean_color, pixels.flatten(1) @ self.projection], dim=1), dim=1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            named = [name for name in COLORS if name in text]
            rgb = torch.tensor(COLORS[named[0]], dtype=torch.float32) / 255 if named else torch.full((3,), torch.nan)
            rows.append(F.normalize(torch.cat([rgb, torch.zeros(self.config.embed_dim - 3)]), dim=0))
        return torch.stack(rows)


def _noisy(name: str, seed: int, size: int = 24) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(np.array(COLORS[name]) + noise, 0, 255).astype(np.uint8))


def _folder(root: Path, names: list[str], captions: bool = False) -> Path:
    """Images `<name>.png` of those colors, with a metadata.jsonl ("a <name> square") when `captions`."""
    root.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        _noisy(name, seed).save(root / f"{name}.png")
    if captions:
        lines = [json.dumps({"file_name": f"{name}.png", "text": f"a {name} square"}) for name in names]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture()
def model() -> StubModel:
    return StubModel(StubConfig())


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = _folder(tmp_path / "images", ["red", "green", "blue", "yellow", "white"])
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def _random_index(n: int, dim: int, seed: int = 0, fp16: bool = False, chunk_size: int = 65536) -> ImageIndex:
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    info = {"model_class": "Random", "config": {"embed_dim": dim}, "save_id": None, "dir": None}
    embeddings = embeddings.half() if fp16 else embeddings
    return ImageIndex(embeddings, [f"row:{i}" for i in range(n)], [""] * n, info, chunk_size=chunk_size)


# ---------------------------------------------------------------- building, saving, searching


def test_build_save_load_search(model, images, tmp_path):
    index = ImageIndex.empty(model)
    report = index.add(images, batch_size=2, progress=False)
    assert report.kept == 5 and report.skipped == {Reason.UNREADABLE_IMAGE: 1}
    hits = index.search("red", k=3)
    assert Path(hits[0].source).name == "red.png" and hits[0].caption == ""
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert index.search(Path(images / "blue.png"), k=1)[0].source.endswith("blue.png")
    assert index.search(_noisy("yellow", 99), k=1)[0].source.endswith("yellow.png")

    index.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted([INDEX_NAME, EMBEDDINGS_NAME])
    loaded = ImageIndex.load(tmp_path / "index", model)
    assert loaded.embeddings.dtype == torch.float32 and torch.equal(loaded.embeddings, index.embeddings)
    assert loaded.search("red", k=3) == hits


def test_fp16_round_trip_is_close(model, images, tmp_path):
    full = ImageIndex.build(model, images, progress=False)
    half = ImageIndex.build(model, images, fp16=True, progress=False)
    half.save(tmp_path / "half")
    loaded = ImageIndex.load(tmp_path / "half", model)
    assert loaded.embeddings.dtype == torch.float16
    for query in ("green", "white"):
        exact, approximate = full.search(query, k=5), loaded.search(query, k=5)
        assert [hit.source for hit in exact] == [hit.source for hit in approximate]
        assert np.allclose([hit.score for hit in exact], [hit.score for hit in approximate], atol=2e-3)


def test_dataset_captions_and_adding_images(model, tmp_path):
    folder = _folder(tmp_path / "captioned", ["red", "green", "blue"], captions=True)
    index = ImageIndex.build(model, folder, progress=False)
    assert sorted(index.captions) == ["a blue square", "a green square", "a red square"]
    index.save(tmp_path / "index")

    extra = _folder(tmp_path / "extra", ["purple"])
    index = ImageIndex.load(tmp_path / "index", model)
    report = index.add([extra / "purple.png", extra / "missing.png"], progress=False)
    assert report.kept == 1 and report.skipped == {Reason.MISSING_IMAGE: 1}
    index.save(tmp_path / "index")
    found = ImageIndex.load(tmp_path / "index", model).search("purple", k=1)[0]
    assert found == SearchHit(str((extra / "purple.png").resolve()), "", found.score)


def test_an_image_text_dataset_is_indexed_with_its_sources(model, tmp_path):
    folder = _folder(tmp_path / "captioned", ["red", "blue"], captions=True)
    dataset = load_image_text(DataConfig(train_data_dir=str(folder), resolution=16, validation_fraction=0)).train
    index = ImageIndex.build(model, dataset, progress=False)
    assert index.sources == [dataset.source(0), dataset.source(1)] and index.captions == dataset.captions
    wrong_size = load_image_text(DataConfig(train_data_dir=str(folder), resolution=8, validation_fraction=0)).train
    with pytest.raises(ValueError, match="8 px images but the model takes 16 px"):
        index.add(wrong_size, progress=False)


def test_k_larger_than_the_index_returns_everything(model, images):
    index = ImageIndex.build(model, images, progress=False)
    assert len(index.search("blue", k=100)) == len(index) == 5
    assert ImageIndex.empty(model).search("blue", k=3) == []


@pytest.mark.parametrize(
    ("query", "k", "message"),
    [
        ("red", 0, "k must be"),
        ("red", -2, "k must be"),
        ("", 3, "query is empty"),
        ("   \n", 3, "query is empty"),
        ("something colorless", 3, "NaN"),
        (Path("no/such/image.png"), 3, "missing image"),
        (42, 3, "a query is a str"),
    ],
)
def test_bad_queries_raise_value_error(model, images, query, k, message):
    index = ImageIndex.build(model, images, progress=False)
    with pytest.raises(ValueError, match=message):
        index.search(query, k)


def test_chunked_search_equals_brute_force(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # the chunked path even where faiss is installed
    index = _random_index(1000, 16, chunk_size=7)
    assert index.backend == "torch"
    query = F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(1)), dim=0)
    expected = (index.embeddings @ query).argsort(descending=True)[:13].tolist()
    hits = index.search_embedding(query, k=13)
    assert [int(hit.source.removeprefix("row:")) for hit in hits] == expected
    half = _random_index(1000, 16, fp16=True, chunk_size=64)
    assert [hit.source for hit in half.search_embedding(query, 5)] == [
        f"row:{i}" for i in (half.embeddings.float() @ query).argsort(descending=True)[:5].tolist()
    ]


def test_faiss_backend_is_used_when_importable(monkeypatch):
    class FlatIP:
        def __init__(self, dim: int) -> None:
            self.vectors = np.empty((0, dim), np.float32)

        def add(self, vectors: np.ndarray) -> None:
            self.vectors = np.concatenate([self.vectors, vectors])

        def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            scores = queries @ self.vectors.T
            rows = np.argsort(-scores, axis=1)[:, :k]
            return np.take_along_axis(scores, rows, axis=1), rows

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=FlatIP))
    index = _random_index(300, 8)
    query = index.embeddings[17]
    assert index.search_embedding(query, k=4)[0].source == "row:17"
    assert index.backend == "faiss"
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert _random_index(300, 8).search_embedding(query, 4) == index.search_embedding(query, 4)


# ---------------------------------------------------------------- strict loading


def _edit_index(directory: Path, **changes) -> None:
    meta = json.loads((directory / INDEX_NAME).read_text())
    meta.update(changes)
    (directory / INDEX_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"count": 9}, "9 rows"),
        ({"dim": 4}, "embeddings are F32 of shape"),
        ({"dim": 10**9}, "absurd size"),
        ({"dtype": "int8"}, "dtype 'int8'"),
        ({"dtype": "float16"}, "embeddings are F32"),
        ({"sources": "a,b"}, "field 'sources' has the wrong type"),
        ({"captions": [1, 2, 3, 4, 5]}, "captions must all be strings"),
        ({"extra": 1}, "unknown field 'extra'"),
        ({"model": {"model_class": "StubModel"}}, "missing field 'config'"),
        ({"save_id": "0" * 32}, "different saves"),
        ({"format": 99}, "format 99"),
    ],
)
def test_a_corrupted_index_is_refused(model, images, tmp_path, changes, message):
    ImageIndex.build(model, images, progress=False).save(tmp_path / "index")
    _edit_index(tmp_path / "index", **changes)
    with pytest.raises(IndexLoadError, match=message):
        ImageIndex.load(tmp_path / "index")


def test_broken_files_are_refused(model, images, tmp_path):
    directory = ImageIndex.build(model, images, progress=False).save(tmp_path / "index")
    (directory / EMBEDDINGS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(IndexLoadError, match="not a valid safetensors file"):
        ImageIndex.load(directory)
    (directory / EMBEDDINGS_NAME).unlink()
    with pytest.raises(IndexLoadError, match="does not exist"):
        ImageIndex.load(directory)
    (directory / INDEX_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ImageIndex.load(directory)
    with pytest.raises(IndexLoadError, match="is not an index folder"):
        ImageIndex.load(tmp_path / "nowhere")


def test_nan_embeddings_are_refused(tmp_path):
    index = _random_index(10, 4)
    index.embeddings[3, 1] = float("nan")
    index.save(tmp_path / "index")
    with pytest.raises(IndexLoadError, match="NaN"):
        ImageIndex.load(tmp_path / "index")


def test_an_index_refuses_another_model(model, images, tmp_path):
    model.save_pretrained(tmp_path / "model")
    ImageIndex.build(model, images, model_dir=tmp_path / "model", progress=False).save(tmp_path / "index")
    assert ImageIndex.load(tmp_path / "index").model_info == model_identity(model, tmp_path / "model")
    with pytest.raises(IndexLoadError, match="holds 8-d embeddings but the model makes 12-d ones"):
        ImageIndex.load(tmp_path / "index", StubModel(StubConfig(embed_dim=12)))
    with pytest.raises(IndexLoadError, match="seed=0, this model has seed=1"):
        ImageIndex.load(tmp_path / "index", StubModel(StubConfig(seed=1)))
    model.save_pretrained(tmp_path / "model")  # a new save of the same config: another save_id
    with pytest.raises(IndexLoadError, match="another save of the model"):
        ImageIndex.load(tmp_path / "index", model, model_dir=tmp_path / "model")


# ---------------------------------------------------------------- the pipeline and the commands


def _run_cli(monkeypatch, argv: list[str]) -> int:
    """`app.cli.main(argv)` with the search commands registered and the stub as the contrastive model."""
    parser = ArgumentParser(prog="vqclip")
    search_cli.add_cli(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(cli, "build_parser", lambda argv: parser)
    monkeypatch.setitem(sys.modules, "contrastive.model", types.SimpleNamespace(ContrastiveModel=StubModel))
    try:
        return cli.main(argv)
    except SystemExit as exit_:  # a flag refused as it is parsed
        return exit_.code


def test_cli_end_to_end(model, tmp_path, monkeypatch, capsys):
    model.save_pretrained(tmp_path / "model")
    captioned = _folder(tmp_path / "captioned", ["red", "green", "blue"], captions=True)
    plain = _folder(tmp_path / "plain", ["yellow", "white"])
    index, grid = str(tmp_path / "index"), str(tmp_path / "results.png")
    build = ["index", "build", "--model", str(tmp_path / "model"), "--images", str(captioned), "--out", index]
    assert _run_cli(monkeypatch, [*build, "--fp16", "--batch-size", "2"]) == 0
    assert _run_cli(monkeypatch, ["index", "add", "--index", index, "--images", str(plain)]) == 0
    assert "the index holds 5" in capsys.readouterr().out

    assert _run_cli(monkeypatch, ["search", "--index", index, "a red thing", "-k", "2", "--grid", grid]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "source", "caption"]
    assert lines[1].split()[0] == "1" and lines[1].endswith("red.png  a red square") and len(lines) == 4
    assert Image.open(grid).size[0] > 128

    query = str(plain / "white.png")
    assert (
        _run_cli(monkeypatch, ["search", "--index", index, "--model", str(tmp_path / "model"), "--image", query]) == 0
    )
    assert capsys.readouterr().out.splitlines()[1].split()[2] == str(Path(query).resolve())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--index", "{tmp}/missing", "red"], "is not an index folder"),
        (["search", "--index", "{tmp}/index"], "give either a text query"),
        (["search", "--index", "{tmp}/index", "red", "-k", "0"], "argument -k: must be an integer at least 1"),
        (["search", "--index", "{tmp}/unrecorded", "red"], "does not record its model folder"),
        (["index", "build", "--model", "{tmp}/model", "--images", "{tmp}/empty", "--out", "{tmp}/o"], "no usable"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(model, images, tmp_path, monkeypatch, capsys, argv, message):
    model.save_pretrained(tmp_path / "model")
    ImageIndex.build(model, images, model_dir=tmp_path / "model", progress=False).save(tmp_path / "index")
    ImageIndex.build(model, images, progress=False).save(tmp_path / "unrecorded")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "broken.png").write_bytes(b"")
    assert _run_cli(monkeypatch, [arg.format(tmp=tmp_path) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # only progress bars come before the error's one line
    assert err.splitlines()[-1].startswith(f"vqclip {argv[0]}: error: ") and message in err.splitlines()[-1]


def test_contact_sheet_labels_and_placeholders(model, images):
    pipe = ImageSearchPipeline(model, ImageIndex.build(model, images, progress=False))
    hits = [*pipe("green", k=2), SearchHit("some/dataset:train:3", "from the hub", 0.5)]
    sheet = pipe.contact_sheet(hits, cell=32, columns=3)
    assert sheet.getpixel((4 + 2 * 36 + 16, 4 + 16)) == PLACEHOLDER_GREY
    assert sheet.getpixel((4 + 16, 4 + 16))[1] > 150  # the green image
    with pytest.raises(ValueError, match="no search results"):
        pipe.contact_sheet([])


def test_with_the_real_contrastive_model(images, tmp_path):
    contrastive_model = pytest.importorskip("contrastive.model")
    torch.manual_seed(0)
    model = contrastive_model.ContrastiveModel(contrastive_model.PRESETS["tiny"]).eval()
    model.save_pretrained(tmp_path / "model")
    index = ImageIndex.build(model, images, model_dir=tmp_path / "model", fp16=True, batch_size=2, progress=False)
    index.save(tmp_path / "index")
    pipe = ImageSearchPipeline.from_pretrained(None, tmp_path / "index")
    hits = pipe("a red ball on grass", k=3)
    assert hits == index.search("a red ball on grass", k=3) and len(hits) == 3
    assert pipe(Path(images / "blue.png"), k=1)[0].source.endswith("blue.png")


def test_embeddings_that_are_not_normalized_are_refused(tmp_path):
    index = _random_index(10, 4)
    index.embeddings[6] *= 3
    index.save(tmp_path / "index")
    with pytest.raises(IndexLoadError, match=r"embedding 6 has length 3, not 1 \(not normalized\)"):
        ImageIndex.load(tmp_path / "index")
    _random_index(10, 4, fp16=True).save(tmp_path / "half")  # float16 rounding is within the tolerance
    assert len(ImageIndex.load(tmp_path / "half")) == 10


@pytest.mark.parametrize("name", [INDEX_NAME, EMBEDDINGS_NAME])
def test_index_files_symlinked_out_of_the_folder_are_refused(tmp_path, name):
    directory = _random_index(3, 4).save(tmp_path / "index")
    (directory / name).rename(tmp_path / name)
    (directory / name).symlink_to(tmp_path / name)
    with pytest.raises(ModelLoadError, match=rf"{name} leads outside"):
        ImageIndex.load(directory)


def test_two_index_adds_at_once_are_refused(model, images, tmp_path, monkeypatch, capsys):
    import subprocess

    model.save_pretrained(tmp_path / "model")
    ImageIndex.build(model, images, model_dir=tmp_path / "model", progress=False).save(tmp_path / "index")
    hold = "import sys, time; from common import locks; locks.acquire(sys.argv[1]); print('held', flush=True); "
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "time.sleep(60)", str(tmp_path / "index")], cwd=root, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        assert _run_cli(monkeypatch, ["index", "add", "--index", str(tmp_path / "index"), "--images", str(images)]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vqclip index: error: ") and f"is in use by process {holder.pid}" in err
    assert len(ImageIndex.load(tmp_path / "index")) == 5  # untouched; once the holder is gone, an add works:
    assert _run_cli(monkeypatch, ["index", "add", "--index", str(tmp_path / "index"), "--images", str(images)]) == 0
    assert len(ImageIndex.load(tmp_path / "index")) == 10
