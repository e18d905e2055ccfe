"""Per-attribute accuracy of the shapes-world judge on fresh renders it never saw, crisp and blurred.

Blurred means a Gaussian blur of sigma 1 px at 64 px (`corpora.shapes.blur`). Prints a table, then as
the last line one JSON object: per attribute the lower of the two accuracies, plus both conditions in full.
The bar: every attribute >= 0.99 in both conditions.

    python benchmarks/judge_accuracy.py [--model DIR] [--num-images 2000] [--seed 1]
"""

from __future__ import annotations

import argparse
import json

from corpora.shapes import ATTRIBUTES
from corpora.shapes_judge import accuracy, format_table, load_judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the released judge)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1, help="evaluation seed (never used in training)")
    args = parser.parse_args()

    result = accuracy(load_judge(args.model), args.num_images, args.seed)
    print(f"judge accuracy on {args.num_images} unseen renders (blurred: sigma 1 px at 64 px)")
    print(format_table(result))
    summary = {"n": args.num_images}
    summary.update({name: min(result["crisp"][name], result["blurred"][name]) for name in ATTRIBUTES})
    print(json.dumps({**summary, **result}))


if __name__ == "__main__":
    main()
