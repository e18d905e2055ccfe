"""Memory of a prior training step with and without activation checkpointing, and bf16 autocast against float32.

    python benchmarks/train_memory.py                                   # prior large, 32x32 codes, batch 4 (CPU)
    python benchmarks/train_memory.py --preset xl --batch 16 --device cuda

Each measurement runs in a fresh process. The memory figure is the peak, above the model's weights, of one forward
and backward pass (activations, the logits and the gradients; the optimizer's state is the same with or without
checkpointing and is left out): on a GPU `torch.cuda.max_memory_allocated`, on a CPU the process's peak resident
size (VmHWM, reset before the step) with glibc returning every large block to the system as soon as it is freed.
The precision check trains `--steps` AdamW steps from the same weights on the same batch (codes with a pattern a
prior learns quickly) in float32 and under bf16 autocast, and compares the last step's loss.

Ends with one JSON line: `plain_mb`, `checkpointed_mb`, `ratio` (checkpointed / plain), `fp32_loss`,
`bf16_loss`, `loss_rel_diff`, and the settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from prior.model import PRESETS, Prior

MB = 2**20


def build(args: argparse.Namespace) -> Prior:
    config = PRESETS[args.preset].replace(
        {
            "codebook_size": args.codebook_size,
            "grid_size": args.grid,
            "text_width": args.text_width,
            "text_length": args.text_length,
            "cond_drop_prob": 0.0,
        }
    )
    torch.manual_seed(0)
    return Prior(config).to(args.device).train()


def batch(model: Prior, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes that repeat a short random pattern along each row (learnable in a few steps), and text features."""
    c = model.config
    g = torch.Generator().manual_seed(1)
    pattern = torch.randint(0, c.codebook_size, (args.batch, 1, 8), generator=g)
    codes = pattern.repeat(1, c.num_codes // 8 + 1, 1).flatten(1)[:, : c.num_codes]
    features = torch.randn(args.batch, c.text_length, c.text_width, generator=g)
    return codes.to(args.device), features.to(args.device)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(args: argparse.Namespace) -> float:
    """MB above the weights at the peak of one forward and backward pass."""
    model = build(args)
    model.set_gradient_checkpointing(args.checkpointed)
    codes, features = batch(model, args)
    # a first pass on one row loads the code and threads that any first pass loads; it is freed before the step
    _, loss = model(codes[:1], features[:1], targets=codes[:1])
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        before = _status("VmRSS")
    _, loss = model(codes, features, targets=codes)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MB
    return (_status("VmHWM") - before) / MB


def train_loss(args: argparse.Namespace) -> float:
    """The loss at the last of `--steps` AdamW steps, in float32 or under bf16 autocast."""
    model = build(args)
    codes, features = batch(model, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    device_type = torch.device(args.device).type
    loss = None
    for _ in range(args.steps):
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with autocast:
            _, loss = model(codes, features, targets=codes)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_child(args: argparse.Namespace, *flags: str) -> float:
    """Run one measurement in a fresh process (so that earlier ones leave no memory behind); returns its figure."""
    command = [sys.executable, __file__, *sys.argv[1:], "--child", *flags]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"measurement {flags} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="large")
    parser.add_argument("--grid", type=int, default=32, help="codes per side (32: 1,024 codes)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--text-width", type=int, default=256)
    parser.add_argument("--text-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="training steps before the losses are compared")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(train_loss(args) if args.loss else measure_memory(args))
        return
    start = time.perf_counter()
    plain = run_child(args)
    checkpointed = run_child(args, "--checkpointed")
    fp32 = run_child(args, "--loss")
    bf16 = run_child(args, "--loss", "--bf16")
    with torch.device("meta"):
        weights = sum(p.numel() for p in build(argparse.Namespace(**{**vars(args), "device": "meta"})).parameters())
    result = {
        "benchmark": "train_memory",
        "preset": args.preset,
        "weights": weights,
        "codes": args.grid**2,
        "batch": args.batch,
        "device": args.device,
        "plain_mb": round(plain, 1),
        "checkpointed_mb": round(checkpointed, 1),
        "ratio": round(checkpointed / plain, 3),
        "steps": args.steps,
        "fp32_loss": round(fp32, 4),
        "bf16_loss": round(bf16, 4),
        "loss_rel_diff": round(abs(bf16 - fp32) / fp32, 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
