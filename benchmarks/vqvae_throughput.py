"""Training throughput of a VQ-VAE preset (images/s): forward, backward and AdamW step on random pixels.

    python benchmarks/vqvae_throughput.py --preset shapes-f8 --batch-size 32

Ends with one JSON line: {"preset", "resolution", "batch_size", "params_m", "images_per_s", "seconds_per_step",
"device"}.
"""

from __future__ import annotations

import json
import time

import torch

from common.cli import ArgumentParser
from vqvae.model import PRESETS, VQVAE


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="shapes-f8")
    parser.add_argument("--resolution", type=int, default=None, help="default: the preset's picture size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.resolution = args.resolution or PRESETS[args.preset].resolution
    model = VQVAE(PRESETS[args.preset].replace({"resolution": args.resolution})).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=args.device) * 2 - 1

    def step() -> None:
        out = model(pixels)
        loss = (out.reconstruction - pixels).abs().mean() + out.commitment_loss + out.codebook_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "preset": args.preset,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "images_per_s": round(args.batch_size * args.steps / seconds, 2),
        "seconds_per_step": round(seconds / args.steps, 2),
        "device": args.device,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
