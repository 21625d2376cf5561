#!/usr/bin/env bash
# Rebuild mimoflash/default_model/ from scratch: the recipe that produced the shipped model (docs/TRAINING.md).
#
#   scripts/train_default_model.sh                 # everything, ~3-4 h on 2 idle CPU cores
#   RUN=runs/default STEPS=2600 MTP_STEPS=60 scripts/train_default_model.sh
#
# The shipped model ran this recipe to step 1100 with STEPS=1100, then was continued from that checkpoint with
# STEPS=2600 (re-running the script with a larger STEPS resumes and lengthens the cosine schedule: a warm restart);
# its model card lists that history. A fresh run with STEPS=2600 is the same recipe without the restart.
#
# 1. byte-level BPE (8192 ids) on the Python standard library's *.py files (PSF license; site-packages excluded)
# 2. tokenize them into train.bin / val.bin (1% of the files held out, seed 0)
# 3. train the `default-small` preset (re-running this script resumes from RUN/train/checkpoint)
# 4. optionally train only the MTP heads for MTP_STEPS steps on top (the main model frozen)
# 5. export bf16 weights + tokenizer + held-out sample + model card to mimoflash/default_model/
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/default}
STEPS=${STEPS:-2600}          # length of the cosine schedule (4096 tokens per step)
MTP_STEPS=${MTP_STEPS:-60}    # MTP-only phase after pre-training; 0 = skip it
OUT=${OUT:-mimoflash/default_model}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning makes steps 5-10x slower.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
# Every top-level entry of the stdlib except site-packages (third-party code, other licenses).
INPUTS=()
for entry in "$STDLIB"/*; do
    name=$(basename "$entry")
    [[ "$name" == site-packages || "$name" == dist-packages ]] && continue
    INPUTS+=(--input "$entry")
done

if [[ ! -f "$RUN/tokenizer/tokenizer.json" ]]; then
    python -m mimoflash train-tokenizer "${INPUTS[@]}" --glob '*.py' --out "$RUN/tokenizer" --vocab-size 8192
fi
if [[ ! -f "$RUN/data/meta.json" ]]; then
    python -m mimoflash prepare-data "${INPUTS[@]}" --glob '*.py' --tokenizer "$RUN/tokenizer" \
        --out "$RUN/data" --val-fraction 0.01 --seed 0
fi

python -m mimoflash train --config default-small --data "$RUN/data" --out "$RUN/train" \
    --tokenizer "$RUN/tokenizer" --max-steps "$STEPS" --resume

CKPT="$RUN/train/checkpoint"
if [[ "$MTP_STEPS" -gt 0 ]]; then
    python -m mimoflash train --config default-small --only-mtp --init "$RUN/train/checkpoint" \
        --data "$RUN/data" --out "$RUN/mtp" --tokenizer "$RUN/tokenizer" --max-steps "$MTP_STEPS" \
        --warmup-steps 8 --lr 1e-3 --mtp-fraction 1.0 --eval-every 0 --eval-batches 4 --acceptance-batches 12 \
        --ckpt-every-min 0
    CKPT="$RUN/mtp/checkpoint"
fi

python -m mimoflash.default "$CKPT" --out "$OUT" --acceptance-batches 12
