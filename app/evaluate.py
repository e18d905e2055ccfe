"""`vqclip eval --model PIPELINE --data DIR`: one report across the three stages.

Tokenizer metrics and text->image / image->text recall on the validation split, and generations for a
sample of its captions: their mean contrastive score and, on shapes-world data, the judge's match rate
(every attribute the prompt names is read back from the image), for seen and held-out compositions.
Writes `eval.json` and `eval.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from common.cli import MAX_SEED, add_device_arg, integer, output_folder
from common.data import DataConfig, load_image_text
from common.hub import atomic_write_text
from contrastive.evaluate import retrieval_metrics
from pipelines.text_to_image import TextToImagePipeline
from vqvae.evaluate import evaluate as tokenizer_metrics


def evaluate_pipeline(
    pipe: TextToImagePipeline, data_dir: str, *, max_images: int = 1000, num_prompts: int = 64, seed: int = 0
) -> dict:
    config = DataConfig(train_data_dir=data_dir, resolution=pipe.vqvae.config.resolution)
    validation = load_image_text(config, progress=False).validation
    rows = torch.utils.data.Subset(validation, range(min(max_images, len(validation))))
    report: dict = {
        "data": data_dir,
        "tokenizer": tokenizer_metrics(pipe.vqvae, rows, progress=False),
        "search": retrieval_metrics(pipe.contrastive, rows, progress=False),
    }
    captions = validation.captions
    picked = random.Random(seed).sample(range(len(captions)), min(num_prompts, len(captions)))
    prompts = [captions[i] for i in picked]
    out = pipe(prompts, generator=torch.Generator(pipe.device).manual_seed(seed), show_progress=False)
    generation: dict = {"prompts": len(prompts), "mean_contrastive_score": out.scores.mean().item()}
    if (Path(data_dir) / "shapes_world.json").is_file():
        from corpora.shapes_judge import load_judge

        matches = load_judge(device=pipe.device).score(out.prompts, out.images).matches
        heldout = validation.column("heldout")
        for name, keep in (
            ("all", lambda i: True),
            ("seen", lambda i: not heldout[i]),
            ("heldout", lambda i: heldout[i]),
        ):
            chosen = [m for m, i in zip(matches, picked, strict=True) if keep(i)]
            if chosen:
                generation[f"judge_match_{name}"] = sum(chosen) / len(chosen)
    report["generation"] = generation
    return report


def to_markdown(report: dict) -> str:
    lines = [f"# vqclip evaluation\n\nData: `{report['data']}`\n"]
    for section in ("tokenizer", "search", "generation"):
        lines += [f"## {section.capitalize()}\n", "| metric | value |", "| --- | --- |"]
        for key, value in report[section].items():
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        lines.append("")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> None:
    pipe = TextToImagePipeline.from_pretrained(args.model).to(args.device)
    report = evaluate_pipeline(
        pipe, args.data, max_images=args.max_images, num_prompts=args.num_prompts, seed=args.seed
    )
    out = Path(args.out)
    atomic_write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "eval.md", to_markdown(report))
    print(to_markdown(report))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a pipeline: tokenizer, search and generation")
    parser.add_argument("--model", required=True, help="a pipeline folder")
    parser.add_argument("--data", required=True, help="an image folder with a validation split (e.g. the shapes world)")
    parser.add_argument("--out", type=output_folder, default="outputs/eval", help="folder for eval.json and eval.md")
    parser.add_argument(
        "--max-images", type=integer(1), default=1000, help="validation images for tokenizer and search"
    )
    parser.add_argument("--num-prompts", type=integer(1, 4096), default=64, help="validation captions to generate from")
    parser.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    add_device_arg(parser)
    parser.set_defaults(func=_eval)
