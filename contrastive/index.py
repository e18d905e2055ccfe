"""A searchable index of image embeddings: build it from images, save it, load it, search it by text or image.

An index folder holds two files, written atomically and carrying the same `save_id`:

- `embeddings.safetensors`: one (N, D) tensor `embeddings` (float32, or float16 with `fp16=True`) of the
  L2-normalized image embeddings the contrastive model made;
- `index.json`: `sources` (image path, or "dataset:split:row" for rows of a `datasets` dataset), `captions`
  ("" where an image has none), `count`, `dim`, `dtype` and `model`, the identity of the embedding model
  (class, config, `save_id` and folder), so that searching with another model is refused with a clear error.

Loading is strict (every field is checked, sizes must agree, embeddings must be finite) and never unpickles.
A search scores the rows `chunk_size` at a time keeping a running top-k, so it needs O(chunk_size + k) memory
beyond the embeddings; when `faiss` is importable, a flat inner-product faiss index is used instead.

    index = ImageIndex.build(model, "data/shapes", model_dir="outputs/contrastive")
    index.save("outputs/index")
    hits = ImageIndex.load("outputs/index", model).search("a blue ball on grass", k=8)
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from common.data import (
    IMAGE_EXTENSIONS,
    METADATA_NAME,
    BadImage,
    DataConfig,
    SkipReport,
    image_pixels,
    load_image_text,
)
from common.hub import CONFIG_NAME, ModelLoadError, atomic_write_files, inside, read_json, save_state_dict

INDEX_NAME = "index.json"
EMBEDDINGS_NAME = "embeddings.safetensors"
INDEX_FORMAT = 1
CHUNK_SIZE = 65536
MAX_INDEX_BYTES = 2 << 30
MAX_DIM = 65536
NORM_TOLERANCE = 1e-2  # how far from 1 a stored embedding's length may be (float16 rounds it by about 1e-3)
DTYPES = {"float32": (torch.float32, "F32"), "float16": (torch.float16, "F16")}
MODEL_FIELDS = {"model_class": str, "config": dict, "save_id": (str, type(None)), "dir": (str, type(None))}


class IndexLoadError(ModelLoadError):
    """An index folder cannot be loaded, or does not belong to the model it is used with."""


@dataclass(frozen=True)
class SearchHit:
    """One search result: where the image came from, its caption ("" when none) and its cosine similarity."""

    source: str
    caption: str
    score: float


def model_identity(model: Any, model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the index records about its embedding model: class, config, and the save_id and folder if saved."""
    info = {
        "model_class": type(model).__name__,
        "config": json.loads(json.dumps(vars(model.config))),
        "save_id": None,
        "dir": None,
    }
    if model_dir is not None:
        directory = Path(model_dir).resolve()
        saved = read_json(directory / CONFIG_NAME)
        info["save_id"] = saved.get("save_id") if isinstance(saved, dict) else None
        info["dir"] = str(directory)
    return info


def _import_faiss() -> Any:
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _has_captions(folder: Path) -> bool:
    return any(p.name == METADATA_NAME or p.suffix == ".txt" for p in folder.rglob("*"))


def _read_with_data_layer(config: DataConfig, report: SkipReport, progress: bool) -> list[Any]:
    """Both splits of what the data layer reads, with its skip counts added to `report`."""
    splits = load_image_text(config, progress=progress)
    report.counts.update(splits.report.counts)
    return [split for split in (splits.train, splits.validation) if len(split)]


def _open_images(
    images: Any, resolution: int, *, caption_column: str = "text", progress: bool = True
) -> tuple[list[Any], SkipReport]:
    """What `ImageIndex.add` encodes (ImageTextDatasets and lists of image files) and the rows already skipped.

    Image files (by extension) are gathered into one list; a folder without captions gives the list of its
    images; anything else that is not a captioned folder is a dataset name, data file or `save_to_disk` folder.
    """
    report = SkipReport()
    if hasattr(images, "source") and hasattr(images, "captions"):
        return [images], report
    specs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    settings = {"resolution": resolution, "caption_column": caption_column, "validation_fraction": 0.0}
    files: list[Path] = []
    collections: list[Any] = []
    for spec in specs:
        path = Path(spec)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(path.resolve())
            continue
        if path.is_dir() and _has_captions(path):
            config = DataConfig(train_data_dir=str(path.resolve()), **settings)
            collections += _read_with_data_layer(config, report, progress)
        elif path.is_dir() and (found := _image_files(path)):
            collections.append([p.resolve() for p in found])
        else:
            collections += _read_with_data_layer(DataConfig(dataset_name=str(spec), **settings), report, progress)
    return ([files] if files else []) + collections, report


