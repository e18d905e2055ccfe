"""Image completion on the shapes world: does a completed picture keep the given top and show the prompt?

    python benchmarks/completion_quality.py                    # the released models/shapes-demo
    python benchmarks/completion_quality.py --model runs/shapes-pipeline --device cuda

For each of `--num-prompts` seen compositions ("a red star on sand"), a fresh source picture shows the same
background with a small object of another color and shape at the bottom. The pipeline keeps the top
`--keep-rows` rows of the source's codes (above the object) and completes the rest for the prompt, with the
model's default sampling settings and the best of `--num-candidates` samples per image. The judge then checks
every attribute the prompt names, as generation_quality.py does, and the same prompts are also generated from
nothing for comparison. Ends with one JSON line with keys `completion` (judge match of the completions),
`plain` (of pictures generated from nothing), `source_kept` (how often the judge still reads the source's
color and shape in a completion: the prior copied the old object instead of drawing the new one) and the
settings used.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from common.cli import ArgumentParser
from corpora.shapes import COLORS, SEEN, SHAPES, Scene, render, triple_prompt
from corpora.shapes_judge import JudgeScore
from pipelines.text_to_image import DEMO_MODEL

sys.path.insert(0, str(Path(__file__).parent))
from generation_quality import judged, load_pipeline_and_judge  # noqa: E402


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a pipeline folder (default: the released demo)")
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--num-candidates", type=int, default=8, help="samples per image, the best kept")
    parser.add_argument("--keep-rows", type=int, default=8, help="code rows kept (8: half of the released model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds the compositions, the sources and the sampling")
    args = parser.parse_args()

    pipe, judge = load_pipeline_and_judge(args.model, args.device, args.num_candidates)
    resolution = pipe.vqvae.config.resolution
    rng, pick = np.random.default_rng(args.seed), random.Random(args.seed)
    targets = pick.sample(sorted(SEEN), args.num_prompts)
    prompts, sources, source_scenes = [], [], []
    for color, shape, background in targets:
        scene = Scene(
            pick.choice([c for c in COLORS if c != color]),
            pick.choice([s for s in SHAPES if s != shape]),
            background,
            "small",
            "bottom",
        )
        prompts.append(triple_prompt(color, shape, background))
        sources.append(render(scene, resolution, rng))
        source_scenes.append(scene)

    def judged_pictures(**settings) -> JudgeScore:
        return judged(pipe, judge, prompts, args.images_per_prompt, args.device, args.seed, **settings)

    start = time.perf_counter()
    completed = judged_pictures(image=sources, keep_rows=args.keep_rows)
    per_image = [scene for scene in source_scenes for _ in range(args.images_per_prompt)]
    readings = zip(completed.readings, per_image, strict=True)
    copied = [read["color"] == scene.color and read["shape"] == scene.shape for read, scene in readings]
    result = {
        "completion": completed.match_rate,
        "plain": judged_pictures().match_rate,
        "source_kept": sum(copied) / len(copied),
        "keep_rows": args.keep_rows,
        "prompts": len(prompts),
        "images_per_prompt": args.images_per_prompt,
        **pipe.sampling,
        "seconds": round(time.perf_counter() - start, 1),
        "model": args.model,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
