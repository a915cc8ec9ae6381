"""Which mixed precision to train in: ``train.mixed_precision: auto`` follows the machine (issue 14).

    from train.run.precision import resolve_mixed_precision
    precision = resolve_mixed_precision("auto", torch.device("cpu"))   # "fp32" or "bf16"

On a CUDA device ``auto`` is bf16 where the GPU supports it, fp16 otherwise. On a CPU, bf16
autocast is ~2x faster than fp32 on cores with bf16 instructions (AVX512-BF16, AMX) and far
slower on cores without them (a bf16 matmul was ~150x slower than fp32 on an AVX2 Zen 3), so ``auto`` times a small training-like workload (a 512x512 matmul and a 3x3 64->64
conv on an (8, 64, 32, 32) input, forward and backward) in fp32 and under bf16 autocast, in this
process on one thread, and picks bf16 only when it is at least ``BF16_MIN_SPEEDUP`` times faster.
One thread: the ratio is a property of the cores' instructions, and on shared cores a
multi-threaded probe measures the other processes (here, 2 threads beside busy processes gave
bf16 0.63x fp32 where 1 thread gives 2.0x, every step ~50x slower).
Hopeless bf16 is found in a few tenths of a second: the probe first times a 1/60 workload and
stops there when bf16 is over ``HOPELESS`` times slower than fp32. ~0.3 s in all here (AMD EPYC with
AVX512-BF16: bf16 1.6-2.6x fp32 over several runs).

The probe runs once per process, and its result is kept in ``$LDM_CACHE/precision.json`` (else
``~/.cache/ldm-toolkit/precision.json``) keyed by the CPU's model string, its bf16-related
instruction flags and the torch version, so that later runs on the same machine do not probe again.
Any explicit value ("fp32", "bf16", "fp16") is returned as is: whether it suits the device is the
trainer's business.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from ldm_io import write_text

ALLOWED = ("auto", "fp32", "bf16", "fp16")
BF16_MIN_SPEEDUP = 1.15  # "auto" picks bf16 on a CPU only when the probe finds it at least this much faster
HOPELESS = 3.0  # a bf16 trial this many times slower than fp32 ends the probe
BUDGET_S = 1.0  # the probe's repeats stop after this many seconds (each side timed at least once)
REPEATS = 3  # timed trials of each side on the full workload (after one untimed one)
CACHE_FILE = "precision.json"
# the CPU flags that decide bf16 speed (x86: AVX512-BF16, AMX; Arm: BF16 / SVE); part of the cache key,
# since a VM's model string can be as vague as "AMD EPYC" for CPUs with and without them
BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16", "sve", "sve2")


def resolve_mixed_precision(requested: str, device: torch.device, log: Callable[[str], object] = print) -> str:
    """``requested`` ("auto", "fp32", "bf16" or "fp16") as the precision to train in on ``device``:
    "fp32", "bf16" or "fp16". Only "auto" is resolved (and logged, one line); the others pass through."""
    if not isinstance(requested, str) or requested not in ALLOWED:
        raise ValueError(f"mixed_precision {requested!r}; allowed: {', '.join(ALLOWED)}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        choice = "bf16" if bf16 else "fp16"
        log(f"mixed_precision auto -> {choice} (CUDA {torch.cuda.get_device_name(device)}: bf16 "
            f"{'supported' if bf16 else 'not supported'})")
    elif device.type == "cpu":
        speedup = probe_cpu_bf16_speedup()
        choice = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
        log(f"mixed_precision auto -> {choice} (CPU probe: bf16 {speedup:.2f}x fp32 on {cpu_model()}; "
            f"bf16 needs >= {BF16_MIN_SPEEDUP}x)")
    else:
        choice = "fp32"
        log(f"mixed_precision auto -> fp32 (no rule for {device.type} devices)")
    return choice


@functools.cache
def probe_cpu_bf16_speedup() -> float:
    """How many times faster a small training workload runs under bf16 autocast than in fp32 on this
    CPU (< 1: slower). Measured once per process, and read from the disk cache where it has been
    measured before on this CPU model with this torch."""
    key = cache_key()
    path = cache_path()
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("speedup"), (int, float)) and entry["speedup"] > 0:
        return float(entry["speedup"])
    result = _measure()
    if result["speedup"] > 0:  # not an error
        _write_cache(path, key, {**result, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return float(result["speedup"])


# -- the machine ------------------------------------------------------------------------------------


@functools.cache
def _cpuinfo() -> tuple[str, frozenset]:
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif name in ("flags", "features") and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", flags


def cpu_model() -> str:
    """The CPU's model string (``/proc/cpuinfo``'s model name, else ``platform.processor()``)."""
    return _cpuinfo()[0]


def cache_key() -> str:
    """What a probe result is kept under: CPU model, its bf16-related flags, torch version."""
    model, flags = _cpuinfo()
    present = [f for f in BF16_FLAGS if f in flags]
    return f"{model} [{' '.join(present) or 'no flags'}] torch {torch.__version__}"


def cache_path() -> Path:
    root = os.environ.get("LDM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ldm-toolkit")
    return Path(root) / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Add ``entry`` under ``key``, atomically (a temporary file renamed over the old one); a cache
    that cannot be written is no error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass


# -- the probe --------------------------------------------------------------------------------------


def _workload(batch: int, side: int, n: int, generator: torch.Generator) -> Callable[[], None]:
    """One forward and backward of an n x n matmul and a 3x3 64->64 conv on (batch, 64, side, side)."""
    a = torch.randn(n, n, generator=generator, requires_grad=True)
    b = torch.randn(n, n, generator=generator, requires_grad=True)
    x = torch.randn(batch, 64, side, side, generator=generator, requires_grad=True)
    w = torch.randn(64, 64, 3, 3, generator=generator, requires_grad=True)

    def step():
        loss = (a @ b).float().square().mean() + torch.nn.functional.conv2d(x, w, padding=1).float().square().mean()
        loss.backward()
        for t in (a, b, x, w):
            t.grad = None

    return step


def _trial(step: Callable[[], None], bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        step()
    return time.perf_counter() - t0


def _measure() -> dict:
    """Time the workload in fp32 and under bf16 autocast: {"speedup", "fp32_s", "bf16_s", "stage"}.

    Stage "screen": a 1/60 workload (a 128^2 matmul, the conv on (1, 64, 12, 12)), one untimed and
    one timed trial a side (two when the ratio is borderline); bf16 over ``HOPELESS`` times slower
    there ends the probe. Stage "full": one untimed trial a side, then up to ``REPEATS`` pairs in
    turn, stopping early when bf16 is hopeless or ``BUDGET_S`` has passed; the minimum of each side.
    One thread (restored after); its own random generator (the global one is left as it was)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_one_thread()
    finally:
        torch.set_num_threads(threads)


