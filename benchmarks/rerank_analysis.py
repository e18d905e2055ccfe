"""How well each reranker picks among a prompt's candidates, against the judge.

    python benchmarks/rerank_analysis.py                                  # "a blue ball on grass", seed 0
    python benchmarks/rerank_analysis.py --prompt "a green star on grass" --seed 1
    python benchmarks/rerank_analysis.py --sweep-prompts --images 9 --seed 1   # sampling_sweep.py's 40 prompts

Draws `--images` groups of `--num-candidates` samples for each shapes-world prompt at the model's default
sampling settings, lets the judge check every sample, and reports: the match rate of single samples, the best
possible pick (a group counts if any of its samples matches), what the first sample and each reranker pick,
and the mean contrastive score (with the prompt, and with the empty prompt) and mean log-likelihood of
matching and non-matching samples. With seed 0 the samples are those `generation_quality.py` reranks for
"a blue ball on grass". `disagreements` counts, for the model's default reranker against each other one, the
groups where only the default picks a match and those where only the other does. Ends with one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from common.cli import ArgumentParser
from pipelines.text_to_image import DEMO_MODEL, RERANKERS

sys.path.insert(0, str(Path(__file__).parent))
from generation_quality import judged_candidates, load_pipeline_and_judge, picked_matches  # noqa: E402
from sampling_sweep import sweep_prompts  # noqa: E402


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a pipeline folder (default: the released demo)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--prompt", default="a blue ball on grass")
    which.add_argument("--sweep-prompts", action="store_true", help="sampling_sweep.py's 40 prompts instead")
    parser.add_argument("--images", type=int, default=32, help="groups of candidates per prompt")
    parser.add_argument("--num-candidates", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    pipe, judge = load_pipeline_and_judge(args.model, args.device, args.num_candidates)
    start = time.perf_counter()
    prompts = sweep_prompts() if args.sweep_prompts else [args.prompt]
    out, matches = judged_candidates(pipe, judge, prompts, args.images, args.num_candidates, args.device, args.seed)
    groups = matches.view(-1, args.num_candidates).float()
    right = {"first": groups[:, 0].bool()}
    right.update({rerank: picked_matches(out, matches, args.num_candidates, rerank) for rerank in RERANKERS})
    default = pipe.sampling["rerank"]
    disagreements = {
        other: [int((right[default] & ~right[other]).sum()), int((right[other] & ~right[default]).sum())]
        for other in RERANKERS
        if other != default
    }

    def mean_by_match(values: torch.Tensor) -> dict[str, float | None]:
        return {
            name: values[chosen].float().mean().item() if chosen.any() else None
            for name, chosen in (("match", matches), ("miss", ~matches))
        }

    result = {
        "per_sample": matches.float().mean().item(),
        "best_possible": groups.max(1).values.mean().item(),
        "picked": {name: chosen.float().mean().item() for name, chosen in right.items()},
        "disagreements": {"default": default, **disagreements},
        "mean_score": mean_by_match(out.scores),
        "mean_null_score": mean_by_match(out.null_scores),
        "mean_log_likelihood": mean_by_match(out.log_likelihoods),
        "prompt": None if args.sweep_prompts else args.prompt,
        "prompts": len(prompts),
        "images": args.images,
        "num_candidates": args.num_candidates,
        "seed": args.seed,
        "sampling": {name: value for name, value in pipe.sampling.items() if name not in ("num_candidates", "rerank")},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
