"""Saving and loading models: a model directory is `config.json` + `model.safetensors`.

- Loading reads only those two files; pickles are never opened.
- Loading is strict: config fields and state-dict keys must match exactly, and the error names the
  first offending field or key. The model the config describes is first built on the meta device (no memory):
  one over `MAX_PARAMETERS`, or weights whose keys, shapes or types do not fit it, are refused before anything
  is allocated; non-finite weights are refused naming the tensor.
- Files are read only inside the model folder: a symlink that leads out of it is refused (`inside`).
- Saving is atomic: both files are written into a temporary folder and renamed into place, config
  last; both carry the same `save_id`, so a crash mid-save never leaves a model that later loads with
  weights and config from different saves.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common.config import Config, ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt")
MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 32  # nesting levels of a config, pipeline.json or index.json
MAX_PARAMETERS = 4_000_000_000  # 16 GB of float32 weights: far above any model here, far below a hostile config
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what a float weight may be stored as

M = TypeVar("M", bound="PretrainedModel")


class ModelLoadError(ValueError):
    """A model directory cannot be loaded; the message says why."""


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` with its symlinks resolved; ModelLoadError unless it stays inside the folder `root`."""
    real, base = Path(path).resolve(), Path(root).resolve()
    if not real.is_relative_to(base):
        raise ModelLoadError(f"{path} leads outside {root} (to {real}); files of a model folder must be inside it")
    return real


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


def read_json(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Read a small JSON file, refusing huge, deeply nested or malformed ones with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    if path.stat().st_size > max_bytes:
        raise ModelLoadError(f"{path} is larger than {max_bytes} bytes; refusing to read it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        too_deep = json_depth(data) > MAX_JSON_DEPTH
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err
    except RecursionError:  # nested past Python's own limit
        too_deep = True
    if too_deep:
        raise ModelLoadError(f"{path} nests JSON more than {MAX_JSON_DEPTH} levels deep; refusing to read it")
    return data


def respect_umask(path: str | os.PathLike) -> None:
    """Give `path`, and everything in it if it is a folder, the mode that a new file or folder gets under the
    current umask. tempfile makes its files 0600 and its folders 0700, and safetensors writes 0600: saved this
    way, another account (a web server, a colleague) could not read them."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


SAVE_PREFIX = ".tmp-save-"  # a save's temporary folder: .tmp-save-{pid}-{random}


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_saves(directory: str | os.PathLike) -> None:
    """Remove the temporary folders that saves into `directory` left when their process was killed."""
    for tmp in Path(directory).glob(f"{SAVE_PREFIX}*"):
        pid = tmp.name.removeprefix(SAVE_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)) and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_files(directory: str | os.PathLike, write: Any, last: str = CONFIG_NAME) -> Path:
    """Call `write(tmp)` to fill a temporary folder inside `directory`, then move its files into place.

    Nothing in `directory` changes until every new file is complete and synced; `last` (the config) is
    moved in after the others, and other files in `directory` (checkpoints, samples) are left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f"{SAVE_PREFIX}{os.getpid()}-", dir=directory))
    try:
        write(tmp)
        files = sorted(tmp.iterdir(), key=lambda f: f.name == last)
        for f in files:
            respect_umask(f)
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        for f in files:
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


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
        respect_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_config(cls: type[Config], directory: Path) -> tuple[Config, dict[str, str | None]]:
    """Read `config.json` strictly; returns the config and the save's `model_class` and `save_id`."""
    data = read_json(inside(directory, directory / CONFIG_NAME))
    if not isinstance(data, dict):
        raise ModelLoadError(f"{directory / CONFIG_NAME}: expected a JSON object")
    data = dict(data)
    meta = {key: data.pop(key, None) for key in ("model_class", "save_id")}
    try:
        return cls.from_dict(data), meta
    except ConfigError as err:
        raise ModelLoadError(f"{directory / CONFIG_NAME}: {err}") from err


