#!/usr/bin/env bash
# Step 1 of the GPU check, on a machine that reaches PyPI: download the wheels the GPU machine lacks
# (bench/gpu/requirements.txt: diffusers, open_clip_torch, datasets and their small pure-Python needs that a
# stock PyTorch image does not have) into bench/gpu/wheels/ (git-ignored), for Python 3.12 on x86-64 Linux.
# This project's own code travels as source (the repository) and is installed from it by run.sh.
#
#   bench/gpu/prepare.sh            then, on the GPU machine (no network): bench/gpu/run.sh
#
# The device tool carries the working tree and the paths named in its `carry` (bench/gpu/wheels) up to
# 64 MiB in all; this prints the wheels' sizes and what travels, and fails if that is over.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-64}
rm -rf wheels.tmp && mkdir -p wheels.tmp
grep -v '^#' requirements.txt | grep -v '^$' | while read -r req; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d wheels.tmp "$req"
done
rm -rf wheels && mv wheels.tmp wheels
echo "wheels in bench/gpu/wheels:"
ls -l wheels | awk 'NR > 1 {printf "  %-60s %7.2f MiB\n", $9, $5 / 1048576}'
wheels=$(du -cb wheels/*.whl | tail -1 | cut -f1)
tree=$(cd ../.. && git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s}')
awk -v w="$wheels" -v t="$tree" -v l="$LIMIT_MIB" 'BEGIN {
    printf "wheels %.2f MiB + working tree %.2f MiB = %.2f MiB to carry (limit %d MiB)\n", w / 1048576, t / 1048576, (w + t) / 1048576, l
    exit (w + t > l * 1048576) }' || { echo "over the device tool's carry limit" >&2; exit 1; }
