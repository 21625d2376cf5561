#!/usr/bin/env bash
# Rebuild mimoflash/default_model/ from scratch: the recipe that produced the shipped model (docs/TRAINING.md).
#
#   scripts/train_default_model.sh                 # everything, ~4 h on 2 idle CPU cores
#   RUN=runs/default STEPS=2600 MTP_STEPS=60 DISTILL_STEPS=200 scripts/train_default_model.sh
#
# The shipped model ran this recipe to step 1100 with STEPS=1100, then was continued from that checkpoint with
# STEPS=2600 (re-running the script with a larger STEPS resumes and lengthens the cosine schedule: a warm restart);
# its model card lists that history. A fresh run with STEPS=2600 is the same recipe without the restart. Its
# 3-head release then ran step 5 with `--init mimoflash/default_model` (the exported 2-head model after step 4).
#
# 1. byte-level BPE (8192 ids) on the Python standard library's *.py files (PSF license; site-packages excluded)
# 2. tokenize them into train.bin / val.bin (1% of the files held out, seed 0)
# 3. train the `default-small` preset (re-running this script resumes from RUN/train/checkpoint)
# 4. train only the MTP heads for MTP_STEPS steps on the data (the main model frozen; 0 = skip)
# 5. grow to MTP_HEADS heads (the new one a copy of the last) and self-distil them for DISTILL_STEPS steps: each
#    head learns the frozen main model's own distribution for the token it drafts (`--only-mtp --distill`), which
#    is what a speculative-decoding verify step checks (0 = skip)
# 6. export bf16 weights + tokenizer + held-out sample + model card to mimoflash/default_model/
#
# Every step resumes: re-running the script continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/default}
STEPS=${STEPS:-2600}          # length of the cosine schedule (4096 tokens per step)
MTP_STEPS=${MTP_STEPS:-60}    # MTP-only phase after pre-training; 0 = skip it
MTP_HEADS=${MTP_HEADS:-3}     # MTP heads after the distillation phase (pre-training uses the preset's 2)
DISTILL_STEPS=${DISTILL_STEPS:-200}   # self-distillation phase (8 x 256 tokens per step); 0 = skip it
OUT=${OUT:-mimoflash/default_model}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning makes steps 5-10x slower.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
# Every top-level *.py file and package directory of the stdlib except site-packages (third-party code, other
# licenses). Other top-level files (LICENSE.txt) are left out: a file named by --input is read whatever --glob says.
INPUTS=()
for entry in "$STDLIB"/*; do
    name=$(basename "$entry")
    [[ "$name" == site-packages || "$name" == dist-packages ]] && continue
    [[ -f "$entry" && "$name" != *.py ]] && continue
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
        --ckpt-every-min 0 --resume
    CKPT="$RUN/mtp/checkpoint"
fi
if [[ "$DISTILL_STEPS" -gt 0 ]]; then
    python -m mimoflash train --config default-small --only-mtp --distill --mtp-heads "$MTP_HEADS" \
        --new-mtp-init copy --init "$CKPT" --data "$RUN/data" --out "$RUN/distill" --tokenizer "$RUN/tokenizer" \
        --max-steps "$DISTILL_STEPS" --batch-size 8 --warmup-steps 10 --lr 1e-3 --mtp-fraction 1.0 \
        --eval-every 0 --eval-batches 4 --acceptance-batches 24 --ckpt-every-min 5 --resume
    CKPT="$RUN/distill/checkpoint"
fi

python -m mimoflash.default "$CKPT" --out "$OUT" --acceptance-batches 12
