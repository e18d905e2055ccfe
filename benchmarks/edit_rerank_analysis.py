"""Where editing loses its matches: in the drawings, or in the pick among them.

    python benchmarks/edit_rerank_analysis.py                      # 200 edits of seed 7, 48 drawings each
    python benchmarks/edit_rerank_analysis.py --n 40 --num-candidates 16 --guidance-scale 4

Draws `--num-candidates` versions of the region for each of `--n` edits of `edit_quality.py` (the same kind of
pictures, masks and prompts; seed 7 by default, so that settings are chosen on other pictures than the 2026 ones
that benchmark reports), lets the judge check every drawing, and reports for the first k drawings (k = 8, 16, 24,
32, 48 up to `--num-candidates`): the match rate of single drawings, the best possible pick (an edit counts if
any of its drawings matches), and what each reranker picks; `contrastive+likelihood` weighs the likelihood of the
whole grid, as `pipe.edit` ranks, and `contrastive+likelihood naive` that of the redrawn codes alone; `prior pmi`
picks by how much more likely the prior finds the grid under the prompt than under the empty prompt, and
`contrastive+likelihood+pmi` adds that standing to the two `contrastive+likelihood` sums.
`hard_misses` counts the edits the model's pick misses in which under 15% of the drawings match (the drawing's
fault), against `easy_misses` (the pick's). Ends with one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.cli import ArgumentParser
from corpora.shapes_judge import load_judge
from pipelines.editing import code_cells, edit_region
from pipelines.text_to_image import DEMO_MODEL, RERANKERS, TextToImagePipeline, best_candidates, standing

sys.path.insert(0, str(Path(__file__).parent))
from edit_quality import edits  # noqa: E402

LIKELIHOOD = "contrastive+likelihood"  # the reranker that weighs the likelihood, of the whole grid or the region


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a pipeline folder (default: the released demo)")
    parser.add_argument("--n", type=int, default=200, help="edits")
    parser.add_argument("--num-candidates", type=int, default=48, help="drawings per edit")
    parser.add_argument("--guidance-scale", type=float, help="default: the model's editing default")
    parser.add_argument("--temperature", type=float, help="default: the model's editing default")
    parser.add_argument("--seed", type=int, default=7, help="seeds the pictures, the prompts and the sampling")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", help="save every drawing's scores and verdict here (torch.save)")
    args = parser.parse_args()

    pipe = TextToImagePipeline.from_pretrained(args.model).to(args.device)
    settings = {**pipe.edit_sampling, "num_candidates": 1}
    for name in ("guidance_scale", "temperature"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    judge = load_judge(device=args.device)
    resolution, grid, count = pipe.vqvae.config.resolution, pipe.prior.config.grid_size, args.num_candidates
    start = time.perf_counter()
    groups = []
    for index, (_, picture, box, prompt) in enumerate(tqdm(edits(args.n, resolution, args.seed), desc="editing")):
        generator = torch.Generator(args.device).manual_seed(args.seed + index)
        out = pipe.edit(picture, box, prompt, num_images_per_prompt=count, generator=generator, show_progress=False,
                        **settings)  # fmt: skip
        redrawn = code_cells(edit_region(box, picture.size, resolution), grid).flatten().to(pipe.device)
        with torch.no_grad():  # each code's log-probability under the prompt (as `Generation.log_probs` holds it)
            # and under the empty prompt
            features, mask = pipe.contrastive.text_token_features([prompt] * count)
            codes = out.codes.flatten(1)
            log_probs, null_log_probs = (
                pipe.prior(codes, features, text_mask=mask, drop=torch.full((count,), drop))[0]
                .float().log_softmax(-1).gather(2, codes[..., None])[..., 0].cpu()
                for drop in (False, True)
            )  # fmt: skip
        matches = torch.tensor(judge.score(out.prompts, out.images).matches)
        groups.append((out.scores, out.null_scores, log_probs, redrawn.cpu(), matches, null_log_probs))
    if args.save:  # per edit: contrastive and null scores, each code's log-probability under the prompt, the
        # redrawn codes, the verdicts, and each code's log-probability under the empty prompt
        torch.save(groups, args.save)

    def pmi_picked(k: int, with_others: bool) -> float:
        """Match rate when picking by the prior's pointwise mutual information of the grid and the prompt (mean
        log-probability per code under the prompt less that under the empty prompt), alone or with the standings
        `contrastive+likelihood` sums."""
        hits = []
        for scores, _, log_probs, _, matches, null_log_probs in groups:
            rank = (log_probs[:k] - null_log_probs[:k]).mean(1)[None]
            if with_others:
                rank = standing(rank) + standing(scores[None, :k].float()) + standing(log_probs[:k].mean(1)[None])
            hits.append(matches[rank.argmax()].item())
        return round(sum(hits) / len(hits), 4)

    def picked(k: int, rerank: str, fitted: bool) -> torch.Tensor:
        hits = []
        for scores, nulls, log_probs, redrawn, matches, _ in groups:
            likelihood = log_probs[:k].mean(1) if fitted else log_probs[:k, redrawn].mean(1)
            hits.append(matches[best_candidates(scores[:k], nulls[:k], likelihood, k, rerank)].item())
        return torch.tensor(hits)

    result: dict[str, object] = {}
    default = settings["rerank"]
    for k in (k for k in (8, 16, 24, 32, 48) if k <= count):
        fractions = torch.stack([g[4][:k].float().mean() for g in groups])
        default_hits = picked(k, default, True)
        result[str(k)] = {
            "single": round(fractions.mean().item(), 4),
            "best_possible": round((fractions > 0).float().mean().item(), 4),
            **{rerank: round(picked(k, rerank, True).float().mean().item(), 4) for rerank in RERANKERS},
            f"{LIKELIHOOD} naive": round(picked(k, LIKELIHOOD, False).float().mean().item(), 4),
            "prior pmi": pmi_picked(k, False),
            f"{LIKELIHOOD}+pmi": pmi_picked(k, True),
            "hard_misses": int(((fractions < 0.15) & ~default_hits.bool()).sum()),
            "easy_misses": int(((fractions >= 0.15) & ~default_hits.bool()).sum()),
        }
    print(json.dumps({"edits": args.n, **settings, "num_candidates": count, "seed": args.seed, "by_candidates": result,
                      "seconds": round(time.perf_counter() - start, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
