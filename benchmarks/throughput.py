"""Training speed of a stage through its training script, against the pure step of its model (the ceiling).

    python benchmarks/throughput.py --stage contrastive --data data/shapes
    python benchmarks/throughput.py --stage tokenizer
    python benchmarks/throughput.py --stage prior

The training side runs the stage's training script (`contrastive.train`, `vqvae.train`, `prior.train`) as a user
does, with `accelerate launch` in one process, on a shapes-world imagefolder (`--data`, else one of `--num-images`
built in a temporary folder) with `--cache_images`, and reads the step times it logs in `metrics.jsonl` after
`--warmup` steps. The ceiling is the same model's forward, loss, backward, gradient clipping and optimizer step
(the optimizer the Trainer makes) on one random batch held in memory, with nothing else, in this process. Both
sides run `--rounds` times, interleaved, so that other load on the machine slows them alike: the ceiling on
`--threads` threads (default: all cores), the script on as many as it takes by default (`--cpu_threads` with
`--threads`), which the result names.

Ends with one JSON line: {"stage", "preset", "batch_size", "threads", "train_threads", "train_samples_per_s",
"ceiling_samples_per_s", "ratio", "rounds": [[train, ceiling], ...], "load_average": [before, after], ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.training import TrainingConfig, make_optimizer  # noqa: E402


@dataclass
class Stage:
    """How to train one stage through its script, and how to take its pure step."""

    preset: str
    batch_size: int
    module: str  # the training script, run as `accelerate launch -m module`
    flags: Callable[[argparse.Namespace, Path], list[str]]  # the stage's own flags (frozen stages, ...)
    ceiling: Callable[[Stage, argparse.Namespace, Path], tuple[torch.nn.Module, Callable[[], torch.Tensor]]]
    defaults: TrainingConfig  # the optimizer settings of the stage's script


def timed_steps(model: torch.nn.Module, loss: Callable[[], torch.Tensor], settings: TrainingConfig, steps: int):
    """A function that runs `steps` pure training steps and returns their seconds: forward and loss, backward,
    clipping at `max_grad_norm`, the optimizer's step, as the Trainer takes them, and nothing else."""
    optimizer = make_optimizer(model.train(), settings)

    def run(n: int = steps) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss().backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run


