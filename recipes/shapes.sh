#!/usr/bin/env bash
# Train the shapes-world text-to-image model from nothing: data -> tokenizer -> contrastive encoder ->
# codes -> prior -> pipeline -> measurements. Writes the pipeline folder to $OUT (default models/shapes-demo).
#
#   bash recipes/shapes.sh                   # full size
#   VQ_STEPS=20 CLIP_STEPS=20 PRIOR_STEPS=20 NUM_IMAGES=2000 OUT=/tmp/demo bash recipes/shapes.sh   # smoke run
#
# Every stage checkpoints; rerunning the script resumes each stage from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DATA=${DATA:-data/shapes}
RUNS=${RUNS:-runs/shapes}
OUT=${OUT:-models/shapes-demo}
NUM_IMAGES=${NUM_IMAGES:-50000}
VQ_STEPS=${VQ_STEPS:-6000}
CLIP_STEPS=${CLIP_STEPS:-4000}
PRIOR_STEPS=${PRIOR_STEPS:-20000}
LAUNCH=("$BIN/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
COMMON=(--train_data_dir "$DATA" --cache_images --resume_from_checkpoint latest --checkpointing_steps 250
        --checkpoints_total_limit 2 --logging_steps 50 --seed 0)

[ -f "$DATA/shapes_world.json" ] || "$BIN/vqclip" data shapes --out "$DATA" --num-images "$NUM_IMAGES" --seed 0

"${LAUNCH[@]}" -m vqvae.train "${COMMON[@]}" --output_dir "$RUNS/vqvae" --preset shapes-f8 \
    --max_train_steps "$VQ_STEPS" --train_batch_size 64 --learning_rate 5e-4 --lr_warmup_steps 200 \
    --validation_steps 500

"${LAUNCH[@]}" -m contrastive.train "${COMMON[@]}" --output_dir "$RUNS/contrastive" --preset small \
    --max_train_steps "$CLIP_STEPS" --train_batch_size 128 --learning_rate 5e-4 --lr_warmup_steps 200 \
    --validation_steps 500

"${LAUNCH[@]}" -m prior.train "${COMMON[@]}" --output_dir "$RUNS/prior" --preset small \
    --vqvae "$RUNS/vqvae" --contrastive "$RUNS/contrastive" \
    --max_train_steps "$PRIOR_STEPS" --train_batch_size 64 --learning_rate 5e-4 --lr_warmup_steps 500 \
    --validation_steps 1000

"$BIN/vqclip" assemble --vqvae "$RUNS/vqvae" --contrastive "$RUNS/contrastive" --prior "$RUNS/prior" --out "$OUT"
"$BIN/python" benchmarks/vqvae_quality.py --model "$OUT/vqvae" --data "$DATA"
"$BIN/python" benchmarks/contrastive_quality.py --model "$OUT/contrastive" --shapes-data "$DATA"