def _measure_one_thread() -> dict:
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    try:
        # the screen: ~1/60 of the full workload's FLOPs (2.6 GFLOP), so that hopeless bf16 costs ~0.1-0.3 s
        small = _workload(batch=1, side=12, n=128, generator=g)
        _trial(small, False), _trial(small, True)  # untimed: first-call costs (kernel selection, allocations)
        small_fp32, small_bf16 = _trial(small, False), _trial(small, True)
        if HOPELESS * small_fp32 < small_bf16 < 10 * HOPELESS * small_fp32:  # a slow spell? once more
            small_fp32, small_bf16 = min(small_fp32, _trial(small, False)), min(small_bf16, _trial(small, True))
        if small_bf16 > HOPELESS * small_fp32:
            return {"speedup": small_fp32 / small_bf16, "fp32_s": small_fp32, "bf16_s": small_bf16, "stage": "screen"}

        full = _workload(batch=8, side=32, n=512, generator=g)
        _trial(full, False)
        t32 = _trial(full, False)
        _trial(full, True)
        t16 = _trial(full, True)
        fp32_s, bf16_s = t32, t16
        for _ in range(REPEATS - 1):
            if bf16_s > HOPELESS * fp32_s or time.perf_counter() - start > BUDGET_S:
                break
            fp32_s = min(fp32_s, _trial(full, False))
            bf16_s = min(bf16_s, _trial(full, True))
        return {"speedup": fp32_s / bf16_s, "fp32_s": fp32_s, "bf16_s": bf16_s, "stage": "full"}
    except RuntimeError as e:  # bf16 autocast not supported by this build: never faster
        return {"speedup": 0.0, "fp32_s": 0.0, "bf16_s": 0.0, "stage": f"error: {e}"[:200]}
