"""What one KV-cached decoding step spends in its linear layers, and how much of that is reading weights.

    python benchmarks/decode_step_linears.py            # dim 256, 4 layers, codebook 1,024, 4 rows

A cached step multiplies a few rows (the batch) by every weight matrix of the prior: per layer the attention's
qkv and output projections and the MLP's two layers, then the output head. This times that sequence of matrix
products alone, with the weights stored five ways: as the prior stores them (fp32, row-major, `F.linear`),
column-major (the same numbers, transposed in memory), reordered once by oneDNN for this many rows (what
cached decoding does on a CPU, `prior/prepack.py`), as fp16 (FBGEMM's fp16-weight product, where this torch
has it), and as fp32 matrices of an eighth of the rows (the same number of calls, an eighth of the bytes).
Times are the median of `--repeats` runs of `--steps` steps, after a warm-up. Ends with one JSON line with the
milliseconds per step of each (`null` where unavailable) and the megabytes of weights per step.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from common.cli import ArgumentParser
from prior import prepack


def per_step_ms(step, steps: int, repeats: int) -> float:
    for _ in range(20):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=4, help="rows per step: the batch (doubled with guidance)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.dim
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * args.layers + [(args.codebook_size, d)]
    weights = [torch.randn(out, inp) * 0.02 for out, inp in shapes]
    biases = [torch.zeros(out) for out, _ in shapes]
    inputs = {inp: torch.randn(args.rows, inp) for _, inp in shapes}

    def linears(ws: list[torch.Tensor], bs: list[torch.Tensor]):
        def step() -> None:
            for w, b in zip(ws, bs, strict=True):
                F.linear(inputs[w.shape[1]], w, b)

        return step

    column_major = [w.t().contiguous().t() for w in weights]
    eighth = [w[: max(1, w.shape[0] // 8)].contiguous() for w in weights]
    result = {
        "fp32_ms": per_step_ms(linears(weights, biases), args.steps, args.repeats),
        "fp32_column_major_ms": per_step_ms(linears(column_major, biases), args.steps, args.repeats),
        "fp32_reordered_ms": None,
        "fp16_weights_ms": None,
        "fp32_eighth_rows_ms": per_step_ms(
            linears(eighth, [b[: len(w)] for b, w in zip(biases, eighth, strict=True)]), args.steps, args.repeats
        ),
    }
    if prepack.available():
        reordered = [prepack.reorder(w, args.rows) for w in weights]

        def reordered_step() -> None:
            for w, r, b in zip(weights, reordered, biases, strict=True):
                prepack.reordered_linear(inputs[w.shape[1]], r, b)

        result["fp32_reordered_ms"] = per_step_ms(reordered_step, args.steps, args.repeats)
    if torch.backends.quantized.engine in ("fbgemm", "x86"):
        packed = [torch.ops.quantized.linear_prepack_fp16(w, b) for w, b in zip(weights, biases, strict=True)]

        def fp16_step() -> None:
            for w, p in zip(weights, packed, strict=True):
                torch.ops.quantized.linear_dynamic_fp16(inputs[w.shape[1]], p)

        result["fp16_weights_ms"] = per_step_ms(fp16_step, args.steps, args.repeats)
    result = {name: None if ms is None else round(ms, 3) for name, ms in result.items()}
    result.update(
        weight_mb=round(sum(w.numel() for w in weights) * 4 / 1e6, 1),
        matrices=len(weights),
        rows=args.rows,
        threads=torch.get_num_threads(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
