#!/usr/bin/env bash
# Train the shipped models from scratch with the project's own commands and committed configs:
# the emoji model (ldm/default_model) and the shapes model (ldm/shapes_model).
#
#   scripts/train_default_model.sh [emoji|shapes|all|emoji-continue]      (default: all)
#   nohup scripts/train_default_model.sh > runs/train_default_model.log 2>&1 &
#
# Every stage is skipped when its output exists and resumed from its newest checkpoint when it
# was stopped, so rerunning the script after an interruption loses at most one checkpoint
# interval (100-250 steps, a few minutes). DATA and RUNS choose where data sets and runs go.
# Wall time on a 2-core CPU with nothing else running: emoji CLIP ~35 min, emoji VQ-VAE ~45 min,
# emoji U-Net ~100 min; shapes CLIP ~10 min, VQ-VAE ~6 min, U-Net ~15 min (docs/training-report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
RUNS=${RUNS:-runs}
which=${1:-all}

resume_flag() {  # --resume latest when the run folder has checkpoints
    if compgen -G "$1/checkpoints/*" > /dev/null; then echo "--resume latest"; fi
}

stage() {  # stage NAME DONE_PATH COMMAND...: run COMMAND unless DONE_PATH exists
    local name=$1 done=$2
    shift 2
    if [ -e "$done" ]; then echo "== $name: done ($done)"; return; fi
    echo "== $name: $*"
    "$@"
}

emoji() {
    stage "emoji data" "$DATA/emoji/metadata.jsonl" ldm data emoji --out "$DATA/emoji"
    stage "emoji CLIP" "$RUNS/clip-emoji/text_encoder" ldm train-clip configs/clip/emoji.yaml \
        data.path="$DATA/emoji" train.output_dir="$RUNS/clip-emoji" $(resume_flag "$RUNS/clip-emoji")
    stage "emoji VQ-VAE" "$RUNS/vae-emoji-f4/vae" ldm train-vae configs/vae/vq-f4-64.yaml \
        data.path="$DATA/emoji" train.output_dir="$RUNS/vae-emoji-f4" $(resume_flag "$RUNS/vae-emoji-f4")
    stage "emoji U-Net" "$RUNS/ldm-emoji/bundle" ldm train configs/ldm/emoji-64.yaml \
        data.path="$DATA/emoji" encoders.autoencoder="$RUNS/vae-emoji-f4/vae" encoders.text_encoder="$RUNS/clip-emoji" \
        cache.dir="$RUNS/cache" train.output_dir="$RUNS/ldm-emoji" $(resume_flag "$RUNS/ldm-emoji")
    ldm pack "$RUNS/ldm-emoji/bundle" --out ldm/default_model --vocab-from "$DATA/emoji" --overwrite
}

emoji_continue() {  # a further leg of the shipped emoji U-Net: all its weights from ldm/default_model, a fresh schedule
    stage "emoji U-Net, further leg" "$RUNS/ldm-emoji-continue/bundle" ldm finetune --model default --data "$DATA/emoji" \
        --config configs/ldm/emoji-64-continue.yaml train.output_dir="$RUNS/ldm-emoji-continue" cache.dir="$RUNS/cache" \
        $(resume_flag "$RUNS/ldm-emoji-continue")
    python scripts/make_report.py --score ldm/default_model --score "$RUNS/ldm-emoji-continue/bundle" --data "$DATA"
    echo "replace the shipped model only if the leg's clip_score_heldout is clearly higher:"
    echo "  ldm pack $RUNS/ldm-emoji-continue/bundle --out ldm/default_model --overwrite"
}

shapes() {
    stage "shapes data" "$DATA/shapes32/metadata.jsonl" ldm data shapes --size 32 --out "$DATA/shapes32"
    stage "shapes CLIP" "$RUNS/clip-shapes/text_encoder" ldm train-clip configs/clip/shapes.yaml \
        data.path="$DATA/shapes32" train.output_dir="$RUNS/clip-shapes" $(resume_flag "$RUNS/clip-shapes")
    stage "shapes VQ-VAE" "$RUNS/vae-shapes/vae" ldm train-vae configs/vae/vq-f4-32-shapes.yaml \
        data.path="$DATA/shapes32" train.output_dir="$RUNS/vae-shapes" $(resume_flag "$RUNS/vae-shapes")
    stage "shapes U-Net" "$RUNS/ldm-shapes/bundle" ldm train configs/ldm/shapes-32.yaml \
        data.path="$DATA/shapes32" encoders.autoencoder="$RUNS/vae-shapes/vae" encoders.text_encoder="$RUNS/clip-shapes" \
        cache.dir="$RUNS/cache" train.output_dir="$RUNS/ldm-shapes" $(resume_flag "$RUNS/ldm-shapes")
    ldm pack "$RUNS/ldm-shapes/bundle" --out ldm/shapes_model --vocab-from "$DATA/shapes32" --overwrite
}

case "$which" in
    emoji) emoji ;;
    shapes) shapes ;;
    all) emoji; shapes ;;
    emoji-continue) emoji_continue ;;
    *) echo "usage: $0 [emoji|shapes|all|emoji-continue]" >&2; exit 2 ;;
esac
