"""`vqclip demo`: the main job.

Loads the released shapes-world model (`models/shapes-demo`), generates pictures for a few prompts and lets
the judge check every one, then builds a small fresh shapes world and searches it by text. Writes into
`--out`:

- `generated.png`: one row per prompt, each picture labelled with the judge's verdict;
- `search.png`: the best matches for the search query, with their scores and the judge's verdicts;
- `demo.json`: the numbers it prints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common.cli import MAX_SEED, integer, output_folder
from common.grid import make_grid

PROMPTS = (
    "a blue ball on grass",
    "a red star in the night sky",
    "a yellow heart on sand",
    "a white box in front of a brick wall",
)
SEARCH_QUERY = "a red ball"


def verdict_label(prompt: str, missing: tuple[str, ...]) -> str:
    """A picture's label: "ok: PROMPT", or "NO, wrong color+shape: PROMPT" naming what the judge did not see."""
    return f"NO, wrong {'+'.join(missing)}: {prompt}" if missing else f"ok: {prompt}"


def generate(pipe, judge, prompts: list[str], num_images: int, num_candidates: int, seed: int, out: Path) -> dict:
    """Generate and judge `num_images` pictures per prompt; save the labelled grid."""
    result = pipe(
        prompts,
        num_images_per_prompt=num_images,
        num_candidates=num_candidates,
        generator=torch.Generator().manual_seed(seed),
        show_progress=False,
    )
    verdict = judge.score(result.prompts, result.images)
    labels = [verdict_label(prompt, missing) for prompt, missing in zip(result.prompts, verdict.missing, strict=True)]
    make_grid(result.images, labels, columns=num_images).save(out / "generated.png")
    per_prompt = {
        p: sum(verdict.matches[i * num_images : (i + 1) * num_images]) / num_images for i, p in enumerate(prompts)
    }
    return {"judge_match_rate": verdict.match_rate, "per_prompt": per_prompt}


def shapes_index(model, world: Path, num_images: int, seed: int):
    """Render a small shapes world of `num_images` into `world` and index both its splits with the contrastive
    `model`; returns the index and the splits."""
    from common.data import DataConfig, load_image_text
    from contrastive.index import ImageIndex
    from corpora import shapes

    shapes.build(world, num_images, seed=seed, val_fraction=0.5, workers=1, progress=False)
    config = DataConfig(train_data_dir=str(world), resolution=model.config.resolution, cache_images=True)
    splits = load_image_text(config, progress=False)  # decoded once
    index = ImageIndex.build(model, splits.train, progress=False)
    index.add(splits.validation, progress=False)
    return index, splits


def search(pipe, judge, num_world_images: int, seed: int, out: Path) -> dict:
    """Build a small shapes world, index it with the contrastive model and search it for `SEARCH_QUERY`: of the
    n images that show it (by their metadata), how many are among the top n hits (as the judge reads them)."""
    from common.data import load_image
    from corpora.shapes import parse_prompt
    from pipelines.image_search import ImageSearchPipeline

    index, splits = shapes_index(pipe.contrastive, out / "shapes", num_world_images, seed)
    wanted = parse_prompt(SEARCH_QUERY)
    relevant = sum(
        all(split.column(name)[i] == value for name, value in wanted.items())
        for split in (splits.train, splits.validation)
        for i in range(len(split))
    )
    searcher = ImageSearchPipeline(pipe.contrastive, index)
    hits = searcher(SEARCH_QUERY, k=max(relevant, 8))
    searcher.contact_sheet(hits[:8]).save(out / "search.png")
    top = hits[:relevant]
    found = sum(judge.score([SEARCH_QUERY] * len(top), [load_image(hit.source) for hit in top]).matches)
    return {"query": SEARCH_QUERY, "indexed": len(index), "relevant": relevant, "found_in_top_relevant": found}


def run(model: Path | None, out: Path, num_images: int, num_candidates: int, num_world_images: int, seed: int) -> dict:
    from corpora.shapes_judge import load_judge
    from pipelines.text_to_image import DEMO_MODEL, TextToImagePipeline

    start = time.perf_counter()
    model = model or DEMO_MODEL
    out.mkdir(parents=True, exist_ok=True)
    pipe = TextToImagePipeline.from_pretrained(model)
    judge = load_judge()
    summary = {
        "model": str(model),
        "generation": generate(pipe, judge, list(PROMPTS), num_images, num_candidates, seed, out),
        "search": search(pipe, judge, num_world_images, seed, out),
    }
    summary["seconds"] = round(time.perf_counter() - start, 1)
    gen, found = summary["generation"], summary["search"]
    print(f"generated {num_images} pictures for each of {len(PROMPTS)} prompts (best of {num_candidates} each):")
    for prompt, rate in gen["per_prompt"].items():
        print(f"  {rate:>5.0%}  {prompt}")
    print(f"the judge finds every attribute the prompt names in {gen['judge_match_rate']:.1%} of them")
    print(f"  grid: {out / 'generated.png'}")
    print(
        f'searched {found["indexed"]} fresh shapes-world images for "{found["query"]}": {found["relevant"]} show '
        f"one, and the top {found['relevant']} hits hold {found['found_in_top_relevant']} of them"
    )
    print(f"  contact sheet: {out / 'search.png'}")
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"done in {summary['seconds']} s")
    return summary


def _demo(args: argparse.Namespace) -> None:
    model = Path(args.model) if args.model else None
    run(model, Path(args.out), args.num_images, args.num_candidates, args.num_world_images, args.seed)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="the main job: generate with the released model, judge, and search")
    demo.add_argument("--model", help="a pipeline folder (default: the released models/shapes-demo)")
    demo.add_argument("--out", type=output_folder, default="outputs/demo", help="folder for the pictures and demo.json")
    demo.add_argument("--num-images", type=integer(1, 4096), default=4, help="pictures per prompt")
    demo.add_argument(
        "--num-candidates", type=integer(1, 4096), default=4, help="samples per picture; the best is kept"
    )
    demo.add_argument("--num-world-images", type=integer(2), default=400, help="size of the shapes world to search")
    demo.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    demo.set_defaults(func=_demo)
