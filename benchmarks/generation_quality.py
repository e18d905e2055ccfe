"""Generation quality on the shapes world: how often the judge finds every attribute a prompt names in the
generated picture.

    python benchmarks/generation_quality.py                      # the released models/shapes-demo
    python benchmarks/generation_quality.py --model runs/shapes-pipeline --device cuda

Prompts name a color, a shape and a background ("a red star on sand"): "a blue ball on grass" (32 images),
100 seen compositions (4 images each) and every held-out composition (4 images each). Default settings are
the pipeline's guidance scale and reranking of `--num-candidates` samples per image; the seen prompts are
also measured with guidance off and with no reranking. Ends with one JSON line with keys
`blue_ball_on_grass`, `seen`, `heldout`, `seen_no_guidance`, `seen_no_rerank`.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from corpora.shapes import BACKGROUND_PHRASES, HELDOUT, SEEN, SHAPE_WORDS
from corpora.shapes_judge import load_judge
from pipelines.text_to_image import DEMO_MODEL, TextToImagePipeline


def prompt(color: str, shape: str, background: str) -> str:
    return f"a {color} {SHAPE_WORDS[shape][0]} {BACKGROUND_PHRASES[background][0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a pipeline folder (default: the released demo)")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--num-candidates", type=int, default=8, help="samples per image, the best kept")
    parser.add_argument("--num-seen", type=int, default=100, help="seen compositions to prompt")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = TextToImagePipeline.from_pretrained(args.model).to(args.device)
    judge = load_judge(device=args.device)
    seen = [prompt(*t) for t in random.Random(args.seed).sample(sorted(SEEN), args.num_seen)]
    heldout = [prompt(*t) for t in sorted(HELDOUT)]
    n = args.images_per_prompt

    def match_rate(prompts: list[str], per_prompt: int, **settings) -> float:
        settings = {"guidance_scale": args.guidance_scale, "num_candidates": args.num_candidates, **settings}
        out = pipe(
            prompts,
            num_images_per_prompt=per_prompt,
            generator=torch.Generator(args.device).manual_seed(args.seed),
            show_progress=False,
            batch_size=256,
            **settings,
        )
        return judge.score(out.prompts, out.images).match_rate

    start = time.perf_counter()
    result = {
        "blue_ball_on_grass": match_rate(["a blue ball on grass"], 32),
        "seen": match_rate(seen, n),
        "heldout": match_rate(heldout, n),
        "seen_no_guidance": match_rate(seen, n, guidance_scale=1.0),
        "seen_no_rerank": match_rate(seen, n, num_candidates=1),
    }
    result.update(
        guidance_scale=args.guidance_scale,
        num_candidates=args.num_candidates,
        seen_prompts=len(seen),
        heldout_prompts=len(heldout),
        images_per_prompt=n,
        seconds=round(time.perf_counter() - start, 1),
        model=args.model,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
