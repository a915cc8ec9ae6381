#!/usr/bin/env bash
# Rerun the sweeps of docs/guidance-report.md: the four guidance methods (cfg, rescale, interval, apg) at
# w = 1, 2, 4, 8 on the shipped shapes model (exact accuracy, KID against fresh shapes images) and the shipped
# emoji model (CLIP score, diversity, KID/FD/CMMD against the emoji set's held-out images), DDIM 25 steps.
#
#   scripts/guidance_report.sh                  # writes runs/guidance-report/{shapes,emoji}, figures to docs/
#   EMOJI=/path/to/emoji RUNS=runs PYTHON=.venv/bin/python scripts/guidance_report.sh
#
# Each sweep resumes when stopped (rerun the script). Wall time on the project's 2-core CPU (2026-11-27): shapes
# 11 min (512 images of 32 px, under the load of seven other jobs); emoji, all 392 held-out captions x 2 seeds x
# 12 cells (9,408 images of 64 px), about 2 hours at one thread beside one other job.
# EMOJI_PROMPTS (default 392, all), EMOJI_GUIDANCE (default 1,4,8) and SEEDS size the emoji run: 4 methods x
# weights x prompts x seeds images.
set -euo pipefail
cd "$(dirname "$0")/.."
EMOJI=${EMOJI:-data/emoji}
RUNS=${RUNS:-runs}/guidance-report
EMOJI_PROMPTS=${EMOJI_PROMPTS:-392}
EMOJI_GUIDANCE=${EMOJI_GUIDANCE:-1,4,8}
SEEDS=${SEEDS:-0,1}
FIGURES=docs/figures/guidance
LDM=(nice -n 10 "${PYTHON:-python}" -m ldm.cli)
METHODS="cfg,rescale:0.7,interval:0.28-5.42,apg"  # the papers' settings (Lin et al.; Kynkaanniemi et al. SD-XL; Sadat et al.)

sweep() {  # sweep OUT ARGS...: a new sweep, or the stopped one in OUT resumed
    local out=$1
    shift
    if [ -f "$out/metrics.json" ]; then echo "== $out: done"; return; fi
    local resume=()
    if [ -f "$out/sweep.json" ]; then resume=(--resume); fi
    echo "== ldm sweep $* --out $out ${resume[*]}"
    "${LDM[@]}" sweep "$@" --out "$out" "${resume[@]}"
}

mkdir -p "$RUNS" "$FIGURES"
# shapes: a fresh set (seed 1; the model trained on seed 0's) as the reference, its first captions as prompts
[ -d "$RUNS/shapes-reference" ] || "${LDM[@]}" data shapes --size 32 --n 512 --seed 1 --out "$RUNS/shapes-reference"
sweep "$RUNS/shapes" --model shapes --prompts-from "$RUNS/shapes-reference" --split all --limit 16 \
    --reference "$RUNS/shapes-reference" --guidance 1,2,4,8 --guidance-method "$METHODS" --steps 25 --seeds "$SEEDS"
sweep "$RUNS/emoji" --model default --prompts-from "$EMOJI" --split heldout --limit "$EMOJI_PROMPTS" \
    --reference "$EMOJI" --guidance "$EMOJI_GUIDANCE" --guidance-method "$METHODS" --steps 25 --seeds "$SEEDS"

for run in shapes emoji; do
    mkdir -p "$FIGURES/$run"
    cp "$RUNS/$run"/{metrics.png,pareto.png,metrics.csv,metrics.json,suggestion.txt} "$FIGURES/$run/"
    cp "$RUNS/$run/grid.png" "$FIGURES/$run/grid-w-by-method.png"
done
echo "figures in $FIGURES"