def load_weights(directory: Path, save_id: str | None = None) -> dict[str, torch.Tensor]:
    """Read `model.safetensors`; with `save_id`, check it was written by the same save as the config."""
    path = directory / WEIGHTS_NAME
    inside(directory, path)
    if not path.is_file():
        pickles = [name for name in PICKLE_NAMES if (directory / name).exists()]
        hint = f" (found {pickles[0]}: pickle files are never loaded, convert it to safetensors)" if pickles else ""
        raise ModelLoadError(f"{path} does not exist{hint}")
    try:
        with safe_open(path, framework="pt") as handle:
            found_id = (handle.metadata() or {}).get("save_id")
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{path} is not a valid safetensors file: {err}") from err
    if save_id is not None and found_id != save_id:
        raise ModelLoadError(
            f"{path} and {directory / CONFIG_NAME} come from different saves (was a save interrupted?); save the model "
            "again"
        )
    return state


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: Path) -> None:
    """Raise ModelLoadError naming the first missing, unexpected, wrongly shaped or wrongly typed key, or the
    first weight holding NaN or infinite values. `expected` may be on the meta device."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ModelLoadError(f"{where}: missing weight {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ModelLoadError(f"{where}: unexpected weight {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{where}: weight {key!r} has shape {tuple(found[key].shape)}, the config expects {tuple(tensor.shape)}"
            )
        kinds = FLOAT_DTYPES if tensor.dtype.is_floating_point else (tensor.dtype,)
        if found[key].dtype not in kinds:
            raise ModelLoadError(f"{where}: weight {key!r} is {found[key].dtype}, the model expects {tensor.dtype}")
        if found[key].dtype.is_floating_point and not torch.isfinite(found[key]).all():
            raise ModelLoadError(f"{where}: weight {key!r} holds NaN or infinite values")


def save_state_dict(state: dict[str, torch.Tensor], path: Path, save_id: str | None = None) -> None:
    """Write tensors as safetensors; cloned so that tied weights become separate tensors."""
    metadata = {"format": "pt", **({"save_id": save_id} if save_id else {})}
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, path, metadata=metadata)


STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # what `--save_dtype` / `--dtype` flags offer


def storage_dtype(name: str) -> torch.dtype | None:
    """The dtype to pass to `save_pretrained` for a flag value: None (as trained) for "float32"."""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"weights can be stored as {', '.join(STORAGE_DTYPES)}, not {name!r}")
    return None if name == "float32" else getattr(torch, name)


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to `dtype`, except those whose values would overflow it."""
    if dtype is None:
        return state
    if not dtype.is_floating_point:
        raise ValueError(f"weights can only be stored in a floating-point type, not {dtype}")
    limit = torch.finfo(dtype).max
    return {
        k: v.to(dtype) if v.is_floating_point() and (v.numel() == 0 or v.abs().max() <= limit) else v
        for k, v in state.items()
    }


class PretrainedModel(torch.nn.Module):
    """Mixin for models with a `Config`: `save_pretrained(dir)` and `from_pretrained(dir)`."""

    config_class: ClassVar[type[Config]]

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config

    def write_files(self, directory: Path, dtype: torch.dtype | None = None) -> None:
        """Write `config.json` and `model.safetensors` into an existing directory (not atomic)."""
        save_id = uuid.uuid4().hex
        config = {"model_class": type(self).__name__, "save_id": save_id, **self.config.to_dict()}
        save_state_dict(cast_floats(self.state_dict(), dtype), directory / WEIGHTS_NAME, save_id)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Save atomically into `directory`, leaving any other files there alone. With `dtype` (e.g.
        torch.float16, half the size on disk), floating-point weights are stored in that type where they fit
        in it; loading always gives a model in float32."""
        return atomic_write_files(directory, lambda folder: self.write_files(folder, dtype))

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, device: str | torch.device = "cpu") -> M:
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelLoadError(f"{directory} is not a model directory")
        config, meta = load_config(cls.config_class, directory)
        if meta["model_class"] is not None and meta["model_class"] != cls.__name__:
            raise ModelLoadError(f"{directory / CONFIG_NAME}: holds a {meta['model_class']}, not a {cls.__name__}")
        with torch.device("meta"):  # the model's shapes and types, with no memory allocated
            skeleton = cls(config).state_dict()
        count = sum(tensor.numel() for tensor in skeleton.values())
        if count > MAX_PARAMETERS:
            raise ModelLoadError(
                f"{directory / CONFIG_NAME}: describes a model of {count:,} weights, more than {MAX_PARAMETERS:,}"
            )
        state = load_weights(directory, meta["save_id"])
        check_state_dict(skeleton, state, directory / WEIGHTS_NAME)
        model = cls(config)
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()
