#!/usr/bin/env bash
# Train and measure the emoji tokenizer (16 x 16 codes) and an emoji contrastive model that never sees the
# held-out style ($HELDOUT_STYLE), then measure search over that style's drawings.
#
#   PARALLEL=1 WORKERS=4 DEVICE=cuda bash recipes/emoji.sh
#
# The corpus is built first if $DATA lacks it (this needs the network once; see docs/corpora.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/stage.sh
DATA=${DATA:-data/emoji}
RUNS=${RUNS:-runs/emoji}
HELDOUT_STYLE=${HELDOUT_STYLE:-fluent}
VQ_STEPS=${VQ_STEPS:-10000}
CLIP_STEPS=${CLIP_STEPS:-6000}

[ -f "$DATA/train/metadata.jsonl" ] || "$BIN/vqclip" data emoji --out "$DATA"

tokenizer() {
    train vqvae.train "$RUNS/vqvae" --train_data_dir "$DATA" --preset f4-wide --model_config '{"base_channels": 64}' \
        --max_train_steps "$VQ_STEPS" --train_batch_size 128 --learning_rate 5e-4 --lr_warmup_steps 500 \
        --validation_steps 1000 --mixed_precision "$PRECISION"
}
contrastive() {
    train contrastive.train "$RUNS/contrastive" --train_data_dir "$DATA" --exclude "style=$HELDOUT_STYLE" \
        --preset small --max_train_steps "$CLIP_STEPS" --train_batch_size 256 --learning_rate 5e-4 \
        --lr_warmup_steps 500 --adam_weight_decay 0.1 --validation_steps 1000
}
both tokenizer contrastive

"$BIN/python" benchmarks/vqvae_quality.py --model "$RUNS/vqvae" --data "$DATA"
"$BIN/python" benchmarks/contrastive_quality.py --emoji-model "$RUNS/contrastive" --emoji-data "$DATA" \
    --heldout-style "$HELDOUT_STYLE"
