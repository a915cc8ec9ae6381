#!/usr/bin/env bash
# A further training leg of the shipped emoji model on the GPU machine, time-boxed, with the project's own command
# (`ldm finetune --config configs/ldm/emoji-64-continue.yaml`, every U-Net weight, EMA kept), then the EMA weights of
# its checkpoints in fp16 (the shipped precision) packed into pieces the device tool brings back (16 MiB a file).
#
#   python bench/gpu/carry_data.py pack data/emoji bench/gpu/carry/emoji.xz    # here, once (12.4 MB)
#   SECONDS_FOR_LEG=200 OUT=... bench/gpu/emoji_leg.sh                         # there (run.sh starts it: EMOJI_LEG=1)
#   cat emoji-leg.tar.* | tar x; ema-<step>.safetensors -> a bundle's unet/, then `ldm pack`: docs/training-report.md
#
# A 40-step probe measures seconds per step (and builds the cache), then the leg's length is chosen to end inside
# the time given, its cosine schedule run to the end. Environment: PY (python), SECONDS_FOR_LEG (default 200),
# BATCH (128), LR (1e-4), CHECKPOINTS (3: evenly spaced, each brought back), OUT (where the pieces go), DATA_ARCHIVE.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
BUDGET=${SECONDS_FOR_LEG:-200}
BATCH=${BATCH:-128}
LR=${LR:-1e-4}
PROBE_STEPS=${PROBE_STEPS:-40}
CHECKPOINTS=${CHECKPOINTS:-3}
OUT=${OUT:-/tmp/emoji-leg-out}
ARCHIVE=${DATA_ARCHIVE:-bench/gpu/carry/emoji.xz}
WORK=${WORK:-/tmp/emoji-leg}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
mkdir -p "$OUT" "$WORK"
LOG=$WORK/leg.log
exec > >(tee -a "$LOG") 2>&1

"$PY" bench/gpu/carry_data.py unpack "$ARCHIVE" "$WORK/data" || exit 1
common=(--model default --data "$WORK/data" --config configs/ldm/emoji-64-continue.yaml cache.dir="$WORK/cache"
        train.batch_size="$BATCH" validation.at_start=false)
echo "== probe: $PROBE_STEPS steps at batch $BATCH ($(left) s left)"
timeout -k 5 "$(left)" "$PY" -m ldm.cli finetune "${common[@]}" train.output_dir="$WORK/probe" train.max_steps="$PROBE_STEPS" \
    validation.every=0 checkpoint.every=1000 || { echo "probe failed"; exit 1; }
step_s=$("$PY" -c "import csv, sys; rows = list(csv.DictReader(open(sys.argv[1]))); print(float(rows[-1]['step_s']))" \
    "$WORK/probe/logs/train.csv")
# the probe's whole time: unpacking, start-up, the cache build, its steps, a validation and a bundle
overhead=$(( SECONDS - START ))
# a multiple of 100 x CHECKPOINTS steps, so that every checkpoint and the last coincide; 25% spare for the leg's
# validations; most of the probe's overhead (unpacking, the cache build) is not paid again
steps=$("$PY" -c "import sys; s, left, over, n = map(float, sys.argv[1:]); u = 100 * int(n)
print(max(u, int((left - 0.8 * over - 20) / s / 1.25) // u * u))" "$step_s" "$(left)" "$overhead" "$CHECKPOINTS")
every=$(( steps / CHECKPOINTS ))
echo "== leg: $steps steps at ${step_s} s/step, batch $BATCH, lr $LR, a checkpoint every $every ($(left) s left)"
timeout -k 5 $(( $(left) - 10 )) "$PY" -m ldm.cli finetune "${common[@]}" train.output_dir="$WORK/leg" train.max_steps="$steps" \
    optim.lr="$LR" optim.warmup_steps=100 checkpoint.every="$every" checkpoint.keep_last="$CHECKPOINTS" \
    validation.every=$(( steps / 4 )) train.log_every=50 \
    || echo "(the leg stopped before its end: the checkpoints written so far are kept)"

echo "== EMA weights of every checkpoint in fp16"
mkdir -p "$WORK/back"
"$PY" - "$WORK/leg/checkpoints" "$WORK/back" <<'EOF'
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

for step in sorted(Path(sys.argv[1]).glob("step-*")):
    weights = {k: v.half().contiguous() for k, v in load_file(step / "ema.safetensors").items()}
    save_file(weights, Path(sys.argv[2]) / f"ema-{step.name}.safetensors", metadata={"source": str(step)})
    print(step.name, len(weights), "tensors")
EOF
cp "$WORK"/leg/logs/*.csv "$WORK"/leg/logs/log.txt "$WORK"/leg/config.yaml "$WORK/back/" 2>/dev/null
cp "$WORK"/leg/samples/*.png "$WORK/back/" 2>/dev/null
tar cf "$WORK/emoji-leg.tar" -C "$WORK/back" .
split -b 15M -d "$WORK/emoji-leg.tar" "$OUT/emoji-leg.tar."
ls -l "$OUT"/emoji-leg.tar.*
echo "== emoji leg done in $((SECONDS - START)) s"
