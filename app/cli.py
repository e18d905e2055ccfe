"""The `vqclip` command.

Each subcommand is a module of `app/` (the corpora's, of `corpora/`) exposing `add_cli(subparsers)`, which
adds its parser and sets `func`. Errors the user can fix (bad arguments, missing files) print one line and exit
with status 2; no traceback. Arguments are checked as they are parsed (`common.cli`), so that an output
that cannot be written or a device that does not exist stops a command before its work, not after.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from common.cli import (
    MAX_SEED,
    ArgumentParser,
    add_device_arg,
    close_progress_bars,
    integer,
    output_file,
    output_folder,
)
from common.data.load import add_format_args
from common.hub import STORAGE_DTYPES, storage_dtype

# The module whose `add_cli` defines each subcommand. Only the module of the command that runs is imported, so
# that `vqclip data shapes` or `vqclip search --help` does not wait for every stage's imports.
COMMANDS = {
    "data": "app.cli",
    "assemble": "app.cli",
    "generate": "app.cli",
    "edit": "app.cli",
    "judge": "corpora.shapes_judge",
    "reconstruct": "app.reconstruct",
    "index": "app.search",
    "search": "app.search",
    "eval": "app.evaluate",
    "demo": "app.demo",
    "serve": "app.serve",
}


def _data_shapes(args: argparse.Namespace) -> None:
    from common.data.load import build_corpus
    from corpora import shapes

    if args.reuse:
        if args.format != "folder":
            raise ValueError("--reuse works with --format folder")
        if shapes.built_as(args.out, args.num_images, args.resolution, args.seed, args.val_fraction):
            print(f"{args.out} already holds this shapes world ({args.num_images} images, seed {args.seed}); kept")
            return

    def build(folder: Path) -> dict[str, int]:
        return shapes.build(
            folder,
            args.num_images,
            resolution=args.resolution,
            seed=args.seed,
            val_fraction=args.val_fraction,
            workers=args.workers,
        )

    counts = build_corpus(build, args.out, args.format, args.samples_per_shard)
    print(f"wrote {counts['train']} training and {counts['validation']} validation images to {args.out}")


def _data_shards(args: argparse.Namespace) -> None:
    from common.data.load import source_config, write_splits_as_shards

    config = source_config(
        args.source,
        image_column=args.image_column,
        caption_column=args.caption_column,
        validation_fraction=args.validation_fraction,
    )
    written = write_splits_as_shards(config, args.out, args.samples_per_shard, seed=args.seed, workers=args.workers)
    print(f"wrote {', '.join(f'{n} {split}' for split, n in written.items())} samples as shards in {args.out}")
    validation = f" --validation_shards {Path(args.out) / 'validation'}" if "validation" in written else ""
    print(f"train on them with: --train_shards {Path(args.out) / 'train'}{validation}")


def _add_data_cli(subparsers: argparse._SubParsersAction) -> None:

    data = subparsers.add_parser("data", help="build the built-in corpora")
    kinds = data.add_subparsers(dest="kind", required=True)
    shapes = kinds.add_parser("shapes", help="render the synthetic shapes world as an imagefolder")
    shapes.add_argument(
        "--out", type=output_folder, required=True, help="output folder (train/ and validation/ are written in it)"
    )
    shapes.add_argument("--num-images", type=integer(1), default=50_000, help="images in both splits together")
    shapes.add_argument("--resolution", type=integer(8, 4096), default=64)
    shapes.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    shapes.add_argument("--val-fraction", type=float, default=0.1)
    shapes.add_argument("--workers", type=integer(1), default=None, help="worker processes (default: all cores)")
    shapes.add_argument(
        "--reuse",
        action="store_true",
        help="keep OUT if it holds the world these settings build; stop if it holds one built otherwise",
    )
    add_format_args(shapes)
    shapes.set_defaults(func=_data_shapes)

    shards = kinds.add_parser(
        "shards", help="write any data the stages read (a folder or a dataset) as webdataset shards"
    )
    shards.add_argument(
        "--from", dest="source", required=True, help="a folder, data file, save_to_disk folder or hub name"
    )
    shards.add_argument(
        "--out", type=output_folder, required=True, help="output folder: shards go into OUT/train/ and OUT/validation/"
    )
    shards.add_argument("--samples-per-shard", type=int, default=10_000, help="at most 10,000 (default: %(default)s)")
    shards.add_argument(
        "--image_column", help='column holding the image (default "image"; "file_name" in metadata.jsonl)'
    )
    shards.add_argument("--caption_column", default="text", help="column holding the caption (default: %(default)s)")
    shards.add_argument(
        "--validation_fraction",
        type=float,
        default=0.0,
        help="rows held out for OUT/validation/ when the data has no validation split (default: %(default)s)",
    )
    shards.add_argument(
        "--seed", type=integer(0, MAX_SEED), default=0, help="order of the rows in the shards (default: %(default)s)"
    )
    shards.add_argument("--workers", type=integer(1), default=4, help="shards written at once (default: %(default)s)")
    shards.set_defaults(func=_data_shards)

    from corpora import emoji

    emoji.add_cli(kinds)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags of `generate` and `edit`, as the pipeline's keyword arguments (None: the model's)."""
    names = ("guidance_scale", "temperature", "top_k", "top_p", "num_candidates", "rerank")
    return {name: getattr(args, name) for name in names}


