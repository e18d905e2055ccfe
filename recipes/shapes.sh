#!/usr/bin/env bash
# Train the shapes-world text-to-image model from nothing: data -> tokenizer -> contrastive encoder ->
# codes -> prior -> pipeline (float16 weights) -> measurements. Writes the pipeline folder to $OUT.
#
#   PARALLEL=1 WORKERS=4 DEVICE=cuda bash recipes/shapes.sh    # full size, as models/shapes-demo was trained
#   VQ_STEPS=20 CLIP_STEPS=20 PRIOR_STEPS=20 NUM_IMAGES=2000 OUT=/tmp/demo RUNS=/tmp/runs bash recipes/shapes.sh
#
# Every stage checkpoints; rerunning the script resumes where it stopped. Knobs: see recipes/stage.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/stage.sh
DATA=${DATA:-data/shapes}
RUNS=${RUNS:-runs/shapes}
OUT=${OUT:-models/shapes-demo}
NUM_IMAGES=${NUM_IMAGES:-50000}
VQ_STEPS=${VQ_STEPS:-8000}
CLIP_STEPS=${CLIP_STEPS:-6000}
PRIOR_STEPS=${PRIOR_STEPS:-8000}

[ -f "$DATA/shapes_world.json" ] || "$BIN/vqclip" data shapes --out "$DATA" --num-images "$NUM_IMAGES" --seed 0

tokenizer() {
    train vqvae.train "$RUNS/vqvae" --train_data_dir "$DATA" --preset f4-wide --max_train_steps "$VQ_STEPS" \
        --train_batch_size 128 --learning_rate 5e-4 --lr_warmup_steps 500 --validation_steps 1000 \
        --mixed_precision "$PRECISION"
}
contrastive() {
    train contrastive.train "$RUNS/contrastive" --train_data_dir "$DATA" --preset mini \
        --max_train_steps "$CLIP_STEPS" --train_batch_size 256 --learning_rate 5e-4 --lr_warmup_steps 500 \
        --adam_weight_decay 0.1 --validation_steps 1000
}
both tokenizer contrastive

train prior.train "$RUNS/prior" --train_data_dir "$DATA" --preset small --vqvae "$RUNS/vqvae" \
    --contrastive "$RUNS/contrastive" --max_train_steps "$PRIOR_STEPS" \
    --train_batch_size 128 --learning_rate 5e-4 --lr_warmup_steps 500 --adam_weight_decay 0.05 \
    --validation_steps 2000

# Default sampling settings, chosen by benchmarks/sampling_sweep.py on prompts the benchmarks never use.
"$BIN/vqclip" assemble --vqvae "$RUNS/vqvae" --contrastive "$RUNS/contrastive" --prior "$RUNS/prior" --out "$OUT" \
    --dtype float16 --sampling '{"guidance_scale": 1, "temperature": 0.7, "num_candidates": 8, "rerank": "contrastive+likelihood"}'
"$BIN/python" benchmarks/sampling_sweep.py --model "$OUT" --device "$DEVICE"
"$BIN/python" benchmarks/vqvae_quality.py --model "$OUT/vqvae" --data "$DATA"
"$BIN/python" benchmarks/contrastive_quality.py --model "$OUT/contrastive" --shapes-data "$DATA"
"$BIN/python" benchmarks/generation_quality.py --model "$OUT" --device "$DEVICE"
