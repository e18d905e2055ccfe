"""Decode speed of the prior: KV-cached `generate` against recomputing the whole sequence at every step,
the cost of classifier-free guidance, and seconds per image for several code counts.

    python benchmarks/decode_speed.py                  # dim 256, 4 layers, 8 heads, 32 text positions, batch 4

Times are medians of `--repeats` calls; the settings of each comparison take turns, so that drift in the
machine's speed does not bias their ratio. Ends with one JSON line with keys `cached_s`, `recompute_s`,
`speedup`, `cfg_overhead`, `s_per_image` (a map from code count to seconds per image, cached, with guidance)
and `cached_plain_s`: the cached path with plain `F.linear` products instead of weights reordered for the
batch (prior/prepack.py; the same thing where reordering does not apply, e.g. on a GPU).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time

import torch

from common.cli import ArgumentParser
from prior import prepack
from prior.model import Prior, PriorConfig


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--text-length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per comparison; the median is kept")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    def model_for(grid: int) -> Prior:
        config = PriorConfig(
            codebook_size=1024, grid_size=grid, text_width=args.dim, text_length=args.text_length,
            dim=args.dim, layers=args.layers, heads=args.heads,
        )  # fmt: skip
        torch.manual_seed(0)
        return Prior(config).to(args.device, dtype).eval()

    def sampler(model: Prior, plain_products: bool = False, **kwargs):
        text = torch.randn(args.batch, args.text_length, args.dim, device=args.device, dtype=dtype)

        def sample() -> None:
            with prepack.switched_off() if plain_products else contextlib.nullcontext():
                model.generate(text, generator=torch.Generator(args.device).manual_seed(0), **kwargs)

        return sample

    def medians(samplers: dict, repeats: int) -> dict[str, float]:
        """Median seconds of `repeats` calls of each sampler, timed after an identical untimed call (the first
        call at each sequence length pays one-time costs: on a GPU, choosing kernels for every new shape). The
        samplers take turns, in alternating order, so that a machine whose speed drifts slows them alike."""
        for sample in samplers.values():
            sample()
        times = {name: [] for name in samplers}
        for r in range(repeats):
            for name in list(samplers)[:: 1 if r % 2 == 0 else -1]:
                times[name].append(timed(samplers[name], args.device))
        return {name: statistics.median(values) for name, values in times.items()}

    model = model_for(16)  # 256 codes
    cached = sampler(model, guidance_scale=1.0)
    speed = medians(
        {
            "cached": cached,
            "recompute": sampler(model, guidance_scale=1.0, use_cache=False),
            "cached_plain": sampler(model, plain_products=True, guidance_scale=1.0),
        },
        args.repeats,
    )
    guidance = medians({"cached": cached, "guided": sampler(model, guidance_scale=3.0)}, args.repeats)
    cached, recompute = speed["cached"], speed["recompute"]
    per_image = {}
    for grid in (8, 16, 32):
        seconds = medians({"guided": sampler(model_for(grid), guidance_scale=3.0)}, 1)["guided"]
        per_image[grid * grid] = round(seconds / args.batch, 4)
    result = {
        "cached_s": round(cached, 3),
        "recompute_s": round(recompute, 3),
        "speedup": round(recompute / cached, 1),
        "cached_plain_s": round(speed["cached_plain"], 3),
        "cfg_overhead": round(guidance["guided"] / guidance["cached"], 2),
        "s_per_image": per_image,
        "batch": args.batch,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    print(f"256 codes x {args.batch} images: cached {cached:.2f} s, recomputed {recompute:.2f} s "
          f"({recompute / cached:.1f}x); guidance costs {guidance['guided'] / guidance['cached']:.2f}x")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
