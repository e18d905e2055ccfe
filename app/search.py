"""`vqclip index build|add` and `vqclip search`: index a collection of images, then search it by text or image.

    vqclip index build --model outputs/contrastive --images data/shapes --out outputs/index [--fp16]
    vqclip index add --index outputs/index --images new_pictures/ photo.png
    vqclip search --index outputs/index "a blue ball on grass" -k 8 --grid results.png
    vqclip search --index outputs/index --image query.png

`--images` takes folders (read through the data layer with their captions when they hold metadata.jsonl or
.txt captions, else every image in them, uncaptioned), image files, and dataset names or data files that
`datasets` reads. The index records the absolute path of the model folder it was built with, so `--model` is
optional for `index add` and `search`; a model given there must be the one that built the index (same config
and save), else the command stops with an error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common.cli import add_device_arg, integer, output_file, output_folder
from common.locks import locked
from contrastive.index import ImageIndex, SearchHit
from pipelines.image_search import ImageSearchPipeline


def _add_images(index: ImageIndex, args: argparse.Namespace) -> None:
    report = index.add(args.images, batch_size=args.batch_size, caption_column=args.caption_column)
    if report.kept == 0:
        raise ValueError(f"no usable images in {' '.join(args.images)} ({report})")
    print(f"added {report.kept} images ({report}); the index holds {len(index)}")


def _build(args: argparse.Namespace) -> None:
    from contrastive.model import ContrastiveModel

    model = ContrastiveModel.from_pretrained(args.model, device=args.device)
    index = ImageIndex.empty(model, model_dir=args.model, fp16=args.fp16)
    with locked(args.out, "the index"):
        _add_images(index, args)
        print(f"wrote {index.save(args.out)}")


def _add(args: argparse.Namespace) -> None:
    with locked(args.index, "the index"):  # read, extended and written by one command at a time
        index = ImageSearchPipeline.from_pretrained(args.model, args.index, device=args.device).index
        _add_images(index, args)
        print(f"wrote {index.save(args.index)}")


def format_hits(hits: Sequence[SearchHit]) -> str:
    """A plain-text table of search results: rank, score, source, caption."""
    rows = [("rank", "score", "source", "caption")]
    rows += [(str(rank), f"{hit.score:.4f}", hit.source, hit.caption) for rank, hit in enumerate(hits, 1)]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        f"{rank:>{widths[0]}}  {score:>{widths[1]}}  {source:<{widths[2]}}  {caption}".rstrip()
        for rank, score, source, caption in rows
    )


def _search(args: argparse.Namespace) -> None:
    if (args.query is None) == (args.image is None):
        raise ValueError('give either a text query ("a blue ball on grass") or --image QUERY.png')
    pipe = ImageSearchPipeline.from_pretrained(args.model, args.index, device=args.device)
    hits = pipe(args.query if args.image is None else Path(args.image), k=args.k)
    print(format_hits(hits))
    if args.grid:
        pipe.contact_sheet(hits).save(args.grid)
        print(f"wrote {args.grid}")


def _image_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="folders (with metadata.jsonl or .txt captions, or plain), image files, or datasets names/files",
    )
    parser.add_argument("--batch-size", type=integer(1), default=64, help="images encoded at once")
    parser.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl or the dataset")
    add_device_arg(parser)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="build or extend a search index of image embeddings")
    actions = index.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="embed a collection of images with a contrastive model")
    build.add_argument("--model", required=True, help="a contrastive model folder (config.json + model.safetensors)")
    build.add_argument(
        "--out", type=output_folder, required=True, help="index folder to write (index.json + embeddings.safetensors)"
    )
    build.add_argument("--fp16", action="store_true", help="store the embeddings as float16 (half the size)")
    _image_args(build)
    build.set_defaults(func=_build)
    add = actions.add_parser("add", help="add images to an index and save it again")
    add.add_argument("--index", type=output_folder, required=True, help="an index folder")
    add.add_argument("--model", help="the model folder (default: the one the index was built with)")
    _image_args(add)
    add.set_defaults(func=_add)

    search = subparsers.add_parser("search", help="search an index of images by text or by image")
    search.add_argument("query", nargs="?", help='text to search for, e.g. "a blue ball on grass"')
    search.add_argument("--image", help="search by this image instead of a text")
    search.add_argument("--index", required=True, help="an index folder (vqclip index build)")
    search.add_argument("--model", help="the model folder (default: the one the index was built with)")
    search.add_argument("-k", type=integer(1), default=8, help="number of results")
    search.add_argument(
        "--grid", type=output_file(image=True), help="also write a contact sheet of the results to this PNG"
    )
    add_device_arg(search)
    search.set_defaults(func=_search)
