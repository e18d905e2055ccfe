"""The data layer every stage reads through.

- `images`: decoding one picture (used at inference too): `load_image`, `image_pixels`, `to_rgb`, ...
- `skips`: `Reason`, `BadImage` and `SkipReport`: why rows are skipped, counted by reason, never fatal.
- `config`: `DataConfig` and the data flags (`add_data_args`) of every training script.
- `mapped`: map-style sources (imagefolders, images with `.txt` captions, `datasets` datasets), checked by a
  threaded scan.
- `shards`: webdataset tar shards in img2dataset's layout: specs, sizes, reading and writing.
- `streams`: streamed training data (shards, `datasets` streaming) read by every process and worker, with
  exact mid-epoch resume: `StreamData`.
- `load`: `load_image_text(config) -> ImageTextSplits`, whichever the source.
"""

from common.data.config import MAX_CAPTION_CHARS, DataConfig, add_data_args
from common.data.images import (
    IMAGE_EXTENSIONS,
    MIN_IMAGE_SIDE,
    image_pixels,
    load_image,
    resize_center_crop,
    to_array,
    to_rgb,
    to_tensor,
)
from common.data.load import load_image_text
from common.data.mapped import ImageTextDataset, ImageTextSplits, collate
from common.data.skips import BadImage, Reason, SkipReport
from common.metadata import METADATA_NAME

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_CAPTION_CHARS",
    "METADATA_NAME",
    "MIN_IMAGE_SIDE",
    "BadImage",
    "DataConfig",
    "ImageTextDataset",
    "ImageTextSplits",
    "Reason",
    "SkipReport",
    "add_data_args",
    "collate",
    "image_pixels",
    "load_image",
    "load_image_text",
    "resize_center_crop",
    "to_array",
    "to_rgb",
    "to_tensor",
]
