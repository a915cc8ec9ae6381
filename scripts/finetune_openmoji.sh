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
# SET, SET_GROUPS, OTHER and OTHER_GROUPS choose the OpenMoji groups: the fine-tune's set ($DATA/$SET, default openmoji:
# animals-nature, food-drink, activities) and the set of other groups the measure also draws ($DATA/$OTHER, default
# openmoji-other: objects, travel-places, smileys-emotion). The faces-and-people run of docs/finetune-openmoji.md:
#   SET=openmoji-people SET_GROUPS=smileys-emotion,people-body OTHER=openmoji OTHER_GROUPS=animals-nature,food-drink,activities
# VARIANT=black builds both sets from OpenMoji's black line-art drawings ("<name>, outline style"); GRID_NAMES picks the
# grid's rows by name. The line-art faces-and-people run of docs/finetune-openmoji.md:
#   VARIANT=black SET=outline-people SET_GROUPS=smileys-emotion,people-body OTHER=outline \
#   OTHER_GROUPS=animals-nature,food-drink,activities FIGURES=docs/figures/outline PRIOR=1 \
#   GRID_NAMES="thinking face,disguised face,pouting face,woman frowning,man: white hair,fearful face,beating heart,genie" \
#   scripts/finetune_openmoji.sh lora.method=full optim.lr=1e-4 train.max_steps=1000 prior.share=0.5
# A stopped fine-tune is resumed from its newest checkpoint when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
FIGURES=${FIGURES:-docs/figures/openmoji}
LDM=${LDM:-ldm}
PYTHON=${PYTHON:-python}
PRIOR=${PRIOR:-0}
SET=${SET:-openmoji}
SET_GROUPS=${SET_GROUPS:-animals-nature,food-drink,activities}
OTHER=${OTHER:-openmoji-other}
OTHER_GROUPS=${OTHER_GROUPS:-objects,travel-places,smileys-emotion}
VARIANT=${VARIANT:-color}
GRID_NAMES=${GRID_NAMES:-}

[ -e "$DATA/$SET/metadata.jsonl" ] || $LDM data openmoji --groups "$SET_GROUPS" --variant "$VARIANT" --out "$DATA/$SET"
[ -e "$DATA/$OTHER/metadata.jsonl" ] || $LDM data openmoji --groups "$OTHER_GROUPS" --variant "$VARIANT" --out "$DATA/$OTHER"
[ -e "$DATA/emoji/metadata.jsonl" ] || $LDM data emoji --out "$DATA/emoji"

prior=()
if [ "$PRIOR" = 1 ]; then
    [ -e "$DATA/$SET-prior/metadata.jsonl" ] || $PYTHON bench/finetune_style.py --data "$DATA/$SET" \
        --other "$DATA/$OTHER" --emoji "$DATA/emoji" --out "$FIGURES" --write-prior "$DATA/$SET-prior"
    prior=(prior.data="$DATA/$SET-prior")
fi
resume=()
if compgen -G "$RUNS/$SET/checkpoints/*" > /dev/null; then resume=(--resume latest); fi
start=$(date +%s)
if [ ! -e "$RUNS/$SET/bundle" ]; then
    $LDM finetune --model default --data "$DATA/$SET" train.output_dir="$RUNS/$SET" "${prior[@]}" "${resume[@]}" "$@"
fi
echo "== fine-tune: $(( $(date +%s) - start )) s wall (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"

start=$(date +%s)
$PYTHON bench/finetune_style.py --tuned "$RUNS/$SET/bundle" --data "$DATA/$SET" \
    --other "$DATA/$OTHER" --emoji "$DATA/emoji" --out "$FIGURES" ${GRID_NAMES:+--grid-names "$GRID_NAMES"}
echo "== measure: $(( $(date +%s) - start )) s wall"
