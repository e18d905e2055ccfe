"""Text-to-image search: a contrastive model and an `ImageIndex` of a collection, used together.

pipe = ImageSearchPipeline.from_pretrained("outputs/contrastive", "outputs/index")
hits = pipe("a blue ball on grass", k=8)        # or pipe(Path("query.png")) to search by image
pipe.contact_sheet(hits).save("results.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from common.data import BadImage, load_image
from common.grid import make_grid
from contrastive.index import ImageIndex, SearchHit

PLACEHOLDER_GREY = (128, 128, 128)


class ImageSearchPipeline:
    """Search an index with the model that made it (checked when the pipeline is made)."""

    def __init__(self, model: Any, index: ImageIndex, model_dir: str | os.PathLike | None = None) -> None:
        index.set_model(model, model_dir)
        self.model = model
        self.index = index

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike | None, index_dir: str | os.PathLike, device: str = "cpu"
    ) -> ImageSearchPipeline:
        """Load an index folder and its model; `model_dir=None` takes the model folder the index records."""
        from contrastive.model import ContrastiveModel

        index = ImageIndex.load(index_dir)
        if model_dir is None:
            model_dir = index.model_info["dir"]
            if model_dir is None:
                raise ValueError(f"index {index_dir} does not record its model folder: give it (--model)")
            if not Path(model_dir).is_dir():
                raise FileNotFoundError(f"model folder {model_dir}, recorded in index {index_dir}, does not exist")
        return cls(ContrastiveModel.from_pretrained(model_dir, device=device), index, model_dir)

    def __call__(self, query: str | Image.Image | os.PathLike, k: int = 8) -> list[SearchHit]:
        """The `k` best matches of a text (str) or an image (PIL image or `pathlib.Path`), best first."""
        return self.index.search(query, k)

    def contact_sheet(self, hits: Sequence[SearchHit], cell: int = 128, columns: int | None = None) -> Image.Image:
        """A grid of the hits' images labelled "score: caption"; grey where a source is no readable file."""
        if not hits:
            raise ValueError("no search results to show")
        images = [hit_image(hit.source, cell) for hit in hits]
        labels = [f"{hit.score:.3f}: {hit.caption}" if hit.caption else f"{hit.score:.3f}" for hit in hits]
        return make_grid(images, labels, columns=columns, cell=cell)


def hit_image(source: str, cell: int) -> Image.Image:
    """The image at `source`, or a grey square for rows without a readable file (e.g. of hub datasets)."""
    try:
        return load_image(source)
    except BadImage:
        return Image.new("RGB", (cell, cell), PLACEHOLDER_GREY)
