#!/usr/bin/env bash
# The GPU figures in one run: on one H100/H200 it takes under 8 minutes and prints one JSON line per benchmark.
#
#   bash benchmarks/gpu_suite.sh             # on a GPU machine, from the repository root, with the venv active
#   DRY_RUN=1 bash benchmarks/gpu_suite.sh   # the same benchmarks at tiny sizes on the CPU (checks the script)
#
# 1-3. training images/s and peak memory of each stage in bf16: tokenizer f16-256 (256 px), contrastive base
#      (256 px, 16-px patches), prior base (16x16 codes of 16,384);
# 4.   prior xl on 1,024 codes: peak memory with and without activation checkpointing, bf16 against fp32 loss;
# 5.   decoding 64 pictures of 256 codes from a prior of ~100M weights (768 wide, 12 layers) in bf16, with and
#      without guidance (cfg_overhead), and per-picture times at 64, 256 and 1,024 codes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}

last_line() { "$@" | tail -n 1; }

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    common=(--device cpu --steps 1)
    last_line "$PYTHON" benchmarks/train_throughput.py --stage vqvae --preset tiny --batch 2 --mixed-precision bf16 "${common[@]}"
    last_line "$PYTHON" benchmarks/train_throughput.py --stage contrastive --preset tiny --batch 2 --mixed-precision bf16 "${common[@]}"
    last_line "$PYTHON" benchmarks/train_throughput.py --stage prior --preset tiny --batch 2 --grid 4 --codebook-size 16 \
        --text-width 32 --text-length 16 --mixed-precision bf16 "${common[@]}"
    # large enough that its activations leave the allocator's heap, so the process's peak memory sees them
    last_line "$PYTHON" benchmarks/train_memory.py --preset tiny --grid 8 --batch 8 --codebook-size 512 --text-width 32 \
        --text-length 16 --steps 1 --device cpu
    last_line "$PYTHON" benchmarks/decode_speed.py --dim 32 --layers 1 --heads 2 --text-length 8 --batch 2 --repeats 1 \
        --device cpu
    exit 0
fi

last_line "$PYTHON" benchmarks/train_throughput.py --stage vqvae --preset f16-256 --batch 32 --mixed-precision bf16
last_line "$PYTHON" benchmarks/train_throughput.py --stage contrastive --preset base --resolution 256 --patch-size 16 \
    --batch 256 --mixed-precision bf16
last_line "$PYTHON" benchmarks/train_throughput.py --stage prior --preset base --grid 16 --codebook-size 16384 --batch 64 \
    --mixed-precision bf16
last_line "$PYTHON" benchmarks/train_memory.py --preset xl --grid 32 --batch 8 --device cuda
last_line "$PYTHON" benchmarks/decode_speed.py --dim 768 --layers 12 --heads 12 --batch 64 --dtype bfloat16 --repeats 3
