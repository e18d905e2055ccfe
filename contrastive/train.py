"""Train the contrastive image-text encoder from scratch.

    accelerate launch -m contrastive.train --train_data_dir data/shapes --output_dir models/contrastive \
        --preset small --max_train_steps 3000

The loss is `open_clip.ClipLoss` with features gathered (with gradient) from every process, so each image
is contrasted with the captions of the whole global batch. Batches never hold two rows with the same
normalized caption, so identical captions are never each other's negatives. Augmentations keep captions
true: a mild random crop, and a horizontal flip only for captions that say nothing of left or right.

Writes checkpoints, `metrics.jsonl`, the model (config.json + model.safetensors) and `eval.json`
(text->image and image->text recall at 1/5/10 on the validation split) to OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import set_seed

from common.cli import ArgumentParser
from common.data import DataConfig, collate, load_image_text
from common.training import (
    Trainer,
    TrainerHooks,
    TrainingConfig,
    add_training_args,
    require_validation,
    run_script,
    set_cpu_threads,
    write_eval,
)
from contrastive.evaluate import caption_key, retrieval_metrics
from contrastive.model import PRESETS, ContrastiveModel

SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="contrastive.train", description=__doc__.splitlines()[0])
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default="small", help="named model config")
    model.add_argument("--model_config", help="JSON object of config fields overriding the preset")
    model.add_argument("--crop_scale", type=float, default=0.8, help="random crops keep at least this area")
    model.add_argument("--eval_rows", type=int, default=1000, help="validation rows for retrieval during training")
    add_training_args(parser, learning_rate=5e-4, train_batch_size=128, max_train_steps=3000, adam_weight_decay=0.1)
    args = parser.parse_args(argv)
    if not 0 < args.crop_scale <= 1:
        parser.error(f"--crop_scale must be in (0, 1], got {args.crop_scale}")
    return args


def augment(sample: dict, generator: torch.Generator, crop_scale: float) -> dict:
    """A random crop of at least `crop_scale` of the area, resized back; a flip only where it keeps the caption
    true."""
    pixels = sample["pixel_values"]
    size = pixels.shape[-1]
    scale = crop_scale + (1 - crop_scale) * torch.rand((), generator=generator).item()
    side = max(1, round(size * math.sqrt(scale)))
    top, left = (torch.randint(0, size - side + 1, (2,), generator=generator)).tolist()
    crop = pixels[:, top : top + side, left : left + side]
    if side != size:
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if not SIDE_WORDS.search(sample["text"]) and torch.rand((), generator=generator).item() < 0.5:
        crop = crop.flip(-1)
    return {**sample, "pixel_values": crop}


def make_collate(tokenizer: open_clip.SimpleTokenizer, cached_captions: int = 2**16):
    """`collate` with each caption's tokens; the tokens of the last `cached_captions` distinct captions are kept,
    since captions repeat."""

    @functools.lru_cache(maxsize=cached_captions)
    def tokens(text: str) -> torch.Tensor:
        return tokenizer([text])[0]

    def collate_with_tokens(batch: list[dict]) -> dict:
        out = collate(batch)
        out["tokens"] = torch.stack([tokens(text) for text in out["text"]])
        return out

    return collate_with_tokens


def make_loss():
    loss_fn: list[open_clip.ClipLoss] = []

    def compute_loss(model: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not loss_fn:  # built on first use, once the process group exists
            distributed = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
            loss_fn.append(open_clip.ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world))
        image, text, scale = model(batch["pixel_values"], batch["tokens"])
        loss = loss_fn[0](image, text, scale)
        with torch.no_grad():
            accuracy = ((image @ text.t()).argmax(1) == torch.arange(len(image), device=image.device)).float().mean()
        return loss, {"logit_scale": scale.detach(), "batch_acc": accuracy}

    return compute_loss


def main(argv: Sequence[str] | None = None) -> dict[str, float] | None:
    args = parse_args(argv)
    settings = TrainingConfig.from_args(args)  # refuses bad training flags before the data is read
    set_cpu_threads(settings)
    set_seed(args.seed)
    data = load_image_text(DataConfig.from_args(args), seed=args.seed)
    require_validation(data.validation)
    config = PRESETS[args.preset].replace({"resolution": args.resolution}).replace_json(args.model_config)
    model = ContrastiveModel(config)
    output_dir = Path(args.output_dir)
    eval_rows = torch.utils.data.Subset(data.validation, range(min(args.eval_rows, len(data.validation))))

    def validate(step: int, unwrapped: torch.nn.Module) -> dict[str, float]:
        metrics = retrieval_metrics(unwrapped, eval_rows, progress=False)
        return {f"val_{k}": v for k, v in metrics.items() if k.endswith(("r1", "r5"))}

    trainer = Trainer(
        settings,
        model,
        data.train,
        make_loss(),
        collate=make_collate(model.tokenizer),
        transform=lambda sample, generator: augment(sample, generator, args.crop_scale),
        hooks=TrainerHooks([(args.validation_steps, validate)]),
        batch_key=caption_key,
        hparams=vars(args),
    )
    trainer.fit()
    skipped = trainer.skipped(data.report)
    if not trainer.accelerator.is_main_process:
        return None
    final = trainer.save_model()
    metrics = retrieval_metrics(final.eval(), data.validation, batch_size=args.train_batch_size)
    return write_eval(output_dir, {**metrics, "skipped": skipped})


if __name__ == "__main__":
    run_script(main, "contrastive.train")
