#!/usr/bin/env bash
# The GPU check in one command, on a CUDA machine with PyTorch and no network (bench/gpu/prepare.sh first, where
# PyPI is reachable, so bench/gpu/wheels/ travels with the tree). Under 9 minutes: every stage is time-boxed.
#
#   bench/gpu/run.sh                       install the wheels, pytest -m gpu, then the SD-1.5-size measurements
#   bench/gpu/run.sh --device cpu --tiny   the measurement stages only, tiny U-Net, seconds (tests/test_gpu.py)
#
# 1. a venv with the system's site packages (the machine's torch), the wheels installed with --no-index
#    --no-deps, this project from its source with --no-deps (pyproject pins torch==2.14.1; the machine has its own);
# 2. pytest -m gpu (tests/test_gpu.py), deterministic cuBLAS;
# 3. bench/gpu/bench.py, one process per stage: bf16 matmul rate; training images/s and MFU for
#    configs/ldm/sd-512.yaml (random weights, synthetic cached latents); sampling it/s at batch 1 and 8 with CFG,
#    eager and torch.compile'd; then one table, printed last, and written to $OUT/gpu-bench.{json,md} when OUT is set.
# Environment: PYTHON (default python3), LIMIT (whole run, seconds; default 530), OUT; EMOJI_LEG=1 also trains the
# emoji model further beside the tests (bench/gpu/emoji_leg.sh; LEG_S seconds, default the tests' share);
# SKIP_TESTS=1 skips pytest, giving its time to the measurements; GPU_TESTS=EXPR runs only the tests pytest -k EXPR
# picks; SAMPLE=0 skips the sampling rows (for a run that studies training alone).
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=cuda
TINY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --tiny) TINY=--tiny; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (allowed: --device cpu|cuda, --tiny)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-530}
START=$SECONDS
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT
left() { echo $((LIMIT - (SECONDS - START))); }
note() { printf '%s\n' "{\"stage\": \"$1\", \"status\": \"$2\"}" > "$PARTS/$3.json"; }