def _scored(out) -> list[str]:
    """Each picture's label: its contrastive score and its prompt."""
    return [f"{score:.2f} {prompt}" for score, prompt in zip(out.scores.tolist(), out.prompts, strict=True)]


def _save_rows(source, source_label: str, out, columns: int, path: str) -> None:
    """A grid of `out.images` with `columns` per row, each row starting with `source`; labelled with each image's
    contrastive score and prompt."""
    from common.grid import make_grid

    scored = _scored(out)
    images, labels = [], []
    for row in range(0, len(out.images), columns):
        images += [source, *out.images[row : row + columns]]
        labels += [source_label, *scored[row : row + columns]]
    make_grid(images, labels, columns=columns + 1).save(path)


def _generate(args: argparse.Namespace) -> None:
    import torch

    from common.data import load_image
    from common.grid import make_grid
    from pipelines.text_to_image import TextToImagePipeline

    source = load_image(args.image) if args.image else None  # read once: completed, and shown in the grid
    pipe = TextToImagePipeline.from_pretrained(args.model).to(args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    out = pipe(
        args.prompts,
        num_images_per_prompt=args.num_images,
        **_sampling_kwargs(args),
        generator=generator,
        image=source,
        keep_rows=args.keep_rows,
    )
    if source is not None:  # each row starts with the image it completes
        _save_rows(source, "completes this", out, args.num_images, args.out)
    else:
        make_grid(list(out.images), _scored(out), columns=args.num_images).save(args.out)
    print(f"wrote {len(out.images)} images to {args.out} (labels: contrastive score, prompt)")


def _box(text: str) -> tuple[int, ...]:
    try:
        box = tuple(int(value) for value in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"--box takes left,top,right,bottom in pixels, e.g. 16,16,48,48; got {text!r}")
    return box


def _edit(args: argparse.Namespace) -> None:
    import torch

    from common.data import load_image, resize_center_crop
    from pipelines.editing import edit_picture, edit_region, outline
    from pipelines.text_to_image import TextToImagePipeline

    if (args.box is None) == (args.mask is None):
        raise ValueError("give the region to redraw with --box or with --mask (one of them)")
    picture = edit_picture(load_image(args.picture, min_side=1))
    mask = _box(args.box) if args.box is not None else load_image(args.mask, min_side=1)
    pipe = TextToImagePipeline.from_pretrained(args.model).to(args.device)
    resolution = pipe.vqvae.config.resolution
    shown = outline(resize_center_crop(picture, resolution), edit_region(mask, picture.size, resolution))
    out = pipe.edit(
        picture,
        mask,
        args.prompts,
        num_images_per_prompt=args.num_images,
        **_sampling_kwargs(args),
        generator=torch.Generator(args.device).manual_seed(args.seed),
        blend=not args.no_blend,
    )
    _save_rows(shown, "redraws the outlined part", out, args.num_images, args.out)
    print(f"wrote {len(out.images)} edits to {args.out} (labels: contrastive score, prompt)")


def _assemble(args: argparse.Namespace) -> None:
    from pipelines.text_to_image import TextToImagePipeline, check_sampling

    pipe = TextToImagePipeline.from_stages(args.vqvae, args.contrastive, args.prior)
    codebook = pipe.prior.config.codebook_size

    def settings(flag: str, given: str, base: dict) -> dict:
        try:
            chosen = json.loads(given)
            if not isinstance(chosen, dict):
                raise ValueError(f"sampling settings must be a JSON object, got {given}")
            return check_sampling({**base, **chosen}, codebook)
        except ValueError as err:  # a JSONDecodeError too
            raise ValueError(f"{flag}: {err}") from err

    pipe.sampling = settings("--sampling", args.sampling, {})
    pipe.edit_sampling = settings("--edit-sampling", args.edit_sampling, pipe.sampling)
    print(f"wrote the pipeline to {pipe.save_pretrained(args.out, storage_dtype(args.dtype))}")


def _add_generate_cli(subparsers: argparse._SubParsersAction) -> None:

    assemble = subparsers.add_parser("assemble", help="join three trained stages into one pipeline folder")
    assemble.add_argument("--vqvae", required=True, help="the tokenizer folder")
    assemble.add_argument("--contrastive", required=True, help="the contrastive model folder")
    assemble.add_argument("--prior", required=True, help="the prior folder")
    assemble.add_argument("--out", type=output_folder, required=True, help="the pipeline folder to write")
    assemble.add_argument("--dtype", choices=STORAGE_DTYPES, default="float32", help="type the weights are stored in")
    assemble.add_argument(
        "--sampling",
        default="{}",
        help='the model\'s default sampling settings as JSON, e.g. \'{"temperature": 0.9, "top_k": 100}\' '
        "(keys: guidance_scale, temperature, top_k, top_p, num_candidates, rerank)",
    )
    assemble.add_argument(
        "--edit-sampling",
        default="{}",
        help="the model's default sampling settings for editing, the same keys; those left out are --sampling's",
    )
    assemble.set_defaults(func=_assemble)

    gen = subparsers.add_parser("generate", help="generate images from text prompts")
    gen.add_argument("prompts", nargs="+", help='one or more prompts, e.g. "a blue ball on grass"')
    gen.add_argument("--model", required=True, help="a pipeline folder (pipeline.json + vqvae/ contrastive/ prior/)")
    _add_sampling_args(gen)
    gen.add_argument("--image", help="complete this image: keep its top rows, draw the rest for each prompt")
    gen.add_argument("--keep-rows", type=integer(1), help="with --image: rows of codes kept (default: half)")
    gen.add_argument(
        "--out", type=output_file(image=True), default="generated.png", help="PNG grid: one row per prompt"
    )
    gen.set_defaults(func=_generate)

    edit = subparsers.add_parser("edit", help="redraw a region of a picture for text prompts, keep the rest")
    edit.add_argument("picture", help="the picture to edit")
    edit.add_argument("prompts", nargs="+", help='one or more prompts, e.g. "a red star on grass"')
    edit.add_argument("--box", help="the region to redraw: left,top,right,bottom in the picture's pixels")
    edit.add_argument("--mask", help="the region to redraw: a black-and-white picture of its size, white = redraw")
    edit.add_argument("--model", required=True, help="a pipeline folder (pipeline.json + vqvae/ contrastive/ prior/)")
    _add_sampling_args(edit)
    edit.add_argument("--no-blend", action="store_true", help="the tokenizer's drawing, not pasted into the picture")
    edit.add_argument(
        "--out",
        type=output_file(image=True),
        default="edits.png",
        help="PNG grid: one row per prompt, after the outlined input",
    )
    edit.set_defaults(func=_edit)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--num-images", type=integer(1, 4096), default=4, help="images per prompt")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance; 1 turns it off")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=integer(1))
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--num-candidates", type=integer(1, 4096), help="sample this many per image, keep the best")
    parser.add_argument(
        "--rerank", help="how the best candidate is chosen: contrastive, contrastive+likelihood or contrastive-null"
    )
    entry = "edit_sampling" if parser.prog.endswith(" edit") else "sampling"
    parser.epilog = f'Sampling flags left out take the model\'s defaults (the "{entry}" entry of its pipeline.json).'
    parser.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    add_device_arg(parser)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `data`, `assemble` and `generate`."""
    _add_data_cli(subparsers)
    _add_generate_cli(subparsers)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The `vqclip` parser with the subcommand that `argv` names, or with all of them when it names none."""
    parser = ArgumentParser(prog="vqclip", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    named = next((arg for arg in argv if not arg.startswith("-")), None)
    modules = [COMMANDS[named]] if named in COMMANDS else dict.fromkeys(COMMANDS.values())
    for module in modules:
        importlib.import_module(module).add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # a ModelLoadError is a ValueError; OSError: a full disk, a lost file
        close_progress_bars()
        print(f"vqclip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vqclip: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
