"""Train the VQ-VAE tokenizer.

    accelerate launch -m vqvae.train --train_data_dir data/shapes --output_dir models/vqvae \
        --preset shapes-f8 --max_train_steps 5000

Writes checkpoints under OUTPUT_DIR/checkpoints, reconstruction grids under OUTPUT_DIR/samples, and at
the end the model (config.json + model.safetensors), `reconstruction.png` and `eval.json` (PSNR, SSIM,
codebook usage, perplexity and dead codes on the validation split) in OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from common.cli import ArgumentParser
from common.data import DataConfig, collate, load_image_text
from common.metrics import psnr
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
from vqvae.evaluate import evaluate, reconstruction_grid
from vqvae.gan import VQGAN, PatchDiscriminator, adaptive_weight, hinge_discriminator_loss
from vqvae.model import PRESETS, VQVAE, VQVAEConfig
from vqvae.perceptual import LPIPS, load_lpips


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="vqvae.train", description=__doc__.splitlines()[0])
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default="f4", help="named model config")
    model.add_argument("--model_config", help="JSON object of config fields overriding the preset")
    model.add_argument("--reconstruction_loss", choices=("l1", "mse"), default="l1")
    model.add_argument("--num_grid_images", type=int, default=8, help="images in the reconstruction grid")
    gan = parser.add_argument_group("adversarial loss (off unless --disc_start_step is given)")
    gan.add_argument("--disc_start_step", type=int, default=None, help="turn the PatchGAN loss on at this step")
    gan.add_argument("--disc_weight", type=float, default=0.5, help="times the adaptive weight")
    gan.add_argument("--disc_channels", type=int, default=64)
    gan.add_argument("--disc_layers", type=int, default=3, help="fewer for small images")
    perceptual = parser.add_argument_group("perceptual loss (LPIPS; off unless --perceptual_weights is given)")
    perceptual.add_argument(
        "--perceptual_weights",
        help="torchvision's VGG16 weights (vgg16-397923af.pth): a path, or 'hub' for the torch hub cache",
    )
    perceptual.add_argument(
        "--lpips_weights", help="LPIPS's calibration (its weights/v0.1/vgg.pth); default: the lpips package's copy"
    )
    perceptual.add_argument("--perceptual_loss_weight", type=float, default=1.0, help="times the LPIPS distance")
    add_training_args(parser, learning_rate=3e-4, train_batch_size=64, max_train_steps=5000)
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> VQVAEConfig:
    """The preset at `--resolution` with the `--model_config` overrides.

    Each preset is made for one picture size and code grid; a `--resolution` that gives another grid is
    refused, naming the presets made for that size, unless `--model_config` sets the geometry itself
    ("resolution" or "channel_mult").
    """
    preset = PRESETS[args.preset]
    config = preset.replace({"resolution": args.resolution}).replace_json(args.model_config)
    overrides = json.loads(args.model_config) if args.model_config else {}
    if config.grid_size != preset.grid_size and not {"resolution", "channel_mult"} & set(overrides):
        size, grid = args.resolution, config.grid_size
        fitting = [f"{name} ({c.grid_size} x {c.grid_size})" for name, c in PRESETS.items() if c.resolution == size]
        advice = f"For {size} px take --preset {' or '.join(fitting)}" if fitting else f"No preset is for {size} px"
        raise ValueError(
            f"--resolution {size} gives preset {args.preset} a {grid} x {grid} code grid ({grid**2} codes a picture), "
            f"but {args.preset} is made for {preset.resolution} px and {preset.grid_size} x {preset.grid_size}. "
            f"""{advice}; to keep this grid, say so with --model_config '{{"resolution": {size}}}'"""
        )
    return config


def build_model(args: argparse.Namespace) -> VQVAE | VQGAN:
    """The tokenizer, wrapped with a discriminator when the adversarial loss is on."""
    vqvae = VQVAE(model_config(args))
    return (
        vqvae
        if args.disc_start_step is None
        else VQGAN(vqvae, PatchDiscriminator(args.disc_channels, args.disc_layers))
    )


def tokenizer_of(model: torch.nn.Module) -> VQVAE:
    return model.vqvae if isinstance(model, VQGAN) else model


def perceptual_loss(args: argparse.Namespace) -> LPIPS | None:
    """The frozen LPIPS network when --perceptual_weights is given; a missing file is a one-line error."""
    if args.perceptual_weights is None:
        return None
    try:
        return load_lpips(args.perceptual_weights, args.lpips_weights)
    except ValueError as err:
        raise ValueError(f"perceptual loss: {err} (--perceptual_weights PATH|hub, --lpips_weights PATH)") from None


def make_loss(args: argparse.Namespace):
    reconstruction_loss = F.l1_loss if args.reconstruction_loss == "l1" else F.mse_loss
    lpips = perceptual_loss(args)  # kept out of the model: frozen, never saved, never in the optimizer

    def compute_loss(model: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = batch["pixel_values"]
        if args.disc_start_step is None:
            out = model(pixels)
        else:
            out, fake_for_generator, real, fake = model(pixels)
        rec = reconstruction_loss(out.reconstruction, pixels)
        logs = {
            "psnr": psnr(out.reconstruction.detach(), pixels).mean(),
            "usage": out.usage.detach(),
            "perplexity": out.perplexity.detach(),
        }
        if lpips is not None:
            distance = lpips.to(pixels.device)(out.reconstruction, pixels).mean()
            rec = rec + args.perceptual_loss_weight * distance  # the adversarial weight balances against both
            logs["lpips"] = distance.detach()
        loss = rec + out.commitment_loss + out.codebook_loss
        if args.disc_start_step is not None:
            on = float(step >= args.disc_start_step)  # before the start the terms are computed but weigh nothing
            generator_loss = -fake_for_generator.mean()
            last_layer = tokenizer_of(model.module if hasattr(model, "module") else model).decoder.net[-1].weight
            weight = rec.new_zeros(())
            if on:
                weight = adaptive_weight(rec, generator_loss, last_layer) * args.disc_weight
            disc_loss = hinge_discriminator_loss(real, fake)
            loss = loss + on * (weight * generator_loss + disc_loss)
            logs.update({"g_loss": generator_loss.detach(), "d_loss": disc_loss.detach(), "g_weight": weight.detach()})
        return loss, logs

    return compute_loss


def main(argv: Sequence[str] | None = None) -> dict[str, float] | None:
    args = parse_args(argv)
    settings = TrainingConfig.from_args(args)  # refuses bad training flags before the data is read
    set_cpu_threads(settings)
    set_seed(args.seed)
    model, compute_loss = build_model(args), make_loss(args)  # bad flags and missing weights fail before the data
    data = load_image_text(DataConfig.from_args(args), seed=args.seed)
    require_validation(data.validation)
    output_dir = Path(args.output_dir)
    grid_pixels = torch.stack(
        [data.validation[i]["pixel_values"] for i in range(min(args.num_grid_images, len(data.validation)))]
    )

    def save_grid(step: int, unwrapped: torch.nn.Module) -> None:
        (output_dir / "samples").mkdir(parents=True, exist_ok=True)
        grid = reconstruction_grid(tokenizer_of(unwrapped), grid_pixels)
        grid.save(output_dir / "samples" / f"reconstruction-{step:06d}.png")

    trainer = Trainer(
        settings,
        model,
        data.train,
        compute_loss,
        collate=collate,
        hooks=TrainerHooks([(args.validation_steps, save_grid)]),
        hparams=vars(args),
    )
    trainer.fit()
    skipped = trainer.skipped(data.report)
    if not trainer.accelerator.is_main_process:
        return None
    final = trainer.save_model(tokenizer_of(trainer.unwrapped))
    reconstruction_grid(final, grid_pixels).save(output_dir / "reconstruction.png")
    metrics = evaluate(final, data.validation, batch_size=args.train_batch_size)
    return write_eval(output_dir, {**metrics, "skipped": skipped})


if __name__ == "__main__":
    run_script(main, "vqvae.train")
