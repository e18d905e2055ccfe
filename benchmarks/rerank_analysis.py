"""How well each reranker picks among a prompt's candidates, against the judge.

    python benchmarks/rerank_analysis.py                                  # "a blue ball on grass", seed 0
    python benchmarks/rerank_analysis.py --prompt "a green star on grass" --seed 1

Draws `--images` groups of `--num-candidates` samples for one shapes-world prompt at the model's default
sampling settings, lets the judge check every sample, and reports: the match rate of single samples, the best
possible pick (a group counts if any of its samples matches), what the first sample and each reranker pick,
and the mean contrastive score and mean log-likelihood of matching and non-matching samples. With seed 0 the
samples are those `generation_quality.py` reranks for "a blue ball on grass". Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from corpora.shapes_judge import load_judge
from pipelines.text_to_image import DEMO_MODEL, RERANKERS, TextToImagePipeline, best_candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a pipeline folder (default: the released demo)")
    parser.add_argument("--prompt", default="a blue ball on grass")
    parser.add_argument("--images", type=int, default=32, help="groups of candidates")
    parser.add_argument("--num-candidates", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    pipe = TextToImagePipeline.from_pretrained(args.model).to(args.device)
    judge = load_judge(device=args.device)
    start = time.perf_counter()
    out = pipe(
        [args.prompt],
        num_images_per_prompt=args.images * args.num_candidates,
        num_candidates=1,
        generator=torch.Generator(args.device).manual_seed(args.seed),
        show_progress=False,
        batch_size=256,
    )
    matches = torch.tensor(judge.score(out.prompts, out.images).matches)
    groups = matches.view(-1, args.num_candidates).float()
    picked = {"first": groups[:, 0].mean().item()}
    for rerank in RERANKERS:
        picked[rerank] = matches[best_candidates(out.scores, out.log_likelihoods, args.num_candidates, rerank)]
        picked[rerank] = picked[rerank].float().mean().item()

    def mean_by_match(values: torch.Tensor) -> dict[str, float | None]:
        return {
            name: values[chosen].float().mean().item() if chosen.any() else None
            for name, chosen in (("match", matches), ("miss", ~matches))
        }

    result = {
        "per_sample": matches.float().mean().item(),
        "best_possible": groups.max(1).values.mean().item(),
        "picked": picked,
        "mean_score": mean_by_match(out.scores),
        "mean_log_likelihood": mean_by_match(out.log_likelihoods),
        "prompt": args.prompt,
        "images": args.images,
        "num_candidates": args.num_candidates,
        "seed": args.seed,
        "sampling": {name: value for name, value in pipe.sampling.items() if name not in ("num_candidates", "rerank")},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
