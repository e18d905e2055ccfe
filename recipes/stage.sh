# Shared by the recipes (sourced, not run): how a stage is launched, and the knobs every recipe takes.
#   BIN       folder holding python, accelerate and vqclip (default .venv/bin)
#   WORKERS   DataLoader worker processes per stage (default 0; 4 on a machine with many cores)
#   PARALLEL  1: train the tokenizer and the contrastive model at the same time (a GPU has room for both)
#   DEVICE    where the generation benchmark runs (default cpu; cuda on a GPU machine)
#   PRECISION mixed precision of the tokenizer stages (default bf16 with DEVICE=cuda; no on a CPU, where bf16 is slow)
BIN=${BIN:-.venv/bin}
WORKERS=${WORKERS:-0}
PARALLEL=${PARALLEL:-0}
DEVICE=${DEVICE:-cpu}
if [ "$DEVICE" = cpu ]; then PRECISION=${PRECISION:-no}; else PRECISION=${PRECISION:-bf16}; fi
LAUNCH=("$BIN/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)

# train MODULE OUTPUT_DIR FLAGS...: one stage, resumed from its latest checkpoint, weights saved in float16.
# A stage whose OUTPUT_DIR has an eval.json has finished and is skipped (delete eval.json to train it again).
train() {
    local module=$1 out=$2
    shift 2
    if [ -f "$out/eval.json" ]; then
        echo "$out has finished training (eval.json); skipping $module"
        return
    fi
    local start=$SECONDS
    "${LAUNCH[@]}" -m "$module" --output_dir "$out" --resume_from_checkpoint latest --checkpointing_steps 500 \
        --checkpoints_total_limit 2 --logging_steps 50 --seed 0 --cache_images --dataloader_num_workers "$WORKERS" \
        --save_dtype float16 "$@"
    echo "$module took $((SECONDS - start)) s" | tee -a "$out/wall_time.txt"
}

# both FIRST_FN SECOND_FN: run two functions one after the other, or at the same time with PARALLEL=1
both() {
    if [ "$PARALLEL" = 1 ]; then
        "$1" & local first=$!
        "$2" & local second=$!
        wait "$first"
        wait "$second"
    else
        "$1"
        "$2"
    fi
}
