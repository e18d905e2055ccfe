"""Search speed of an `ImageIndex`: one top-10 query over 1,000,000 float16 embeddings, against one full read.

    python benchmarks/search_speed.py [--n 1000000] [--dim 256] [--images 300] [--preset small]

`read_s` is one full read of `embeddings.safetensors` into memory (its bytes, just written, so from the page
cache; `safetensors.torch.load_file` maps the file lazily and would time nothing), `query_s` one top-10 search of
the loaded index (both the median of `--repeats` runs, the search after a warm-up), `ratio` = query_s / read_s;
the bar is ratio <= 2. `build_images_per_s` is the throughput of `ImageIndex.add` on a shapes-world folder of `--images`
images (data layer scan, decoding and encoding) with a `contrastive.model` preset.
Ends with one JSON line: {"n", "query_s", "read_s", "ratio", "build_images_per_s"}.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import ArgumentParser
from contrastive.index import CHUNK_SIZE, EMBEDDINGS_NAME, ImageIndex
from corpora import shapes


def _random_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) float16 unit vectors, made CHUNK_SIZE rows at a time."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.empty(n, dim, dtype=torch.float16)
    for start in range(0, n, CHUNK_SIZE):
        rows = min(CHUNK_SIZE, n - start)
        embeddings[start : start + rows] = F.normalize(torch.randn(rows, dim, generator=generator), dim=1)
    return embeddings


def _median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _build_throughput(folder: Path, num_images: int, preset: str) -> float | None:
    """Images per second that `ImageIndex.add` indexes with the preset's (untrained) model, or None."""
    try:
        from contrastive.model import PRESETS, ContrastiveModel
    except ImportError as err:
        print(f"contrastive.model is not importable ({err}): build_images_per_s not measured", file=sys.stderr)
        return None
    torch.manual_seed(0)
    model = ContrastiveModel(PRESETS[preset]).eval()
    resolution = model.config.resolution
    shapes.build(folder, num_images, resolution=resolution, seed=0, workers=1, progress=False)
    index = ImageIndex.empty(model)
    start = time.perf_counter()
    report = index.add(folder, progress=False)
    return report.kept / (time.perf_counter() - start)


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="embeddings in the index")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=300, help="shapes-world images for the build throughput")
    parser.add_argument("--preset", default="small", help="contrastive.model preset for the build throughput")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        info = {"model_class": "random", "config": {"embed_dim": args.dim}, "save_id": None, "dir": None}
        sources = [f"random:{i}" for i in range(args.n)]
        ImageIndex(_random_embeddings(args.n, args.dim, args.seed), sources, [""] * args.n, info).save(tmp)
        read_s = _median_seconds((Path(tmp) / EMBEDDINGS_NAME).read_bytes, args.repeats)
        index = ImageIndex.load(tmp)
        query = F.normalize(torch.randn(args.dim, generator=torch.Generator().manual_seed(args.seed + 1)), dim=0)
        index.search_embedding(query, args.k)  # warm-up
        query_s = _median_seconds(lambda: index.search_embedding(query, args.k), args.repeats)
        backend = index.backend if index.backend == "faiss" else f"torch, {index.chunk_size} rows a chunk"
        build_images_per_s = _build_throughput(Path(tmp) / "shapes", args.images, args.preset)

    print(
        f"{args.n:,} x {args.dim} float16 embeddings: one full read {read_s:.3f} s, one top-{args.k} search "
        f"{query_s:.3f} s ({backend}), ratio {query_s / read_s:.2f} (bar: <= 2); index build "
        + (f"{build_images_per_s:.1f} images/s (preset {args.preset!r})" if build_images_per_s else "not measured")
    )
    result = {
        "n": args.n,
        "query_s": round(query_s, 4),
        "read_s": round(read_s, 4),
        "ratio": round(query_s / read_s, 3),
        "build_images_per_s": None if build_images_per_s is None else round(build_images_per_s, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
