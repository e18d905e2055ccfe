"""Choose a model's default sampling settings on shapes-world prompts that generation_quality.py never uses.

    python benchmarks/sampling_sweep.py          # the released models/shapes-demo
    python benchmarks/sampling_sweep.py --model runs/pipeline --grid 2/0.7/none,1.5/0.85/100
    python benchmarks/sampling_sweep.py --grid 1/0.7/none/contrastive,1/0.7/none/contrastive+likelihood

For each setting in the grid, the judge's match rate on 40 seen compositions outside generation_quality.py's
100 (and never "a blue ball on grass"), 3 pictures each (`--images-per-prompt`), best of 4 (`--num-candidates`),
kept by the model's default reranker unless a setting names one (settings that differ only in the reranker pick
among the same candidates, drawn once). Ends with one JSON line mapping each setting
("guidance_scale/temperature/top_k[/rerank]") to its match rate. Write the winner into a pipeline with
`vqclip assemble ... --sampling '{...}'`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from common.cli import ArgumentParser
from corpora.shapes import SEEN, triple_prompt
from pipelines.text_to_image import DEMO_MODEL, RERANKERS

sys.path.insert(0, str(Path(__file__).parent))
from generation_quality import (  # noqa: E402
    judged_candidates,
    load_pipeline_and_judge,
    picked_matches,
    seen_compositions,
)

DEFAULT_GRID = [  # (guidance_scale, temperature, top_k, rerank: None keeps the model's default)
    (3.0, 1.0, None, None),
    (2.0, 1.0, None, None),
    (5.0, 1.0, None, None),
    (3.0, 0.85, None, None),
    (3.0, 0.7, None, None),
    (3.0, 1.0, 100, None),
    (3.0, 1.0, 30, None),
    (3.0, 0.9, 100, None),
]


def parse_grid(text: str) -> list[tuple[float, float, int | None, str | None]]:
    """ "2/0.7/none,3/1/100/contrastive" -> [(2.0, 0.7, None, None), (3.0, 1.0, 100, "contrastive")]"""
    grid = []
    for item in text.split(","):
        try:
            guidance, temperature, top_k, *rerank = item.strip().split("/")
            if len(rerank) > 1 or (rerank and rerank[0] not in RERANKERS):
                raise ValueError
            top_k = None if top_k.lower() == "none" else int(top_k)
            grid.append((float(guidance), float(temperature), top_k, rerank[0] if rerank else None))
        except ValueError:
            message = (
                f"expected GUIDANCE/TEMPERATURE/TOP_K[/RERANK] (TOP_K may be none; RERANK one of {RERANKERS}), "
                f"got {item!r}"
            )
            raise argparse.ArgumentTypeError(message) from None
    return grid


def sweep_prompts() -> list[str]:
    """The 40 seen compositions the sweep prompts with: never the generation benchmark's, nor the blue ball."""
    excluded = set(seen_compositions(100)) | {("blue", "ball", "grass")}
    chosen = random.Random(1).sample([t for t in sorted(SEEN) if t not in excluded], 40)
    return [triple_prompt(*t) for t in chosen]


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a pipeline folder (default: the released demo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images-per-prompt", type=int, default=3, help="more pictures separate close settings")
    parser.add_argument("--num-candidates", type=int, default=4, help="samples per picture, the best kept")
    parser.add_argument(
        "--grid",
        type=parse_grid,
        default=DEFAULT_GRID,
        help="comma-separated GUIDANCE/TEMPERATURE/TOP_K[/RERANK] settings",
    )
    args = parser.parse_args()

    pipe, judge = load_pipeline_and_judge(args.model, args.device, args.num_candidates)
    prompts = sweep_prompts()
    start = time.perf_counter()
    result = {}
    default_rerank = pipe.sampling["rerank"]
    drawn = {}  # settings that differ only in the reranker pick among the same candidates: draw them once
    for guidance, temperature, top_k, rerank in args.grid:
        sampling = (guidance, temperature, top_k)
        if sampling not in drawn:
            # top_k None must mean "off" here, not "the model's default"
            pipe.sampling.update(guidance_scale=guidance, temperature=temperature, top_k=top_k)
            drawn[sampling] = judged_candidates(
                pipe, judge, prompts, args.images_per_prompt, args.num_candidates, args.device, 5
            )
        picks = picked_matches(*drawn[sampling], args.num_candidates, rerank or default_rerank)
        key = f"{guidance}/{temperature}/{top_k}" + (f"/{rerank}" if rerank else "")
        result[key] = picks.double().mean().item()
        print(f"guidance_scale/temperature/top_k[/rerank] {key}: {result[key]:.3f}", flush=True)
    seconds = round(time.perf_counter() - start, 1)
    print(
        json.dumps(
            {"match_rate": result, "prompts": len(prompts), "num_candidates": args.num_candidates, "seconds": seconds}
        )
    )


if __name__ == "__main__":
    main()
