"""The full-size fine-tune step fits this machine (issue 16, point 5).

One LoRA step and one full fine-tune step of the Stable Diffusion 1.5-size U-Net (configs/ldm/sd-512.yaml,
859.5M parameters, random weights) at 512 px (64x64x4 latents, 77x768 contexts), batch 1, run the way
``ldm finetune`` runs them (``bench/bench_finetune_full.py``'s cases, each in its own process), and the
process's peak resident set (VmHWM) stays under a bound well below the machine's 24 GiB, with the
options README's "Full size" names: gradient checkpointing, ``mixed_precision: auto`` (bf16 autocast
here) and, for the full step, no EMA.

The bounds are the measured peaks (README, "Full size") plus about a tenth, for what allocator and
thread-pool sizes vary between runs; the float32 weights alone are 3.2 GiB. A step that grows by more
(a second copy of the weights, an optimizer state, activations kept that checkpointing should drop)
fails here. Each case needs that much memory free; a machine without it fails here, as it would fail
to train.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_finetune_full.py"
GIB = 1024**3
SD15_PARAMETERS = 859_520_964  # diffusers' UNet2DConditionModel of SD 1.x (runwayml/stable-diffusion-v1-5 unet)
LORA_RANK8_PARAMETERS = 1_594_368  # rank 8 A and B on to_q, to_k, to_v, to_out.0 of its 32 attention blocks

# case -> (peak RSS bound in GiB, trained parameters). Measured peaks (bench, 2026-11-27): LoRA 8.50 GiB
# (two float32 copies of the weights, 6.4 GiB: the trained U-Net and the base finetune keeps for the
# bundle), full without EMA 14.61 GiB (weights, gradients and two AdamW moments in float32, 12.8 GiB).
CASES = {
    "lora": (9.5, LORA_RANK8_PARAMETERS),
    "full-no-ema": (16.0, SD15_PARAMETERS),
}


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("/proc/meminfo has no MemAvailable")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_full_size_step_fits(case, tmp_path):
    bound, trained = CASES[case]
    free = available_gib()
    assert free > bound, f"{free:.1f} GiB of memory available; the {case} step needs up to {bound} GiB"
    result = tmp_path / "result.json"
    # --max-rss-gib: the bench's guard ends the step when the bound is passed, before it can starve the machine
    # (and the step's process sets its oom_score_adj to 1000: if memory runs out all the same, it goes first)
    proc = subprocess.run([sys.executable, str(BENCH), "--child", case, "--result", str(result), "--steps", "1",
                           "--warmup", "0", "--no-count", "--max-rss-gib", str(bound)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert result.is_file(), f"status {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    record = json.loads(result.read_text())
    assert "error" not in record, record["error"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (record["parameters"], record["resolution"], record["batch_size"]) == (SD15_PARAMETERS, 512, 1)
    assert record["trainable_parameters"] == trained
    # the step ran: a finite loss, not skipped, and AdamW's two moments exist for every trained weight
    assert len(record["losses"]) == 1 and math.isfinite(record["losses"][0]) and record["skipped_steps"] == 0
    assert record["optimizer_state_numel"] == 2 * trained
    assert record["peak_rss"] < bound * GIB, f"{case}: peak RSS {record['peak_rss'] / GIB:.2f} GiB >= {bound} GiB"
