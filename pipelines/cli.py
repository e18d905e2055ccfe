"""The `vqclip` command.

Each subcommand lives with the code it drives: a module exposes `add_cli(subparsers)`, which adds its
parser and sets `func`. Errors the user can fix (bad arguments, missing files) print one line and exit
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.hub import ModelLoadError


def _data_shapes(args: argparse.Namespace) -> None:
    from corpora import shapes

    counts = shapes.build(
        args.out,
        args.num_images,
        resolution=args.resolution,
        seed=args.seed,
        val_fraction=args.val_fraction,
        workers=args.workers,
    )
    print(f"wrote {counts['train']} training and {counts['validation']} validation images to {args.out}")


def _add_data_cli(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build the built-in corpora")
    kinds = data.add_subparsers(dest="kind", required=True)
    shapes = kinds.add_parser("shapes", help="render the synthetic shapes world as an imagefolder")
    shapes.add_argument("--out", required=True, help="output folder (train/ and validation/ are written in it)")
    shapes.add_argument("--num-images", type=int, default=50_000, help="images in both splits together")
    shapes.add_argument("--resolution", type=int, default=64)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--val-fraction", type=float, default=0.1)
    shapes.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    shapes.set_defaults(func=_data_shapes)

    from corpora import emoji

    emoji.add_cli(kinds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqclip", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_data_cli(subparsers)

    from contrastive import search_cli
    from corpora import shapes_judge
    from pipelines import demo
    from vqvae import cli as vqvae_cli

    shapes_judge.add_cli(subparsers)
    vqvae_cli.add_cli(subparsers)
    search_cli.add_cli(subparsers)
    demo.add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        print(f"vqclip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vqclip: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
