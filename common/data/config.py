"""Where the data is and how it is prepared: `DataConfig` and the data flags of every training script."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from PIL import Image

from common.data.images import MIN_IMAGE_SIDE

MAX_CAPTION_CHARS = 1000


@dataclass
class DataConfig:
    """Where the data is and how it is prepared; `add_data_args` exposes most fields as flags."""

    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    image_column: str | None = None
    caption_column: str = "text"
    validation_fraction: float = 0.05
    resolution: int = 64
    max_train_samples: int | None = None
    exclude: tuple[str, ...] = ()  # "COLUMN=VALUE": rows whose metadata column has that value are left out
    dataloader_num_workers: int = 0
    cache_images: bool = False
    max_image_pixels: int | None = Image.MAX_IMAGE_PIXELS
    min_image_side: int = MIN_IMAGE_SIDE
    max_caption_chars: int = MAX_CAPTION_CHARS
    train_shards: str | None = None  # webdataset shards: a folder of .tar files or a spec with braces and "::"
    validation_shards: str | None = None
    caption_key: str | None = None  # with shards: the caption is this key of each sample's .json, not its .txt
    streaming: bool = False  # with dataset_name: read it with `datasets` streaming
    shuffle_buffer: int = 1000  # streams: samples shuffled together (a block)
    max_validation_samples: int | None = None  # default: every row of a folder's split, 1000 of a stream

    def __post_init__(self) -> None:
        checks = {
            "validation_fraction must be in [0, 1)": 0 <= self.validation_fraction < 1,
            "resolution must be at least 1": self.resolution >= 1,
            "max_train_samples must be at least 1": self.max_train_samples is None or self.max_train_samples >= 1,
            "dataloader_num_workers must be at least 0": self.dataloader_num_workers >= 0,
            "max_image_pixels must be at least 1": self.max_image_pixels is None or self.max_image_pixels >= 1,
            "min_image_side must be at least 1": self.min_image_side >= 1,
            "max_caption_chars must be at least 1": self.max_caption_chars >= 1,
            "shuffle_buffer must be at least 1": self.shuffle_buffer >= 1,
            "max_validation_samples must be at least 1": (
                self.max_validation_samples is None or self.max_validation_samples >= 1
            ),
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(f"DataConfig: {message}")
        if self.streaming and self.dataset_name is None:
            raise ValueError("--streaming reads a --dataset_name; shards (--train_shards) are always streamed")
        if self.validation_shards is not None and self.train_shards is None:
            raise ValueError("--validation_shards goes with --train_shards")
        if self.caption_key is not None and self.train_shards is None:
            raise ValueError("--caption_key names a key of each shard sample's .json: it goes with --train_shards")
        if self.is_stream and (self.cache_images or self.max_train_samples is not None):
            flag = "--cache_images" if self.cache_images else "--max_train_samples"
            raise ValueError(f"{flag} is for folders and datasets read in full; a stream is never held in memory")
        self.exclude = tuple(self.exclude or ())
        for spec in self.exclude:
            if "=" not in spec or not spec.split("=", 1)[0]:
                raise ValueError(f"--exclude {spec!r}: expected COLUMN=VALUE, e.g. style=fluent")

    def check_source(self) -> None:
        """Refuse a config that names no data, or more than one source."""
        sources = [self.train_data_dir is not None, self.dataset_name is not None, self.train_shards is not None]
        if sum(sources) != 1:
            raise ValueError(
                "give exactly one of --train_data_dir (a local folder), --dataset_name (a datasets name, a data file "
                "or a save_to_disk folder) and --train_shards (webdataset shards)"
            )

    @property
    def is_stream(self) -> bool:
        """Whether the training data is read as a stream (shards or `datasets` streaming) rather than in full."""
        return self.train_shards is not None or self.streaming

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataConfig:
        """The config from parsed flags; fields without a flag keep their defaults."""
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Add the data flags (diffusers' names) to a training script's parser."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--train_data_dir",
        help="local folder: images with metadata.jsonl or with same-named .txt captions, "
        "flat or with train/ and validation/ subfolders",
    )
    group.add_argument(
        "--dataset_name",
        help="a dataset that datasets.load_dataset reads (hub name or local file), or a save_to_disk folder",
    )
    group.add_argument("--dataset_config_name", help="the dataset's configuration, if it has several")
    group.add_argument(
        "--image_column", help='column holding the image (default "image"; "file_name" in metadata.jsonl)'
    )
    group.add_argument("--caption_column", default=DataConfig.caption_column, help="column holding the caption")
    group.add_argument(
        "--validation_fraction",
        type=float,
        default=DataConfig.validation_fraction,
        help="fraction of rows held out for validation when the dataset has no validation split",
    )
    group.add_argument(
        "--resolution", type=int, default=DataConfig.resolution, help="images are resized and cropped to this"
    )
    group.add_argument("--max_train_samples", type=int, help="use a random subset of this many training rows")
    group.add_argument(
        "--exclude",
        action="append",
        metavar="COLUMN=VALUE",
        help="leave out rows whose metadata column has this value (repeatable), e.g. --exclude style=fluent",
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=DataConfig.dataloader_num_workers,
        help="DataLoader worker processes",
    )
    group.add_argument(
        "--cache_images", action="store_true", help="keep the resized images in memory after the first scan"
    )
    streams = parser.add_argument_group("data at scale (read as a stream: no scan before the first step)")
    streams.add_argument(
        "--train_shards",
        help="webdataset shards (img2dataset's layout): a folder of .tar files, or a spec such as "
        '"data/shards/{00000..00099}.tar", several joined with "::"',
    )
    streams.add_argument(
        "--validation_shards",
        help="shards of the validation split (default: --validation_fraction of the training samples, by key)",
    )
    streams.add_argument("--caption_key", help="take each shard sample's caption from this key of its .json")
    streams.add_argument("--streaming", action="store_true", help="read --dataset_name with datasets streaming")
    streams.add_argument(
        "--shuffle_buffer",
        type=int,
        default=DataConfig.shuffle_buffer,
        help="samples shuffled together; shard order is shuffled every epoch too",
    )
    streams.add_argument(
        "--max_validation_samples",
        type=int,
        help="validation rows to hold in memory (default: all of a folder's split, 1000 of a stream)",
    )