if [ -z "$TINY" ]; then
    echo "== install ($(left) s left)"
    VENV=${VENV:-/tmp/ldm-gpu-venv}
    if "$PY" -m venv --system-site-packages "$VENV" > "$PARTS/venv.log" 2>&1 && "$VENV/bin/python" -m pip --version > /dev/null 2>&1; then
        if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then  # $PY is itself a venv: see its packages too
            "$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
                "$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/machine-site.pth"
        fi
        PY=$VENV/bin/python
        "$PY" -m pip install -q --no-index --no-deps --no-compile bench/gpu/wheels/*.whl || exit 1
        if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$PARTS/pip-e.log" 2>&1; then
            echo "(this project not installed, $(grep -m1 -o 'error: .*' "$PARTS/pip-e.log"): using PYTHONPATH)"
        fi
    else  # no venv module here: the wheels into a folder on PYTHONPATH, ahead of the machine's packages
        echo "(no venv here: $(tail -1 "$PARTS/venv.log"); wheels go to $VENV-site)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$VENV-site" bench/gpu/wheels/*.whl || exit 1
        export PYTHONPATH=$VENV-site
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -c "import torch, diffusers, open_clip, ldm; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'CUDA', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || exit 1
    "$PY" -c "import datasets" 2>/dev/null || echo "(datasets does not import here: only the data-set readers need it)"

    # up to 240 s, leaving about 250 s for the measurements (each of which stops at what is left)
    TESTS_S=$(( $(left) - 250 > 240 ? 240 : $(left) - 250 ))
    LEG_PID=""
    if [ "${EMOJI_LEG:-0}" = 1 ]; then  # a training leg of the emoji model beside the tests, done before any timing
        LEG_S=${LEG_S:-$TESTS_S}
        TESTS_S=$(( TESTS_S < LEG_S ? TESTS_S : LEG_S ))
        echo "== emoji leg in the background for ${LEG_S} s (bench/gpu/emoji_leg.sh, log in emoji-leg.log)"
        PY=$PY SECONDS_FOR_LEG=$LEG_S OUT=${OUT:-/tmp/emoji-leg-out} bench/gpu/emoji_leg.sh \
            > "${OUT:-$PARTS}/emoji-leg.log" 2>&1 &
        LEG_PID=$!
    fi
    if [ "${SKIP_TESTS:-0}" = 1 ]; then TESTS_S=0; fi  # the tests have run on this GPU: all the time to the timings
    echo "== pytest -m gpu ($(left) s left)"
    LOG=${OUT:-$PARTS}/pytest-gpu.log
    # deterministic cuBLAS for the tests alone: its smaller workspace is not what the measurements should run under
    [ "$TESTS_S" -gt 0 ] && CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout -k 10 "$TESTS_S" "$PY" -m pytest -m gpu \
        tests/test_gpu.py ${GPU_TESTS:+-k "$GPU_TESTS"} -q -rfE -p no:cacheprovider --durations=8 2>&1 | tee "$LOG"
    if [ -n "$LEG_PID" ]; then
        echo "== waiting for the emoji leg ($(left) s left)"
        wait "$LEG_PID"
        tail -3 "${OUT:-$PARTS}/emoji-leg.log"
    fi
    summary=$(grep -sE '(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$LOG" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')
    [ "$TESTS_S" -gt 0 ] || summary="skipped (SKIP_TESTS=1)"
    note "pytest -m gpu" "${summary:-timed out or did not finish (see pytest-gpu.log)}" "zz-pytest"
fi

stage() {  # stage FILE BUDGET_S ARGS...: one bench.py process, time-boxed (at most what is left of LIMIT)
    local file=$1 budget=$2
    shift 2
    local t=$(( $(left) < budget ? $(left) : budget ))
    if [ "$t" -lt 15 ]; then note "${file//-/ }" "skipped: the run's time limit was reached" "$file"; return; fi
    echo "== $file (${t} s of $(left) s left)"
    timeout -k 5 "$t" "$PY" bench/gpu/bench.py --device "$DEVICE" $TINY --part "$PARTS/$file.json" "$@" \
        || [ -f "$PARTS/$file.json" ] || note "${file//-/ }" "failed or timed out after ${t} s" "$file"
}
SECS=6
[ -n "$TINY" ] && SECS=0
stage matmul 40 --stage matmul
stage train 90 --stage train --seconds $SECS --profile
# inductor's C++ compile on 2 shared cores takes minutes: the GPU run measures compiled rows, the CPU check skips them
compiled() {  # compiled FILE BUDGET_S ARGS...
    if [ "$DEVICE" = cpu ]; then note "${1//-/ }" "skipped (CPU check: no compile)" "$1"; else stage "$@" --compile; fi
}
compiled train-compiled 150 --stage train --seconds $SECS --profile --name "train compiled"
# what checkpointing and a small batch cost (batch 16 and 32 without it), and cuDNN's algorithm search (2026-11-27's
# run, docs/gpu.md, ran out of time before these)
stage train-b16-no-checkpointing 70 --stage train --batch 16 --checkpointing off --seconds $SECS --profile \
    --name "train b16 no checkpointing"
stage train-cudnn-benchmark 70 --stage train --cudnn-benchmark --seconds $SECS --profile --name "train cudnn benchmark"
stage train-b32-no-checkpointing 70 --stage train --batch 32 --checkpointing off --seconds $SECS --profile \
    --name "train b32 no checkpointing"
if [ "${SAMPLE:-1}" = 1 ]; then
    stage sample-b1-eager 45 --stage sample --batch 1 --seconds $SECS
    stage sample-b8-eager 45 --stage sample --batch 8 --seconds $SECS
    compiled sample-b1-compiled 150 --stage sample --batch 1 --seconds $SECS
    compiled sample-b8-compiled 150 --stage sample --batch 8 --seconds $SECS
fi
echo "== table ($((SECONDS - START)) s in all)"
"$PY" bench/gpu/bench.py --stage table --parts "$PARTS" ${OUT:+--out "$OUT"}