def _item_reader(collection: Any, resolution: int) -> Callable[[int], tuple[torch.Tensor, str, str]]:
    """A function giving item i of a collection as (pixels, source, caption); raises BadImage."""
    if isinstance(collection, list):

        def read_file(i: int) -> tuple[torch.Tensor, str, str]:
            return image_pixels(collection[i], resolution), str(collection[i]), ""

        return read_file

    def read_row(i: int) -> tuple[torch.Tensor, str, str]:
        pixels = collection[i]["pixel_values"]
        if pixels.shape[-1] != resolution:
            raise ValueError(
                f"the dataset gives {pixels.shape[-1]} px images but the model takes {resolution} px: "
                f"read it with DataConfig(resolution={resolution})"
            )
        return pixels, collection.source(i), collection.captions[i]

    return read_row


class ImageIndex:
    """L2-normalized image embeddings with their sources and captions, searchable by text or image.

    `embeddings` is (N, D) float32 or float16; `model_info` is `model_identity(...)` of the model that made
    them. Build one with `ImageIndex.build` or `ImageIndex.empty` + `add`, or read one with `ImageIndex.load`.
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        sources: Sequence[str],
        captions: Sequence[str],
        model_info: dict[str, Any],
        *,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if embeddings.ndim != 2 or embeddings.dtype not in (torch.float32, torch.float16):
            raise ValueError(
                f"embeddings must be a 2-d float32 or float16 tensor, not {embeddings.dtype} {tuple(embeddings.shape)}"
            )
        if not len(sources) == len(captions) == len(embeddings):
            raise ValueError(
                f"{len(embeddings)} embeddings, {len(sources)} sources and {len(captions)} captions do not agree"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self._parts = [embeddings.detach().cpu().contiguous()]
        self.sources = list(sources)
        self.captions = list(captions)
        self.model_info = model_info
        self.chunk_size = chunk_size
        self.model: Any = None
        self.directory: Path | None = None
        self._faiss = _import_faiss()
        self._faiss_index: Any = None

    # ---------------------------------------------------------------- building

    @classmethod
    def empty(cls, model: Any, *, model_dir: str | os.PathLike | None = None, fp16: bool = False) -> ImageIndex:
        """An index without images for `model` (loaded from `model_dir`, if given, which is recorded)."""
        dtype = torch.float16 if fp16 else torch.float32
        info = model_identity(model, model_dir)
        index = cls(torch.empty(0, model.config.embed_dim, dtype=dtype), [], [], info)
        index.model = model
        return index

    @classmethod
    def build(
        cls,
        model: Any,
        images: Any,
        *,
        model_dir: str | os.PathLike | None = None,
        fp16: bool = False,
        batch_size: int = 64,
        caption_column: str = "text",
        progress: bool = True,
    ) -> ImageIndex:
        """An index of `images` (anything `add` takes) made with `model`."""
        index = cls.empty(model, model_dir=model_dir, fp16=fp16)
        index.add(images, batch_size=batch_size, caption_column=caption_column, progress=progress)
        return index

    def add(
        self, images: Any, *, batch_size: int = 64, caption_column: str = "text", progress: bool = True
    ) -> SkipReport:
        """Encode and append images; unreadable ones are skipped and counted. Returns the counts (`kept` = added).

        `images` is an `ImageTextDataset`, or one or a list of: folders (read through the data layer with their
        captions when they hold metadata.jsonl or .txt captions, else all their images, uncaptioned), image
        files, and dataset names or data files for the data layer.
        """
        model = self._require_model()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        resolution = model.config.resolution
        collections, report = _open_images(images, resolution, caption_column=caption_column, progress=progress)
        total = sum(len(collection) for collection in collections)
        with tqdm(total=total, desc="indexing images", unit="img", disable=not progress) as bar:
            for collection in collections:
                read = _item_reader(collection, resolution)
                for start in range(0, len(collection), batch_size):
                    items = []
                    for i in range(start, min(start + batch_size, len(collection))):
                        try:
                            items.append(read(i))
                        except BadImage as err:
                            report.counts[err.reason] += 1
                    if items:
                        pixels, sources, captions = zip(*items, strict=True)
                        self._append(self._encode_images(torch.stack(pixels), sources), sources, captions)
                        report.kept += len(items)
                    bar.update(min(batch_size, len(collection) - start))
        return report

    def _append(self, embeddings: torch.Tensor, sources: Sequence[str], captions: Sequence[str]) -> None:
        self._parts.append(embeddings.to(self.dtype))
        self.sources += sources
        self.captions += captions
        self._faiss_index = None

    # ---------------------------------------------------------------- the model

    def _require_model(self) -> Any:
        if self.model is None:
            raise ValueError("this index has no model: load it with one (ImageIndex.load(dir, model)) first")
        return self.model

    def set_model(self, model: Any, model_dir: str | os.PathLike | None = None) -> None:
        """Search and add with `model`; refuses a model other than the one that made the embeddings."""
        found = model_identity(model, model_dir)
        expected = self.model_info
        where = f"index {self.directory}" if self.directory else "the index"
        rebuild = "rebuild the index with this model (vqclip index build)"
        if model.config.embed_dim != self.dim:
            raise IndexLoadError(
                f"{where} holds {self.dim}-d embeddings but the model makes {model.config.embed_dim}-d ones; {rebuild}"
            )
        if found["model_class"] != expected["model_class"]:
            raise IndexLoadError(f"{where} was made by a {expected['model_class']}, not a {found['model_class']}")
        for key in sorted(expected["config"].keys() | found["config"].keys()):
            old, new = expected["config"].get(key), found["config"].get(key)
            if old != new:
                raise IndexLoadError(
                    f"{where} was made by a model with {key}={old!r}, this model has {key}={new!r}; {rebuild}"
                )
        if None not in (expected["save_id"], found["save_id"]) and expected["save_id"] != found["save_id"]:
            raise IndexLoadError(
                f"{where} was made by another save of the model (save_id {expected['save_id']}, "
                f"{found['dir']} has {found['save_id']}); {rebuild}"
            )
        self.model = model

    @torch.inference_mode()
    def _encode_images(self, pixels: torch.Tensor, sources: Sequence[str]) -> torch.Tensor:
        embeddings = self.model.encode_image(pixels.to(getattr(self.model, "device", "cpu"))).float().cpu()
        if embeddings.shape != (len(pixels), self.dim):
            raise ValueError(
                f"the model gave embeddings of shape {tuple(embeddings.shape)}, expected ({len(pixels)}, {self.dim})"
            )
        bad = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"the model gave a NaN or infinite embedding for {sources[bad[0]]}")
        return embeddings

    @torch.inference_mode()
    def embed_query(self, query: str | Image.Image | os.PathLike) -> torch.Tensor:
        """(D,) float32 embedding of a text (a str) or an image (a PIL image or a `pathlib.Path`)."""
        model = self._require_model()
        if isinstance(query, str):
            if not query.strip():
                raise ValueError("the query is empty: give some text to search for")
            embedding = model.encode_text([query.strip()]).float().cpu()[0]
        elif isinstance(query, (Image.Image, os.PathLike)):
            pixels = image_pixels(query, model.config.resolution)[None]
            embedding = self._encode_images(pixels, [str(query)])[0]
        else:
            raise ValueError(f"a query is a str (text), a PIL image or a pathlib.Path, not {type(query).__name__}")
        return embedding

    # ---------------------------------------------------------------- searching

    @property
    def embeddings(self) -> torch.Tensor:
        """(N, D) embeddings, in the index's dtype."""
        if len(self._parts) > 1:
            self._parts = [torch.cat(self._parts)]
        return self._parts[0]

    @property
    def dim(self) -> int:
        return self._parts[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._parts[0].dtype

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def backend(self) -> str:
        """How searches score the rows: "faiss" when faiss is installed, else "torch" (in chunks)."""
        return "torch" if self._faiss is None else "faiss"

    def search(self, query: str | Image.Image | os.PathLike, k: int = 8) -> list[SearchHit]:
        """The `k` rows most similar to a text (str) or an image (PIL image or `pathlib.Path`), best first."""
        return self.search_embedding(self.embed_query(query), k)

    def search_embedding(self, query: torch.Tensor, k: int = 8) -> list[SearchHit]:
        """The `k` rows of highest inner product with a (D,) embedding, best first (all rows if k > N)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a whole number of at least 1, got {k!r}")
        query = query.detach().float().cpu().flatten()
        if query.numel() != self.dim:
            raise ValueError(f"the query embedding has {query.numel()} values, the index {self.dim}")
        if not torch.isfinite(query).all():
            raise ValueError("the query embedding has NaN or infinite values; the model cannot embed this query")
        k = min(k, len(self))
        if k == 0:
            return []
        rows = self._candidates(query, k).tolist()
        scores = (self.embeddings[rows].float() @ query).tolist()  # exact scores, also for float16 indexes
        ranked = sorted(zip(scores, rows, strict=True), key=lambda pair: (-pair[0], pair[1]))
        return [SearchHit(self.sources[row], self.captions[row], score) for score, row in ranked]

    def _candidates(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """Rows of the k highest scores: by faiss when installed, else chunk by chunk keeping a running top-k."""
        embeddings = self.embeddings
        if self._faiss is not None:
            if self._faiss_index is None:
                self._faiss_index = self._faiss.IndexFlatIP(self.dim)
                self._faiss_index.add(embeddings.float().contiguous().numpy())
            _, rows = self._faiss_index.search(query.numpy()[None], k)
            return torch.from_numpy(rows[0]).long()
        query = query.to(embeddings.dtype)
        best_scores = torch.empty(0, dtype=embeddings.dtype)
        best_rows = torch.empty(0, dtype=torch.long)
        for start in range(0, len(embeddings), self.chunk_size):
            chunk = embeddings[start : start + self.chunk_size]
            scores = torch.cat([best_scores, chunk @ query])
            rows = torch.cat([best_rows, torch.arange(start, start + len(chunk))])
            top = scores.topk(min(k, len(scores)))
            best_scores, best_rows = top.values, rows[top.indices]
        return best_rows

    # ---------------------------------------------------------------- saving and loading

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `embeddings.safetensors` and `index.json` atomically into `directory`."""
        save_id = uuid.uuid4().hex
        dtype_name = next(name for name, (dtype, _) in DTYPES.items() if dtype == self.dtype)
        meta = {
            "format": INDEX_FORMAT,
            "save_id": save_id,
            "count": len(self),
            "dim": self.dim,
            "dtype": dtype_name,
            "model": self.model_info,
            "sources": self.sources,
            "captions": self.captions,
        }

        def write(tmp: Path) -> None:
            save_state_dict({"embeddings": self.embeddings}, tmp / EMBEDDINGS_NAME, save_id)
            (tmp / INDEX_NAME).write_text(json.dumps(meta) + "\n", encoding="utf-8")

        self.directory = atomic_write_files(directory, write, last=INDEX_NAME)
        return self.directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        model: Any = None,
        *,
        model_dir: str | os.PathLike | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> ImageIndex:
        """Read an index folder strictly; with `model`, check that it made the embeddings (see `set_model`)."""
        directory = Path(directory)
        if not (directory / INDEX_NAME).is_file():
            raise IndexLoadError(
                f"{directory} is not an index folder (no {INDEX_NAME}); make one with vqclip index build"
            )
        for name in (INDEX_NAME, EMBEDDINGS_NAME):
            inside(directory, directory / name)  # a symlink may not lead out of the folder
        meta = _check_meta(read_json(directory / INDEX_NAME, MAX_INDEX_BYTES), directory / INDEX_NAME)
        embeddings = _read_embeddings(directory / EMBEDDINGS_NAME, meta)
        index = cls(embeddings, meta["sources"], meta["captions"], meta["model"], chunk_size=chunk_size)
        index.directory = directory
        if model is not None:
            index.set_model(model, model_dir)
        return index


def _check_fields(data: Any, kinds: dict[str, Any], where: str) -> None:
    """Raise IndexLoadError unless `data` is an object with exactly these fields, of these types."""
    if not isinstance(data, dict):
        raise IndexLoadError(f"{where}: expected a JSON object")
    odd = sorted(data.keys() ^ kinds.keys())
    if odd:
        raise IndexLoadError(f"{where}: {'unknown' if odd[0] in data else 'missing'} field {odd[0]!r}")
    for name, kind in kinds.items():
        if not isinstance(data[name], kind) or (isinstance(data[name], bool) and kind is int):
            raise IndexLoadError(f"{where}: field {name!r} has the wrong type ({type(data[name]).__name__})")


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """`index.json`'s content, checked: fields, types, sizes and agreement between them."""
    kinds = {"format": int, "save_id": str, "count": int, "dim": int, "dtype": str, "model": dict}
    _check_fields(meta, {**kinds, "sources": list, "captions": list}, str(path))
    _check_fields(meta["model"], MODEL_FIELDS, f"{path}: model")
    if meta["format"] != INDEX_FORMAT:
        raise IndexLoadError(f"{path}: index format {meta['format']} is not {INDEX_FORMAT}; rebuild the index")
    if meta["dtype"] not in DTYPES:
        raise IndexLoadError(f"{path}: dtype {meta['dtype']!r} is not one of {sorted(DTYPES)}")
    if not 1 <= meta["dim"] <= MAX_DIM or meta["count"] < 0:
        raise IndexLoadError(f"{path}: absurd size: {meta['count']} rows of dimension {meta['dim']}")
    for name in ("sources", "captions"):
        values = meta[name]
        if len(values) != meta["count"]:
            raise IndexLoadError(f"{path}: {len(values)} {name} for {meta['count']} rows")
        if not all(isinstance(value, str) for value in values):
            raise IndexLoadError(f"{path}: {name} must all be strings")
    return meta


def _read_embeddings(path: Path, meta: dict[str, Any]) -> torch.Tensor:
    """The embeddings tensor, after checking its name, dtype, shape, save_id and values against `meta`."""
    if not path.is_file():
        raise IndexLoadError(f"{path} does not exist")
    expected_shape = [meta["count"], meta["dim"]]
    expected_dtype = DTYPES[meta["dtype"]][1]
    try:
        with safe_open(path, framework="pt") as handle:
            if list(handle.keys()) != ["embeddings"]:
                raise IndexLoadError(f"{path}: expected one tensor 'embeddings', found {list(handle.keys())}")
            if (handle.metadata() or {}).get("save_id") != meta["save_id"]:
                raise IndexLoadError(
                    f"{path} and {INDEX_NAME} come from different saves (was a save interrupted?); rebuild the index"
                )
            header = handle.get_slice("embeddings")
            if header.get_shape() != expected_shape or header.get_dtype() != expected_dtype:
                raise IndexLoadError(
                    f"{path}: embeddings are {header.get_dtype()} of shape {header.get_shape()}, {INDEX_NAME} says "
                    f"{expected_dtype} of shape {expected_shape}"
                )
            embeddings = handle.get_tensor("embeddings")
    except (SafetensorError, OSError) as err:
        raise IndexLoadError(f"{path} is not a valid safetensors file: {err}") from err
    for start in range(0, len(embeddings), CHUNK_SIZE):
        chunk = embeddings[start : start + CHUNK_SIZE].float()
        if not torch.isfinite(chunk).all():
            raise IndexLoadError(f"{path}: embeddings hold NaN or infinite values")
        norms = chunk.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=NORM_TOLERANCE):
            row = start + int((norms - 1).abs().argmax())
            raise IndexLoadError(f"{path}: embedding {row} has length {norms[row - start]:.4g}, not 1 (not normalized)")
    return embeddings
