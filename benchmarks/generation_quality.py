"""Generation quality on the shapes world: how often the judge finds every attribute a prompt names in the
generated picture.

    python benchmarks/generation_quality.py                      # the released models/shapes-demo
    python benchmarks/generation_quality.py --model runs/shapes-pipeline --device cuda

Prompts name a color, a shape and a background ("a red star on sand"): "a blue ball on grass" (32 images),
100 seen compositions (4 images each) and every held-out composition (4 images each). Settings are the
model's default sampling settings (its pipeline.json) with the best of `--num-candidates` samples per image;
the seen prompts are also measured with guidance off, with no reranking, and with each other reranker
(`seen_rerank_<name>`: the seen prompts' candidates are drawn and judged once, and each reranker picks among
them). Ends with one JSON line with keys
`blue_ball_on_grass`, `seen`, `heldout`, `seen_no_guidance`, `seen_no_rerank`, `seen_rerank_<name>` and the
settings used.
"""

from __future__ import annotations

import json
import random
import time

import torch

from common.cli import ArgumentParser
from corpora.shapes import HELDOUT, SEEN, triple_prompt
from corpora.shapes_judge import JudgeScore, ShapesJudge, load_judge
from pipelines.text_to_image import DEMO_MODEL, RERANKERS, TextToImageOutput, TextToImagePipeline, best_candidates

BENCHMARK_SEED = 0  # picks the seen compositions; benchmarks/sampling_sweep.py tunes on others


def seen_compositions(count: int) -> list[tuple[str, str, str]]:
    """The seen compositions this benchmark prompts with."""
    return random.Random(BENCHMARK_SEED).sample(sorted(SEEN), count)


def load_pipeline_and_judge(model: str, device: str, num_candidates: int) -> tuple[TextToImagePipeline, ShapesJudge]:
    """The pipeline, keeping the best of `num_candidates` samples per picture, and the shapes-world judge."""
    pipe = TextToImagePipeline.from_pretrained(model).to(device)
    pipe.sampling["num_candidates"] = num_candidates
    return pipe, load_judge(device=device)


def generated(pipe, prompts: list[str], per_prompt: int, device: str, seed: int, **settings) -> TextToImageOutput:
    """`per_prompt` pictures for each prompt, seeded by `seed`."""
    return pipe(
        prompts,
        num_images_per_prompt=per_prompt,
        generator=torch.Generator(device).manual_seed(seed),
        show_progress=False,
        batch_size=256,
        **settings,
    )


def judged(pipe, judge, prompts: list[str], per_prompt: int, device: str, seed: int, **settings) -> JudgeScore:
    """The judge's verdicts on `per_prompt` pictures generated for each prompt."""
    out = generated(pipe, prompts, per_prompt, device, seed, **settings)
    return judge.score(out.prompts, out.images)


def match_rate(pipe, judge, prompts: list[str], per_prompt: int, device: str, seed: int, **settings) -> float:
    """The fraction of pictures in which the judge finds every attribute their prompt names."""
    return judged(pipe, judge, prompts, per_prompt, device, seed, **settings).match_rate


def judged_candidates(
    pipe, judge, prompts: list[str], per_prompt: int, num_candidates: int, device: str, seed: int
) -> tuple[TextToImageOutput, torch.Tensor]:
    """Every one of the `num_candidates` samples behind each of `per_prompt` pictures per prompt (the samples
    `pipe(..., num_candidates=num_candidates)` reranks, in groups), and the judge's verdict on each (bool)."""
    out = generated(pipe, prompts, per_prompt * num_candidates, device, seed, num_candidates=1)
    return out, torch.tensor(judge.score(out.prompts, out.images).matches)


def picked_matches(out: TextToImageOutput, matches: torch.Tensor, num_candidates: int, rerank: str) -> torch.Tensor:
    """Per group of candidates, whether the sample the `rerank` rule keeps matches."""
    return matches[best_candidates(out.scores, out.null_scores, out.log_likelihoods, num_candidates, rerank)]


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a pipeline folder (default: the released demo)")
    parser.add_argument("--num-candidates", type=int, default=8, help="samples per image, the best kept")
    parser.add_argument("--num-seen", type=int, default=100, help="seen compositions to prompt")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    args = parser.parse_args()

    pipe, judge = load_pipeline_and_judge(args.model, args.device, args.num_candidates)
    seen = [triple_prompt(*t) for t in seen_compositions(args.num_seen)]
    heldout = [triple_prompt(*t) for t in sorted(HELDOUT)]
    n = args.images_per_prompt

    def rate(prompts: list[str], per_prompt: int, **settings) -> float:
        return match_rate(pipe, judge, prompts, per_prompt, args.device, args.seed, **settings)

    start = time.perf_counter()
    # every reranker picks among the same candidates: draw and judge them once
    candidates, matches = judged_candidates(pipe, judge, seen, n, args.num_candidates, args.device, args.seed)
    seen_by = {
        rerank: picked_matches(candidates, matches, args.num_candidates, rerank).double().mean().item()
        for rerank in RERANKERS
    }
    default = pipe.sampling["rerank"]
    guided = pipe.sampling["guidance_scale"] != 1
    result = {
        "blue_ball_on_grass": rate(["a blue ball on grass"], 32),
        "seen": seen_by[default],
        "heldout": rate(heldout, n),
        "seen_no_guidance": rate(seen, n, guidance_scale=1.0) if guided else seen_by[default],
        "seen_no_rerank": rate(seen, n, num_candidates=1),
        **{f"seen_rerank_{rerank}": value for rerank, value in seen_by.items() if rerank != default},
    }
    result.update(
        **pipe.sampling,
        seen_prompts=len(seen),
        heldout_prompts=len(heldout),
        images_per_prompt=n,
        seconds=round(time.perf_counter() - start, 1),
        model=args.model,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
