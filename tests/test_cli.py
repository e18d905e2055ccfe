"""The `vqclip` command's parsers: defaults in every --help, --device where models run, imports per subcommand."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from app.cli import COMMANDS, build_parser
from common.cli import ArgumentParser


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def _shows_a_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.default not in (None, False, True, argparse.SUPPRESS)


def test_every_help_shows_the_defaults():
    parser = build_parser()
    assert set(parser._subparsers._group_actions[0].choices) == set(COMMANDS)
    checked = 0
    for command in _parsers(parser):
        for action in filter(_shows_a_default, command._actions):
            formatter = command._get_formatter()
            formatter.add_argument(action)
            assert "(default" in formatter.format_help(), (command.prog, action.option_strings)
            checked += 1
    assert checked > 30


def test_the_helpers_defaults_read_well():
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    parser.add_argument("--fp16", action="store_true", help="half the size")
    parser.add_argument("--name", help="a name")
    text = " ".join(parser.format_help().split())
    assert "--steps STEPS (default: 8000)" in text and "random seed (default: 0)" in text
    assert "(default: all cores)" in text and "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("module", ["vqvae.train", "contrastive.train", "prior.train"])
def test_training_scripts_show_their_defaults(module, capsys):
    parse_args = __import__(module, fromlist=["parse_args"]).parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert " ".join(capsys.readouterr().out.split()).count("(default: ") >= 10


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", "m", "--data", "d", "--device", "cuda:1"],
        ["index", "build", "--model", "m", "--images", "i", "--out", "o", "--device", "cuda:1"],
        ["index", "add", "--index", "x", "--images", "i", "--device", "cuda:1"],
        ["search", "--index", "x", "a red ball", "--device", "cuda:1"],
        ["generate", "a red ball", "--model", "m", "--device", "cuda:1"],
    ],
)
def test_commands_that_run_models_take_device(argv, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert build_parser(argv).parse_args(argv).device == "cuda:1"
    assert build_parser(argv[:1]).parse_args(argv[:-2]).device == "cpu"


def test_a_subcommand_imports_only_its_own_modules():
    probe = (
        "import sys; from app.cli import build_parser;"
        "build_parser(['data']).parse_args(['data', 'shapes', '--out', 'x']);"
        "print(sorted(m for m in ('open_clip', 'pipelines.text_to_image', 'app.search') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
