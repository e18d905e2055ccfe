"""Per-attribute accuracy of the shapes-world judge on fresh renders it never saw, crisp and blurred.

Blurred means a Gaussian blur of sigma 1 px at 64 px, scaled with the picture (`corpora.shapes.blur`). The
renders are `--resolution` px (64 or 128, say); the judge reads them resized to its 64 px. Prints a table, then as
the last line one JSON object: per attribute the lower of the two accuracies, plus both conditions in full.
The bar: every attribute >= 0.99 in both conditions.

    python benchmarks/judge_accuracy.py [--model DIR] [--num-images 2000] [--seed 1] [--resolution 64]
"""

from __future__ import annotations

import json

from common.cli import ArgumentParser
from corpora.shapes import ATTRIBUTES
from corpora.shapes_judge import EVAL_BLUR, IMAGE_SIZE, accuracy, format_table, load_judge


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the released judge)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1, help="evaluation seed (never used in training)")
    parser.add_argument("--resolution", type=int, default=IMAGE_SIZE, help="size of the renders in pixels")
    args = parser.parse_args()

    result = accuracy(load_judge(args.model), args.num_images, args.seed, resolution=args.resolution)
    sigma = EVAL_BLUR * args.resolution / IMAGE_SIZE
    print(f"judge accuracy on {args.num_images} unseen {args.resolution} px renders (blurred: sigma {sigma:g} px)")
    print(format_table(result))
    summary = {"n": args.num_images, "resolution": args.resolution}
    summary.update({name: min(result["crisp"][name], result["blurred"][name]) for name in ATTRIBUTES})
    print(json.dumps({**summary, **result}))


if __name__ == "__main__":
    main()
