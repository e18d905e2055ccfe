"""What every command-line parser of vqclip shares: `--help` shows each option's default."""

from __future__ import annotations

import argparse
import copy


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
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, cuda, cuda:1, mps")


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose --help shows defaults; its subcommands' parsers (`add_subparsers`) are too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
