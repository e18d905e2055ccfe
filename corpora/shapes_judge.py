"""The judge: a small CNN that reads every attribute of a shapes-world picture back out of it.

It is trained only on fresh renders from `corpora.shapes.render`, augmented with blur, noise, color jitter
and JPEG re-encoding so that it reads a slightly soft picture the way a person would. It shares no code
with the generative models it scores.

Training scenes and evaluation scenes come from separate random streams (`TRAIN_STREAM`, `EVAL_STREAM`),
so the images `check` and the benchmark read were never seen in training, whatever the seeds.
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.config import Config, ConfigError
from common.hub import PretrainedModel
from corpora.shapes import ATTRIBUTES, blur, parse_prompt, render, sample_scene

IMAGE_SIZE = 64
RELEASED = Path(__file__).parent / "weights" / "shapes_judge"
TRAIN_STREAM, EVAL_STREAM, _AUGMENT_STREAM = 0, 1, 2
_STREAM_TAG = 0x5A4A  # keeps these random streams apart from the corpus builder's
MIN_ACCURACY = 0.99
EVAL_BLUR = 1.0  # px at 64 px, scaled with the picture
ATTRIBUTE_TRIPLE = ("color", "shape", "background")  # what a prompt such as "a blue ball on grass" names


@dataclass
class JudgeConfig(Config):
    """Channels of the four convolution stages and the width of the shared hidden layer."""

    channels: tuple[int, ...] = (32, 64, 96, 64)
    hidden: int = 160

    limits: ClassVar[dict[str, tuple[float, float]]] = {"channels": (4, 256), "hidden": (8, 1024)}

    def validate(self) -> None:
        super().validate()
        if len(self.channels) != 4:
            raise ConfigError(f"config field 'channels': expected 4 stages, got {len(self.channels)}")


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    pad = (kernel - 1) // 2 if kernel % 2 else kernel // 2 - 1
    return [
        nn.Conv2d(cin, cout, kernel, stride, pad, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class ShapesJudge(PretrainedModel):
    """64 px image -> one logit vector per attribute of `corpora.shapes.ATTRIBUTES`."""

    config_class = JudgeConfig

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__(config)
        c1, c2, c3, c4 = config.channels
        self.features = nn.Sequential(
            *_conv(3, c1, kernel=4, stride=2),  # 32 px
            *_conv(c1, c1),
            *_conv(c1, c2, stride=2),  # 16 px
            *_conv(c2, c2),
            *_conv(c2, c3, stride=2),  # 8 px
            *_conv(c3, c4, stride=2),  # 4 px: flattened, so position stays readable
            nn.Flatten(),
            nn.Linear(c4 * (IMAGE_SIZE // 16) ** 2, config.hidden),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(config.hidden, len(v)) for name, v in ATTRIBUTES.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`pixels`: uint8 or float in [0, 255], shape (B, 64, 64, 3). Returns logits per attribute."""
        x = pixels.to(self.heads["color"].weight.device, torch.float32).permute(0, 3, 1, 2)
        hidden = self.features((x - 127.5) / 64.0)
        return {name: head(hidden) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: list[Image.Image], batch_size: int = 256) -> np.ndarray:
        """Label indices (N, len(ATTRIBUTES)) read from images of any size or mode (resized to 64 px)."""
        was_training = self.training
        self.eval()
        rows = [np.zeros((0, len(ATTRIBUTES)), np.int64)]
        for start in range(0, len(images), batch_size):
            batch = np.stack([to_array(image) for image in images[start : start + batch_size]])
            logits = self(torch.from_numpy(batch))
            rows.append(torch.stack([logits[name].argmax(dim=1) for name in ATTRIBUTES], dim=1).cpu().numpy())
        self.train(was_training)
        return np.concatenate(rows)

    def read(self, images: list[Image.Image]) -> list[dict[str, str]]:
        """The attributes read from each image, e.g. {"color": "red", "shape": "ball", ...}."""
        rows = self.predict(images).tolist()
        return [{name: ATTRIBUTES[name][i] for name, i in zip(ATTRIBUTES, row, strict=True)} for row in rows]

    def agreement(
        self, originals: list[Image.Image], copies: list[Image.Image], attributes: tuple[str, ...] = ATTRIBUTE_TRIPLE
    ) -> dict[str, list[bool]]:
        """Per attribute, whether the judge reads the same value from each copy (e.g. a reconstruction) as from
        its original."""
        if len(originals) != len(copies):
            raise ValueError(f"got {len(originals)} originals but {len(copies)} copies")
        pairs = list(zip(self.read(originals), self.read(copies), strict=True))
        return {name: [a[name] == b[name] for a, b in pairs] for name in attributes}

    def score(self, prompts: list[str], images: list[Image.Image]) -> JudgeScore:
        """Whether each image shows every attribute its prompt names (a prompt naming none always matches)."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        readings = self.read(images)
        missing = [
            tuple(name for name, value in parse_prompt(prompt).items() if reading[name] != value)
            for prompt, reading in zip(prompts, readings, strict=True)
        ]
        matches = [not names for names in missing]
        return JudgeScore(matches, sum(matches) / len(matches) if matches else 0.0, readings, missing)


@dataclass
class JudgeScore:
    """Per image: whether it matches its prompt, what the judge read, and which attributes the prompt names that
    it did not read back (e.g. ("color",)); plus the fraction that match."""

    matches: list[bool]
    match_rate: float
    readings: list[dict[str, str]]
    missing: list[tuple[str, ...]]


def to_array(image: Image.Image) -> np.ndarray:
    """An image as uint8 (64, 64, 3) RGB."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_judge(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> ShapesJudge:
    """Load a judge from a model directory; None loads the released one."""
    return ShapesJudge.from_pretrained(RELEASED if path is None else path, device=device)


