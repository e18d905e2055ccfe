"""Training throughput and peak memory of one stage's model: forward, backward and AdamW steps on random inputs.

    python benchmarks/train_throughput.py --stage vqvae --preset f16-256 --batch 16 --mixed-precision bf16
    python benchmarks/train_throughput.py --stage contrastive --preset base --resolution 256 --patch-size 16
    python benchmarks/train_throughput.py --stage prior --preset base --grid 16 --codebook-size 16384

The model alone, without data loading: the tokenizer's step is its reconstruction, commitment and codebook
losses (no discriminator, no perceptual loss), the contrastive model's open_clip's ClipLoss, the prior's next-code
cross entropy. `--mixed-precision bf16` runs the forward passes under autocast (the tokenizer's nearest-code
search stays float32). Peak memory is `torch.cuda.max_memory_allocated` over the timed steps, or on a CPU the
process's peak resident size.

Ends with one JSON line: `stage`, `preset`, `weights`, `batch`, `images_per_s`, `seconds_per_step`, `peak_mb`,
and the settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

from contrastive.model import PRESETS as CONTRASTIVE_PRESETS
from contrastive.model import ContrastiveModel
from prior.model import PRESETS as PRIOR_PRESETS
from prior.model import Prior
from vqvae.model import PRESETS as VQVAE_PRESETS
from vqvae.model import VQVAE

PRESETS = {"vqvae": VQVAE_PRESETS, "contrastive": CONTRASTIVE_PRESETS, "prior": PRIOR_PRESETS}


def stage_step(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """The model and a function computing the loss of one batch."""
    g = torch.Generator().manual_seed(0)
    device = args.device
    if args.stage == "vqvae":
        config = VQVAE_PRESETS[args.preset]
        if args.resolution:
            config = config.replace({"resolution": args.resolution})
        model = VQVAE(config)
        pixels = (torch.rand(args.batch, 3, config.resolution, config.resolution, generator=g) * 2 - 1).to(device)

        def loss() -> torch.Tensor:
            out = model(pixels)
            return (out.reconstruction.float() - pixels).abs().mean() + out.commitment_loss + out.codebook_loss

    elif args.stage == "contrastive":
        changes = {k: v for k, v in (("resolution", args.resolution), ("patch_size", args.patch_size)) if v}
        config = CONTRASTIVE_PRESETS[args.preset].replace(changes)
        model = ContrastiveModel(config)
        r = config.resolution
        pixels = (torch.rand(args.batch, 3, r, r, generator=g) * 2 - 1).to(device)
        tokens = torch.randint(1, 1000, (args.batch, config.context_length), generator=g).to(device)
        clip_loss = open_clip.ClipLoss()

        def loss() -> torch.Tensor:
            image, text, scale = model(pixels, tokens)
            return clip_loss(image.float(), text.float(), scale)

    else:
        config = PRIOR_PRESETS[args.preset].replace(
            {
                "grid_size": args.grid,
                "codebook_size": args.codebook_size,
                "text_width": args.text_width,
                "text_length": args.text_length,
            }
        )
        model = Prior(config)
        codes = torch.randint(0, config.codebook_size, (args.batch, config.num_codes), generator=g).to(device)
        features = torch.randn(args.batch, config.text_length, config.text_width, generator=g).to(device)

        def loss() -> torch.Tensor:
            return model(codes, features, targets=codes)[1]

    model.to(device).train()
    if args.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    return model, loss


def peak_resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(PRESETS), required=True)
    parser.add_argument("--preset", required=True, help="a preset of the stage")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=None, help="pictures (default: the preset's)")
    parser.add_argument("--patch-size", type=int, default=None, help="contrastive: the vision patch size")
    parser.add_argument("--grid", type=int, default=16, help="prior: codes per side")
    parser.add_argument("--codebook-size", type=int, default=16384, help="prior")
    parser.add_argument("--text-width", type=int, default=256, help="prior: the text encoder's width")
    parser.add_argument("--text-length", type=int, default=32, help="prior: the text encoder's context length")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after 2 untimed ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.preset not in PRESETS[args.stage]:
        parser.error(f"--preset for {args.stage}: one of {', '.join(PRESETS[args.stage])}")
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model, compute_loss = stage_step(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
    device_type = torch.device(args.device).type
    bf16 = args.mixed_precision == "bf16"

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = compute_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: kernels chosen, optimizer state allocated
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_resident_mb()
    result = {
        "benchmark": "train_throughput",
        "stage": args.stage,
        "preset": args.preset,
        "weights": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "images_per_s": round(args.batch / seconds, 2),
        "seconds_per_step": round(seconds, 4),
        "peak_mb": round(peak, 1),
        "device": args.device,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
