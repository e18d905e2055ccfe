#!/usr/bin/env bash
# Train the shapes-world text-to-image model from nothing: data -> tokenizer -> contrastive encoder ->
# codes -> prior -> pipeline (float16 weights) -> measurements. Writes the pipeline folder to $OUT.
#
#   PARALLEL=1 WORKERS=4 DEVICE=cuda bash recipes/shapes.sh    # full size, as models/shapes-demo was trained
#   SMOKE=1 bash recipes/shapes.sh                              # minutes on a CPU: does every step work?
#
# SMOKE=1 trains each stage for a few steps on a small world in folders of its own (data/shapes-smoke,
# runs/shapes-smoke, models/shapes-smoke), draws one grid with the result and skips the benchmarks; every
# setting below can still be given. Every stage checkpoints; rerunning the script resumes where it stopped.
# Data already in $DATA is used only if it was built with the same settings. Knobs: see recipes/stage.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/stage.sh
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    DATA=${DATA:-data/shapes-smoke}
    RUNS=${RUNS:-runs/shapes-smoke}
    OUT=${OUT:-models/shapes-smoke}
    NUM_IMAGES=${NUM_IMAGES:-1000}
    VQ_STEPS=${VQ_STEPS:-20} CLIP_STEPS=${CLIP_STEPS:-20} PRIOR_STEPS=${PRIOR_STEPS:-20}
    VQ_BATCH=${VQ_BATCH:-16} CLIP_BATCH=${CLIP_BATCH:-32} PRIOR_BATCH=${PRIOR_BATCH:-16}
fi
DATA=${DATA:-data/shapes}
RUNS=${RUNS:-runs/shapes}
OUT=${OUT:-models/shapes-demo}
NUM_IMAGES=${NUM_IMAGES:-50000}
VQ_STEPS=${VQ_STEPS:-8000}
CLIP_STEPS=${CLIP_STEPS:-6000}
PRIOR_STEPS=${PRIOR_STEPS:-8000}
VQ_BATCH=${VQ_BATCH:-128}
CLIP_BATCH=${CLIP_BATCH:-256}
PRIOR_BATCH=${PRIOR_BATCH:-128}
echo "shapes recipe: $NUM_IMAGES images in $DATA; steps $VQ_STEPS/$CLIP_STEPS/$PRIOR_STEPS (batches" \
    "$VQ_BATCH/$CLIP_BATCH/$PRIOR_BATCH) for tokenizer/contrastive/prior in $RUNS; pipeline to $OUT"

"$BIN/vqclip" data shapes --out "$DATA" --num-images "$NUM_IMAGES" --seed 0 --reuse

tokenizer() {
    train vqvae.train "$RUNS/vqvae" --train_data_dir "$DATA" --preset f4-wide --max_train_steps "$VQ_STEPS" \
        --train_batch_size "$VQ_BATCH" --learning_rate 5e-4 --lr_warmup_steps 500 --validation_steps 1000 \
        --mixed_precision "$PRECISION"
}
contrastive() {
    train contrastive.train "$RUNS/contrastive" --train_data_dir "$DATA" --preset mini \
        --max_train_steps "$CLIP_STEPS" --train_batch_size "$CLIP_BATCH" --learning_rate 5e-4 --lr_warmup_steps 500 \
        --adam_weight_decay 0.1 --validation_steps 1000
}
both tokenizer contrastive

train prior.train "$RUNS/prior" --train_data_dir "$DATA" --preset small --vqvae "$RUNS/vqvae" \
    --contrastive "$RUNS/contrastive" --max_train_steps "$PRIOR_STEPS" \
    --train_batch_size "$PRIOR_BATCH" --learning_rate 5e-4 --lr_warmup_steps 500 --adam_weight_decay 0.05 \
    --validation_steps 2000

# Default sampling settings, chosen by benchmarks/sampling_sweep.py on prompts the benchmarks never use; editing's
# by benchmarks/edit_rerank_analysis.py on edits of other pictures than those benchmarks/edit_quality.py reports.
"$BIN/vqclip" assemble --vqvae "$RUNS/vqvae" --contrastive "$RUNS/contrastive" --prior "$RUNS/prior" --out "$OUT" \
    --dtype float16 --sampling '{"guidance_scale": 1, "temperature": 0.7, "num_candidates": 8, "rerank": "contrastive+likelihood"}' \
    --edit-sampling '{"guidance_scale": 4, "num_candidates": 32}'
if [ "$SMOKE" = 1 ]; then
    echo "SMOKE=1: skipping the sampling sweep and the benchmarks (they take about an hour on a CPU)"
    "$BIN/vqclip" generate "a blue ball on grass" --model "$OUT" -n 2 --num-candidates 1 --out "$RUNS/smoke.png"
    exit
fi
"$BIN/python" benchmarks/sampling_sweep.py --model "$OUT" --device "$DEVICE"
"$BIN/python" benchmarks/vqvae_quality.py --model "$OUT/vqvae" --data "$DATA"
"$BIN/python" benchmarks/contrastive_quality.py --model "$OUT/contrastive" --shapes-data "$DATA"
"$BIN/python" benchmarks/generation_quality.py --model "$OUT" --device "$DEVICE"
