"""Saving and loading models: a model directory is `config.json` + `model.safetensors`.

- Loading reads only those two files; pickles are never opened.
- Loading is strict: config fields and state-dict keys must match exactly, and the error names the
  first offending field or key.
- Saving is atomic: everything is written into a temporary sibling directory, which then replaces the
  target, so a crash mid-save never leaves a half-written model that later loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.config import Config, ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt")
MAX_CONFIG_BYTES = 1 << 20

M = TypeVar("M", bound="PretrainedModel")


class ModelLoadError(ValueError):
    """A model directory cannot be loaded; the message says why."""


def read_json(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Read a small JSON file, refusing huge or malformed ones with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    if path.stat().st_size > max_bytes:
        raise ModelLoadError(f"{path} is larger than {max_bytes} bytes; refusing to read it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err


def atomic_write_dir(target: str | os.PathLike, write: Any) -> Path:
    """Call `write(tmp_dir)` to fill a fresh directory, then move it to `target` atomically.

    If `target` already exists it is replaced only after the new content is complete; a crash before
    that point leaves `target` exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_config(cls: type[Config], directory: Path) -> tuple[Config, str | None]:
    """Read `config.json` strictly; returns the config and the saved model class name."""
    data = read_json(directory / CONFIG_NAME)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{directory / CONFIG_NAME}: expected a JSON object")
    data = dict(data)
    saved_class = data.pop("model_class", None)
    try:
        return cls.from_dict(data), saved_class
    except ConfigError as err:
        raise ModelLoadError(f"{directory / CONFIG_NAME}: {err}") from err


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickles = [name for name in PICKLE_NAMES if (directory / name).exists()]
        hint = (
            f" (found {pickles[0]}: pickle files are never loaded, convert it to safetensors)"
            if pickles
            else ""
        )
        raise ModelLoadError(f"{path} does not exist{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{path} is not a valid safetensors file: {err}") from err


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: Path) -> None:
    """Raise ModelLoadError naming the first missing, unexpected or wrongly shaped key."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ModelLoadError(f"{where}: missing weight {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ModelLoadError(
            f"{where}: unexpected weight {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
        )
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{where}: weight {key!r} has shape {tuple(found[key].shape)}, "
                f"the config expects {tuple(tensor.shape)}"
            )


class PretrainedModel(torch.nn.Module):
    """Mixin for models with a `Config`: `save_pretrained(dir)` and `from_pretrained(dir)`."""

    config_class: ClassVar[type[Config]]

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        config = {"model_class": type(self).__name__, **self.config.to_dict()}
        # clone so that tied weights become separate tensors, which safetensors requires
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}

        def write(tmp: Path) -> None:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})

        return atomic_write_dir(directory, write)

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, device: str | torch.device = "cpu") -> M:
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelLoadError(f"{directory} is not a model directory")
        config, saved_class = load_config(cls.config_class, directory)
        if saved_class is not None and saved_class != cls.__name__:
            raise ModelLoadError(f"{directory / CONFIG_NAME}: holds a {saved_class}, not a {cls.__name__}")
        state = load_weights(directory)
        model = cls(config)
        check_state_dict(model.state_dict(), state, directory / WEIGHTS_NAME)
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()