# ---------------------------------------------------------------- data


def _render_one(key: tuple[int, int, int], resolution: int = IMAGE_SIZE) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng([_STREAM_TAG, *key])
    scene = sample_scene(rng)
    labels = [ATTRIBUTES[name].index(getattr(scene, name)) for name in ATTRIBUTES]
    return np.asarray(render(scene, resolution, rng)), labels


def render_set(
    num_images: int,
    seed: int,
    stream: int,
    workers: int | None = None,
    progress: bool = True,
    resolution: int = IMAGE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Fresh renders of random scenes: uint8 images (N, resolution, resolution, 3) and labels (N,
    len(ATTRIBUTES)). The scenes depend on the seed and stream alone, not on the resolution."""
    from tqdm.auto import tqdm

    if num_images < 1:
        raise ValueError(f"the number of images must be at least 1, got {num_images}")
    keys = [(stream, seed, i) for i in range(num_images)]
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    bar = tqdm(total=num_images, desc="rendering", unit="img", disable=not progress, leave=False)
    rows = []
    render_one = partial(_render_one, resolution=resolution)
    if workers > 1 and num_images >= 1000:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for row in pool.imap(render_one, keys, chunksize=128):
                rows.append(row)
                bar.update()
    else:
        for key in keys:
            rows.append(render_one(key))
            bar.update()
    bar.close()
    return np.stack([image for image, _ in rows]), np.asarray([labels for _, labels in rows], np.int64)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soften a crisp render: Gaussian blur, small color jitter, additive noise, JPEG re-encoding."""
    picture = Image.fromarray(image)
    if rng.random() < 0.8:
        picture = blur(picture, rng.uniform(0.0, 1.5))
    x = np.asarray(picture, np.float32) * rng.uniform(0.95, 1.05) + rng.uniform(-6.0, 6.0, 3)
    if rng.random() < 0.5:
        x += rng.normal(0.0, rng.uniform(1.0, 8.0), x.shape)
    x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        Image.fromarray(x).save(buffer, "JPEG", quality=int(rng.integers(30, 96)))
        x = np.asarray(Image.open(buffer).convert("RGB"))
    return x


# ---------------------------------------------------------------- training and checking


def _batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless augmented batches drawn from the pool, each pass in a fresh random order."""
    order = np.zeros(0, np.int64)
    while True:
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(images))])
        idx, order = order[:batch_size], order[batch_size:]
        pixels = np.stack([augment(images[i], rng) for i in idx])
        yield torch.from_numpy(pixels), torch.from_numpy(labels[idx])


def train(
    out: str | os.PathLike,
    steps: int = 800,
    batch_size: int = 128,
    seed: int = 0,
    pool_size: int = 20_000,
    lr: float = 3e-3,
    workers: int | None = None,
    config: JudgeConfig | None = None,
    threads: int = 1,
    progress: bool = True,
) -> list[float]:
    """Train a judge on a pool of fresh renders, augmented anew at every step; save it to `out`.

    Batches are augmented in a background thread while torch computes with `threads` threads (one by
    default: it leaves a core to augmentation and holds up far better on busy shared cores). Returns the
    training loss of every step.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if min(steps, batch_size, threads) < 1:
        raise ValueError(f"steps, batch size and threads must be positive: {steps}, {batch_size}, {threads}")
    torch.manual_seed(seed)
    images, labels = render_set(pool_size, seed, TRAIN_STREAM, workers, progress)
    rng = np.random.default_rng([_STREAM_TAG, _AUGMENT_STREAM, seed])
    batches = _batches(images, labels, batch_size, rng)
    model = ShapesJudge(config or JudgeConfig()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    losses: list[float] = []
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ThreadPoolExecutor(1) as prefetch:
            pending = prefetch.submit(next, batches)
            bar = tqdm(range(steps), desc="training judge", unit="step", disable=not progress)
            for step in bar:
                pixels, targets = pending.result()
                if step + 1 < steps:
                    pending = prefetch.submit(next, batches)
                logits = model(pixels)
                loss = sum(F.cross_entropy(logits[name], targets[:, k]) for k, name in enumerate(ATTRIBUTES))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    finally:
        torch.set_num_threads(default_threads)
    model.eval().save_pretrained(out)
    return losses


def accuracy(
    judge: ShapesJudge,
    num_images: int,
    seed: int,
    workers: int | None = None,
    progress: bool = True,
    resolution: int = IMAGE_SIZE,
) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy on fresh evaluation renders of `resolution` px, crisp and blurred (sigma 1 px at
    64 px, 2 px at 128 px); the judge reads them resized to its 64 px."""
    images, labels = render_set(num_images, seed, EVAL_STREAM, workers, progress, resolution)
    crisp = [Image.fromarray(image) for image in images]
    sigma = EVAL_BLUR * resolution / IMAGE_SIZE
    result = {}
    for condition, pictures in (("crisp", crisp), ("blurred", [blur(p, sigma) for p in crisp])):
        correct = (judge.predict(pictures) == labels).mean(axis=0)
        result[condition] = {name: float(correct[k]) for k, name in enumerate(ATTRIBUTES)}
    return result


def format_table(result: dict[str, dict[str, float]]) -> str:
    """Accuracy per attribute (rows) and condition (columns)."""
    conditions = list(result)
    lines = [f"{'attribute':<12}" + "".join(f"{c:>10}" for c in conditions)]
    for name in ATTRIBUTES:
        lines.append(f"{name:<12}" + "".join(f"{result[c][name]:>10.4f}" for c in conditions))
    return "\n".join(lines)


def check(
    model: str | os.PathLike | None = None, num_images: int = 1000, seed: int = 1, resolution: int = IMAGE_SIZE
) -> None:
    """Print the judge's accuracy table on renders of `resolution` px; raise ValueError naming any attribute
    below 0.99."""
    result = accuracy(load_judge(model), num_images, seed, resolution=resolution)
    print(format_table(result))
    failing = [
        f"{name} ({condition} {result[condition][name]:.4f})"
        for condition in result
        for name in ATTRIBUTES
        if result[condition][name] < MIN_ACCURACY
    ]
    if failing:
        raise ValueError(f"judge accuracy below {MIN_ACCURACY} for {', '.join(failing)}")


def _train_cli(args: argparse.Namespace) -> None:
    import time

    start = time.perf_counter()
    losses = train(
        args.out,
        args.steps,
        args.batch_size,
        args.seed,
        pool_size=args.pool_size,
        workers=args.workers,
        threads=args.threads,
    )
    minutes = (time.perf_counter() - start) / 60
    print(f"saved the judge to {args.out} (final loss {np.mean(losses[-20:]):.4f}, {minutes:.1f} min)")


def _check_cli(args: argparse.Namespace) -> None:
    check(args.model, args.num_images, args.seed, args.resolution)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `judge train` and `judge check`."""
    judge = subparsers.add_parser("judge", help="train or check the shapes-world attribute classifier")
    commands = judge.add_subparsers(dest="judge_command", required=True)
    fit = commands.add_parser("train", help="train a judge on fresh renders")
    from common.cli import output_folder

    fit.add_argument("--out", type=output_folder, required=True, help="model directory to write")
    fit.add_argument("--steps", type=int, default=800)
    fit.add_argument("--batch-size", type=int, default=128)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--pool-size", type=int, default=20_000, help="fresh renders to draw batches from")
    fit.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    fit.add_argument("--threads", type=int, default=1, help="torch threads (augmentation runs beside them)")
    fit.set_defaults(func=_train_cli)
    test = commands.add_parser("check", help="per-attribute accuracy on unseen renders, crisp and blurred")
    test.add_argument("--model", default=None, help="model directory (default: the released judge)")
    test.add_argument("--num-images", type=int, default=1000)
    test.add_argument("--seed", type=int, default=1)
    test.add_argument("--resolution", type=int, default=IMAGE_SIZE, help="size of the renders it reads")
    test.set_defaults(func=_check_cli)
