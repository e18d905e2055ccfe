"""One entry point for every source: folders and datasets are read in full, shards and streams as streams."""

from __future__ import annotations

from common.data.config import DataConfig
from common.data.mapped import ImageTextSplits, load_mapped
from common.data.streams import load_stream


def load_image_text(config: DataConfig, *, seed: int = 0, progress: bool = True) -> ImageTextSplits:
    """Read, check and split the configured data.

    Folders and `datasets` datasets (`load_mapped`): the validation split is the dataset's own, else a `seed`ed
    random `validation_fraction` of the rows; every image is decoded once by a scan, bad rows are counted in
    `.report`. Shards and `datasets` streaming (`load_stream`): nothing is scanned; the training split is a
    `StreamData` that counts bad rows as training reads them, and the validation rows are read into memory.
    With `progress` (pass `accelerator.is_main_process`), shows progress and prints one summary line to stderr.
    """
    config.check_source()
    if config.is_stream:
        return load_stream(config, seed=seed, progress=progress)
    return load_mapped(config, seed=seed, progress=progress)
