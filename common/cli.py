"""What every command-line parser of vqclip shares: `--help` shows each option's default, an error is one line
(exit status 2), and arguments are checked as they are parsed, before any work starts.

Each check is an argparse `type=`, so the error names the flag ("argument --out: ..."):

    parser.add_argument("--out", type=output_file(image=True), default="generated.png")
    parser.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    add_device_arg(parser)  # --device, checked to exist on this machine
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from pathlib import Path


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, without "(default: None)" (an option left out), without the
    default of a switch, and without a second default where the help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not _shows_default(action) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and _shows_default(action):  # else argparse shows nothing
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    return default is not None and default is not argparse.SUPPRESS and not isinstance(default, bool)


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """`--device`: where a command's models run."""
    parser.add_argument("--device", type=device, default="cpu", help="where the models run: cpu, cuda, cuda:1, mps")


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose --help shows defaults and whose errors are one line; its subcommands' parsers
    (`add_subparsers`) are too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def close_progress_bars() -> None:
    """Close the progress bars an error left open, so that the error's line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer from `low` to `high` (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def _writable_folder_for(path: Path) -> None:
    """Refuse a path that cannot be created: its nearest existing ancestor must be a folder we may write in."""
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{path} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path} cannot be created: {ancestor} is not writable")


def output_folder(text: str) -> Path:
    """A folder a command writes into: an existing, writable folder, or one that can be created."""
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{path} is not writable")
    else:
        _writable_folder_for(path)
    return path


def output_file(image: bool = False) -> Callable[[str], Path]:
    """A file a command writes: not a folder, writable if it exists, creatable if not; with `image`, its suffix
    names a picture format Pillow writes (.png, .jpg, ...)."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name, e.g. {path / 'out.png'}")
        if path.exists() and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{path} is not writable")
        if not path.exists():
            _writable_folder_for(path)
        if image:
            from PIL import Image

            writable = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.SAVE}
            if path.suffix.lower() not in writable:
                raise argparse.ArgumentTypeError(f"{path}: the name must end in a picture format, e.g. .png or .jpg")
        return path

    return parse


def device(text: str) -> str:
    """A torch device that exists on this machine: cpu, cuda, cuda:N or mps."""
    if text == "cpu":  # the default: no need to import torch to know it
        return text
    import torch

    try:
        found = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if found.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU; use --device cpu")
        if found.index is not None and found.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif found.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine; use --device cpu")
    elif found.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: vqclip runs on cpu, cuda or mps, not {found.type}")
    return text
