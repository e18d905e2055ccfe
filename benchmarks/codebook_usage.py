"""Codebook usage of a 16,384-entry quantizer, with and without dead-code restarts, on synthetic encoder outputs.

The quantizer of a preset (by default `f16-256`: 16,384 l2-normalized 8-dimensional codes) is trained alone by
its codebook loss and Adam, on a stream of batches drawn from a fixed mixture of 256 anisotropic Gaussians in its
8-dimensional code space (stand-ins for encoder outputs; no encoder is trained). Every `--eval-every` steps,
usage is counted as `eval.json` counts it: the fraction of codes that `--eval-pictures` pictures' worth of fresh
vectors (256 x 16 x 16 by default) use. The same run without restarts (`dead_code_threshold` 0) shows what they
add. The codes that a first batch smaller than the codebook repeats restart at the next steps; a code that
falls out of use later restarts after about 350 steps unused.

    python benchmarks/codebook_usage.py [--preset f16-256] [--batch-size 4] [--steps 1000]

Ends with one JSON line: {"codebook_size", "batch_vectors", "steps", "with_restarts", "without_restarts", ...},
usage at each evaluated step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common.cli import ArgumentParser
from vqvae.model import PRESETS, VectorQuantizer


def mixture(dim: int, components: int = 256):
    """A sampler of (n, dim) vectors from a fixed Gaussian mixture with uneven weights and scales."""
    fixed = torch.Generator().manual_seed(1)
    centers = torch.randn(components, dim, generator=fixed)
    scales = torch.rand(components, dim, generator=fixed) * 0.5 + 0.05
    weights = torch.rand(components, generator=fixed) ** 2 + 0.01

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        which = torch.multinomial(weights, n, replacement=True, generator=generator)
        return centers[which] + scales[which] * torch.randn(n, dim, generator=generator)

    return sample


def run(preset: str, threshold: float, args: argparse.Namespace) -> dict[int, float]:
    """Usage on the evaluation vectors at every evaluated step of one training run."""
    config = PRESETS[preset].replace({"dead_code_threshold": threshold})
    dim, grid = config.codebook_dim, config.grid_size
    torch.manual_seed(0)
    quantizer = VectorQuantizer(dim, config.codebook_size, dim, config).train()
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=args.learning_rate)
    sample, stream = mixture(dim), torch.Generator().manual_seed(2)
    fresh = sample(args.eval_pictures * grid * grid, torch.Generator().manual_seed(3))
    evaluation = quantizer._prepare(fresh[:, :, None, None]).flatten(1)
    usage = {}
    for step in range(1, args.steps + 1):
        z = sample(args.batch_size * grid * grid, stream).reshape(args.batch_size, grid, grid, dim)
        out = quantizer(z.permute(0, 3, 1, 2))  # (B, D, grid, grid), as the encoder gives them
        optimizer.zero_grad(set_to_none=True)
        out.codebook_loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                codes = quantizer.nearest(evaluation)
            usage[step] = round(torch.bincount(codes, minlength=config.codebook_size).gt(0).float().mean().item(), 4)
            print(f"dead_code_threshold {threshold}: step {step}, usage {usage[step]}", flush=True)
    return usage


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="f16-256")
    parser.add_argument("--batch-size", type=int, default=4, help="pictures a step; each gives grid x grid vectors")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-pictures", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    args = parser.parse_args()
    start = time.perf_counter()
    config = PRESETS[args.preset]
    summary = {
        "preset": args.preset,
        "codebook_size": config.codebook_size,
        "batch_vectors": args.batch_size * config.grid_size**2,
        "steps": args.steps,
        "eval_vectors": args.eval_pictures * config.grid_size**2,
        "with_restarts": run(args.preset, config.dead_code_threshold, args),
        "without_restarts": run(args.preset, 0.0, args),
    }
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
