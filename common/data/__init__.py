"""The data layer every stage reads through.

- `images`: decoding one picture (used at inference too): `load_image`, `image_pixels`, `to_rgb`, ...
- `skips`: `Reason`, `BadImage` and `SkipReport`: why rows are skipped, counted by reason, never fatal.
- `config`: `DataConfig` and the data flags (`add_data_args`) of every training script.
- `mapped`: map-style sources (imagefolders, images with `.txt` captions, `datasets` datasets), checked by a
  threaded scan: `load_image_text` -> `ImageTextSplits`.
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
from common.data.mapped import ImageTextDataset, ImageTextSplits, collate, load_image_text
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