def script_seconds_per_step(
    stage: Stage, args: argparse.Namespace, work: Path, data: Path, run: int
) -> tuple[float, int | None]:
    """Run the stage's training script for `warmup + steps` steps with `accelerate launch`; the mean wall time of
    the steps after the warm-up, from the `step_seconds` it logs every `warmup` steps, and the torch threads it
    says it took (None on a GPU)."""
    out = work / f"{stage.module}-{run}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
    argv = [
        "--train_data_dir", str(data), "--output_dir", str(out), "--preset", stage.preset, "--cache_images",
        "--max_validation_samples", "64",
        "--train_batch_size", str(stage.batch_size), "--max_train_steps", str(args.warmup + args.steps),
        "--logging_steps", str(args.warmup), "--checkpointing_steps", "1000000", "--validation_steps", "1000000",
        "--lr_warmup_steps", "0", "--seed", str(args.seed), *stage.flags(args, work),
        *(["--cpu_threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # as on a machine where nobody set it
    result = subprocess.run(
        [*launcher, "-m", stage.module, *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise SystemExit(f"{stage.module} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    threads = re.search(r"torch threads: (\d+)", result.stdout)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [
        (row["step"], row["step_seconds"]) for row in logged if row["step"] > args.warmup and "step_seconds" in row
    ]
    seconds, previous = 0.0, args.warmup
    for step, per_step in timed:  # each log covers the steps since the previous one
        seconds += per_step * (step - previous)
        previous = step
    return seconds / (previous - args.warmup), int(threads.group(1)) if threads else None


# ---------------------------------------------------------------- the stages


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the training script trains too
RESOLUTION = 64  # of the shapes world both sides train on


def _captions(n: int) -> list[str]:
    return [f"a caption of picture {i}" for i in range(n)]


def _contrastive_ceiling(stage: Stage, args: argparse.Namespace, work: Path):
    import open_clip

    from contrastive.model import PRESETS, ContrastiveModel

    torch.manual_seed(args.seed)
    model = ContrastiveModel(PRESETS[stage.preset].replace({"resolution": RESOLUTION})).to(DEVICE)
    b, r = stage.batch_size, model.config.resolution
    pixels = torch.rand(b, 3, r, r, device=DEVICE) * 2 - 1
    tokens = model.tokenize(_captions(b))
    clip_loss = open_clip.ClipLoss()
    return model, lambda: clip_loss(*model(pixels, tokens))


def _tokenizer_ceiling(stage: Stage, args: argparse.Namespace, work: Path):
    import torch.nn.functional as F

    from vqvae.model import PRESETS, VQVAE

    torch.manual_seed(args.seed)
    model = VQVAE(PRESETS[stage.preset].replace({"resolution": RESOLUTION})).to(DEVICE)
    b, r = stage.batch_size, model.config.resolution
    pixels = torch.rand(b, 3, r, r, device=DEVICE) * 2 - 1

    def loss() -> torch.Tensor:
        out = model(pixels)
        return F.l1_loss(out.reconstruction, pixels) + out.commitment_loss + out.codebook_loss

    return model, loss


def _frozen_stages(work: Path) -> tuple[Path, Path]:
    """An untrained tokenizer and contrastive model for the prior to be conditioned on (speed does not depend
    on what they learned)."""
    from contrastive.model import PRESETS as CONTRASTIVE
    from contrastive.model import ContrastiveModel
    from vqvae.model import PRESETS as TOKENIZERS
    from vqvae.model import VQVAE

    vqvae, contrastive = work / "vqvae", work / "contrastive"
    if not (vqvae / "config.json").is_file():
        torch.manual_seed(0)
        VQVAE(TOKENIZERS[PRIOR_TOKENIZER]).save_pretrained(vqvae)
        ContrastiveModel(CONTRASTIVE[PRIOR_TEXT_ENCODER]).save_pretrained(contrastive)
    return vqvae, contrastive


def _prior_flags(args: argparse.Namespace, work: Path) -> list[str]:
    vqvae, contrastive = _frozen_stages(work)
    return ["--vqvae", str(vqvae), "--contrastive", str(contrastive), "--codes_cache", str(work / "codes")]


def _prior_ceiling(stage: Stage, args: argparse.Namespace, work: Path):
    from contrastive.model import ContrastiveModel
    from prior.model import Prior
    from prior.train import parse_args, prior_config
    from vqvae.model import VQVAE

    vqvae, contrastive = _frozen_stages(work)
    flags = ["--output_dir", str(work / "unused"), "--train_data_dir", "unused", "--preset", stage.preset]
    encoder = ContrastiveModel.from_pretrained(contrastive, DEVICE)
    tokenizer = VQVAE.from_pretrained(vqvae).config
    config = prior_config(parse_args([*flags, *_prior_flags(args, work)]), tokenizer, encoder.config)
    torch.manual_seed(args.seed)
    model = Prior(config).to(DEVICE)
    b = stage.batch_size
    codes = torch.randint(0, config.codebook_size, (b, config.grid_size**2), device=DEVICE)
    with torch.no_grad():
        features, mask = encoder.text_token_features(_captions(b))
    drop = torch.rand(b, device=DEVICE) < config.cond_drop_prob
    return model, lambda: model(codes, features, targets=codes, text_mask=mask, drop=drop)[1]


PRIOR_TOKENIZER, PRIOR_TEXT_ENCODER = "f4", "mini"  # the released model's CPU-sized siblings


def _stages() -> dict[str, Stage]:
    import importlib

    def defaults(module: str, flags: Sequence[str] = ()) -> TrainingConfig:
        argv = ["--output_dir", "unused", "--train_data_dir", "unused", *flags]
        return TrainingConfig.from_args(importlib.import_module(module).parse_args(argv))

    return {
        "contrastive": Stage("base", 64, "contrastive.train", lambda a, w: [], _contrastive_ceiling,
                             defaults("contrastive.train")),
        "tokenizer": Stage("f4", 32, "vqvae.train", lambda a, w: [], _tokenizer_ceiling, defaults("vqvae.train")),
        "prior": Stage("small", 16, "prior.train", _prior_flags, _prior_ceiling,
                       defaults("prior.train", ["--vqvae", "unused", "--contrastive", "unused"])),
    }  # fmt: skip


def build_shapes(folder: Path, num_images: int, resolution: int) -> Path:
    from corpora.shapes import build

    if not (folder / "train" / "metadata.jsonl").is_file():
        build(folder, num_images, resolution=resolution, seed=0, progress=False)
    return folder


def main(argv: Sequence[str] | None = None, stage_name: str | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if stage_name is None:
        parser.add_argument("--stage", choices=("contrastive", "tokenizer", "prior"), required=True)
    parser.add_argument("--data", type=Path, help="a 64-px shapes-world folder (default: build one)")
    parser.add_argument("--num-images", type=int, default=1200, help="the size of the world built without --data")
    parser.add_argument(
        "--work", type=Path, help="keep the runs, the world built and the prior's frozen stages and codes here"
    )
    parser.add_argument("--preset", help="the model preset (default: the stage's)")
    parser.add_argument("--batch-size", type=int, help="default: the stage's")
    parser.add_argument("--threads", type=int, help="torch threads of both sides (default: each side's own choice)")
    parser.add_argument("--warmup", type=int, default=5, help="steps of each training run left out")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each side in each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    name = stage_name or args.stage
    if args.threads:
        torch.set_num_threads(args.threads)
    stage = _stages()[name]
    stage.preset = args.preset or stage.preset
    stage.batch_size = args.batch_size or stage.batch_size
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = args.data or build_shapes(work / "shapes", args.num_images, RESOLUTION)
        model, loss = stage.ceiling(stage, args, work)
        ceiling = timed_steps(model, loss, stage.defaults, args.steps)
        ceiling(2)  # warm-up
        rounds, train_threads = [], None
        for r in range(args.rounds):  # A B, B A, ...: neither side always runs first
            sides = {}
            for side in ("train", "ceiling") if r % 2 == 0 else ("ceiling", "train"):
                if side == "train":
                    sides[side], train_threads = script_seconds_per_step(stage, args, work, data, r)
                else:
                    sides[side] = ceiling() / args.steps
            rounds.append([round(stage.batch_size / sides["train"], 2), round(stage.batch_size / sides["ceiling"], 2)])
    train = math.fsum(b for b, _ in rounds) / len(rounds)
    top = math.fsum(c for _, c in rounds) / len(rounds)
    result = {
        "stage": name,
        "preset": stage.preset,
        "batch_size": stage.batch_size,
        "threads": torch.get_num_threads(),
        "train_threads": train_threads,
        "train_samples_per_s": round(train, 2),
        "ceiling_samples_per_s": round(top, 2),
        "ratio": round(train / top, 3),
        "rounds": rounds,
        "steps": args.steps,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "device": DEVICE.type,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
