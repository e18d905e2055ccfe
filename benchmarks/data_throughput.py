"""Data at scale: start-up time and memory of tokenizer training from shards of 2,000 and of 200,000 images, the
rate shards and folders deliver pictures, and training speed from shards against cached images.

    python benchmarks/data_throughput.py                       # builds the shapes worlds under --work
    python benchmarks/data_throughput.py --large 20000         # a shorter run

The large world is `--large / --copies` rendered pictures whose shards are each written `--copies` times under new
names: rendering 200,000 pictures would take the CPU longer than every other part of the benchmark together.

Keys: `first_step_s_small` / `first_step_s_large` (process start to the first optimizer step of `vqvae.train`,
tiny preset, 64 px), `peak_rss_mb_small` / `peak_rss_mb_large` (the training process's peak memory until then),
`stream_images_per_s` (decoded, resized 64 px samples per second from shards, 2 DataLoader workers),
`folder_images_per_s` (the same from the imagefolder, read as training reads an uncached folder),
`consumed_images_per_s` (what a training step of `--preset` takes in), and `shards_steps_per_s` /
`cached_steps_per_s` (training from the shards, 2 workers, against training from `--cache_images`).
Ends with one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cli import ArgumentParser  # noqa: E402
from common.data import DataConfig, collate, load_image_text  # noqa: E402
from common.data.load import build_corpus  # noqa: E402
from common.data.shards import stats_path  # noqa: E402
from corpora import shapes  # noqa: E402


def build(out: Path, images: int, copies: int = 1) -> Path:
    """The shapes world at 64 px as shards, built once: `images // copies` rendered pictures, each shard written
    `copies` times under new names (so `images` samples in all, each with its own key)."""
    train = out / "shards" / "train"
    if not train.is_dir():
        rendered = images // copies
        build_corpus(
            lambda folder: shapes.build(folder, rendered, resolution=64, seed=0), out / "shards", "shards", 10_000
        )
        for shard in sorted(train.glob("*.tar")):
            for copy in range(1, copies):
                name = f"{copy:03d}{shard.stem}.tar"
                shutil.copyfile(shard, train / name)
                shutil.copyfile(stats_path(shard), stats_path(train / name))
    return out


def launch(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vqvae.train", *args]  # fmt: skip


def logged_steps(output_dir: Path) -> int:
    metrics = output_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def largest_rss(pid: int) -> int:
    """The resident memory of the largest process in the tree under `pid` (0 once it has ended)."""
    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    sizes = [0]
    for process in tree:
        try:
            sizes.append(process.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return max(sizes)


def run_training(args: list[str], output_dir: Path, until_step: int, times: dict[int, float]) -> float:
    """Run `vqvae.train` until `until_step` is logged, noting when each step in `times` is; returns the peak
    resident memory (MB) of the training process (the largest of the launcher's processes; workers share its
    pages)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    proc = subprocess.Popen(launch(args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        while proc.poll() is None:
            steps = logged_steps(output_dir)
            for step in times:
                if steps >= step and not times[step]:
                    times[step] = time.perf_counter() - start
            if steps >= until_step:
                break
            peak = max(peak, largest_rss(proc.pid))
            time.sleep(0.02)
        if proc.poll() is not None and logged_steps(output_dir) < until_step:
            raise RuntimeError(f"vqvae.train stopped early:\n{proc.stderr.read()[-3000:]}")
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        proc.kill()
        proc.wait()
    return peak / 2**20


def train_args(world: Path, out: Path, preset: str, extra: list[str]) -> list[str]:
    return [
        "--output_dir", str(out), "--preset", preset, "--resolution", "64", "--train_batch_size", "64",
        "--max_train_steps", "100000", "--logging_steps", "1", "--checkpointing_steps", "100000",
        "--validation_steps", "100000", "--max_validation_samples", "256", *extra,
    ]  # fmt: skip


def shard_flags(world: Path, workers: int) -> list[str]:
    return [
        "--train_shards", str(world / "shards" / "train"), "--validation_shards",
        str(world / "shards" / "validation"), "--dataloader_num_workers", str(workers),
    ]  # fmt: skip


def first_step(world: Path, work: Path, name: str) -> tuple[float, float]:
    times = {1: 0.0}
    out = work / f"first-{name}"
    # the tiny preset is made for 16 px; at 64 px it is still the cheapest model, so its 32 x 32 grid is asked for
    tiny = ["--model_config", '{"resolution": 64}', *shard_flags(world, 0)]
    peak = run_training(train_args(world, out, "tiny", tiny), out, 1, times)
    return times[1], peak


def images_per_s(config: DataConfig, images: int) -> float:
    """Decoded, resized samples per second from the configured data with 2 workers (the start-up not counted)."""
    data = load_image_text(config, progress=False).train
    if hasattr(data, "loader"):
        batches = data.loader(batch_size=64, rank=0, world_size=1, transform=None, collate=collate, batch_key=None)
    else:
        batches = iter(
            torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, num_workers=2, collate_fn=collate)
        )
    next(batches)
    start = time.perf_counter()
    for _ in range(images // 64):
        next(batches)
    return (images // 64) * 64 / (time.perf_counter() - start)


def steps_per_s(world: Path, work: Path, name: str, preset: str, flags: list[str], steps: int) -> float:
    times = {3: 0.0, 3 + steps: 0.0}
    out = work / f"speed-{name}"
    run_training(train_args(world, out, preset, flags), out, 3 + steps, times)
    return steps / (times[3 + steps] - times[3])


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/data_throughput", help="where the worlds and runs go")
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument(
        "--copies", type=int, default=10, help="the large world renders --large / --copies pictures, its shards copied"
    )
    parser.add_argument("--preset", default="f4", help="the tokenizer preset whose training speed is compared")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed for each data path")
    args = parser.parse_args()
    work = Path(args.work)
    small = build(work / f"shapes-{args.small}", args.small)
    large = build(work / f"shapes-{args.large}", args.large, args.copies)
    runs = work / "runs"
    for old in runs.glob("*/metrics.jsonl"):
        old.unlink()
    first_small, peak_small = first_step(small, runs, "small")
    first_large, peak_large = first_step(large, runs, "large")
    shard_config = DataConfig(
        train_shards=str(small / "shards" / "train"), validation_shards=str(small / "shards" / "validation"),
        dataloader_num_workers=2, max_validation_samples=64,
    )  # fmt: skip
    stream_rate = images_per_s(shard_config, 1536)
    if not (small / "folder" / "train").is_dir():
        shapes.build(small / "folder", args.small, resolution=64, seed=0)
    folder_rate = images_per_s(DataConfig(train_data_dir=str(small / "folder")), 1536)
    shards = steps_per_s(large, runs, "shards", args.preset, shard_flags(large, 2), args.steps)
    cached = ["--train_data_dir", str(small / "folder"), "--cache_images"]
    cached_rate = steps_per_s(small, runs, "cached", args.preset, cached, args.steps)
    result = {
        "first_step_s_small": round(first_small, 2),
        "first_step_s_large": round(first_large, 2),
        "peak_rss_mb_small": round(peak_small, 1),
        "peak_rss_mb_large": round(peak_large, 1),
        "stream_images_per_s": round(stream_rate, 1),
        "folder_images_per_s": round(folder_rate, 1),
        "consumed_images_per_s": round(64 * cached_rate, 1),
        "shards_steps_per_s": round(shards, 3),
        "cached_steps_per_s": round(cached_rate, 3),
        "images": [args.small, args.large],
        "large_copies": args.copies,
        "preset": args.preset,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
