#!/usr/bin/env bash
# The OpenMoji fine-tune of docs/finetune-openmoji.md, with the commands the README documents:
# build the OpenMoji set (plus OpenMoji emoji of other groups and the emoji set, whose Twemoji and Noto
# images the measure compares against), fine-tune the default model on it, then draw and measure
# prompts the fine-tune never saw, before and after (bench/finetune_style.py).
#
#   scripts/finetune_openmoji.sh [extra finetune key=value ...]
#   nohup scripts/finetune_openmoji.sh > runs/finetune_openmoji.log 2>&1 &
#
# DATA and RUNS choose where data sets and the run go (default data/ and runs/); FIGURES where the
# grid and metrics.json are written (default docs/figures/openmoji). LDM is the command that runs the
# CLI (default ldm; from a source tree: LDM="python -m ldm.cli" with PYTHONPATH=.). PRIOR=1 adds prior
# preservation: the Twemoji and Noto twins of the train emoji ($DATA/openmoji-prior, written by
# bench/finetune_style.py --write-prior) make up prior.share of every batch (prior.data=...).
# A stopped fine-tune is resumed from its newest checkpoint when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
FIGURES=${FIGURES:-docs/figures/openmoji}
LDM=${LDM:-ldm}
PYTHON=${PYTHON:-python}
PRIOR=${PRIOR:-0}

[ -e "$DATA/openmoji/metadata.jsonl" ] || $LDM data openmoji --out "$DATA/openmoji"
[ -e "$DATA/openmoji-other/metadata.jsonl" ] || \
    $LDM data openmoji --groups objects,travel-places,smileys-emotion --out "$DATA/openmoji-other"
[ -e "$DATA/emoji/metadata.jsonl" ] || $LDM data emoji --out "$DATA/emoji"

prior=()
if [ "$PRIOR" = 1 ]; then
    [ -e "$DATA/openmoji-prior/metadata.jsonl" ] || $PYTHON bench/finetune_style.py --data "$DATA/openmoji" \
        --other "$DATA/openmoji-other" --emoji "$DATA/emoji" --out "$FIGURES" --write-prior "$DATA/openmoji-prior"
    prior=(prior.data="$DATA/openmoji-prior")
fi
resume=()
if compgen -G "$RUNS/openmoji/checkpoints/*" > /dev/null; then resume=(--resume latest); fi
start=$(date +%s)
if [ ! -e "$RUNS/openmoji/bundle" ]; then
    $LDM finetune --model default --data "$DATA/openmoji" train.output_dir="$RUNS/openmoji" "${prior[@]}" "${resume[@]}" "$@"
fi
echo "== fine-tune: $(( $(date +%s) - start )) s wall (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"

start=$(date +%s)
$PYTHON bench/finetune_style.py --tuned "$RUNS/openmoji/bundle" --data "$DATA/openmoji" \
    --other "$DATA/openmoji-other" --emoji "$DATA/emoji" --out "$FIGURES"
echo "== measure: $(( $(date +%s) - start )) s wall"
