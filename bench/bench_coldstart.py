"""Cold start of ``ldm generate``: the whole process, before (the torch pipeline) and after (the torch-free runner).

One run, side by side, on this machine: ``ldm generate PROMPT`` on the default model is started as a
subprocess, its wall time measured from outside, and its split read from the line it prints with
``LDM_TIMINGS=1`` (start-up and imports, loading, text encoding, sampling, decoding, PNG). "torch" is
``--runtime torch`` (the torch pipeline with the ONNX Runtime backend, what ``ldm generate`` ran before
``ldm.runtime``), "torch-free" is the default. The two take turns in each repeat, so a busy spell on a
shared machine hits both; the fastest run of each is shown, and the ratio. A first run of the torch path
exports the graphs and writes the runner's files (not timed). ``ldm --help`` is timed too.

    python bench/bench_coldstart.py [--repeats 3] [--steps 50] [--prompt "koala, twemoji style"]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's ldm, not an installed one
PHASES = ("start-up and imports", "loading", "text encoding", "sampling", "decoding", "png")
PATHS = {"torch": ["--runtime", "torch"], "torch-free": []}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(args: list[str]) -> tuple[float, dict]:
    """(wall seconds, phase -> seconds) of one ``ldm`` process; the phases include "CPU" (its CPU seconds,
    all threads), which a busy shared machine inflates far less than the wall time."""
    env = {**os.environ, "LDM_TIMINGS": "1", "PYTHONPATH": str(ROOT)}
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    done = subprocess.run([sys.executable, "-m", "ldm.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if done.returncode != 0:
        raise SystemExit(f"ldm {' '.join(args)} failed:\n{done.stderr}")
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("timings: ")]
    timings = json.loads(lines[-1][len("timings: "):]) if lines else {}
    # the torch path samples and encodes text in one call: its text encoding is inside its sampling
    split = {"loading": timings.get("loading", 0.0), "text encoding": timings.get("text encoding", 0.0),
             "sampling": timings.get("sampling", timings.get("sampling (with text encoding)", 0.0)),
             "decoding": timings.get("decoding", 0.0), "png": timings.get("png", 0.0)}
    # interpreter start-up, the CLI, and the imports (the torch path times its own; the rest is start-up)
    split["start-up and imports"] = wall - sum(split.values())
    split["CPU"] = cpu
    return wall, split


def batch_cost(repeats: int, images: int = 8) -> tuple[float, float]:
    """Seconds of one guided step for ``images`` images of the default model in ONNX Runtime: (one U-Net
    call on all 2 x images rows, as the pipeline made before, one call per image's [uncond, cond] pair, as now);
    the two take turns, fastest of ``repeats`` x 5."""
    import numpy as np

    from ldm.bundle import DEFAULT_BUNDLE, bundle_hash
    from ldm.runtime.runner import Runner

    runner = Runner(DEFAULT_BUNDLE, bundle_hash(DEFAULT_BUNDLE))
    c, h, w = runner.latent_shape(None, None)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * images, c, h, w)).astype(np.float32)
    ctx = np.concatenate([runner.encode("koala, twemoji style")] * (2 * images))
    one, pairs = [], []
    for _ in range(repeats * 5):
        t0 = time.perf_counter()
        runner.unet(x, 500.0, ctx)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(images):
            runner.unet(x[2 * i : 2 * i + 2], 500.0, ctx[2 * i : 2 * i + 2])
        pairs.append(time.perf_counter() - t0)
    return min(one), min(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompt", default="koala, twemoji style")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        request = ["generate", a.prompt, "--steps", str(a.steps), "--quiet"]
        run_once([*request, "--runtime", "torch", "--out", f"{tmp}/warm.png"])  # exports graphs, writes runner files
        best: dict[str, tuple[float, dict]] = {}
        for r in range(a.repeats):
            for name, extra in PATHS.items():
                wall, split = run_once([*request, *extra, "--out", f"{tmp}/{name}-{r}.png"])
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, split)
        helps = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ldm.cli", "--help"], cwd=ROOT, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
            helps.append(time.perf_counter() - t0)
        from PIL import Image
        import numpy as np

        images = {n: np.asarray(Image.open(f"{tmp}/{n}-0.png").convert("RGB"), dtype=np.int16) for n in PATHS}
        diff = np.abs(images["torch"] - images["torch-free"])
    print(f"ldm generate {a.prompt!r} --steps {a.steps} on the default model; fastest of {a.repeats} "
          f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'seconds':<22}" + "".join(f"{n:>12}" for n in PATHS) + f"{'ratio':>8}")
    for phase in PHASES:
        t, f = (best[n][1][phase] for n in PATHS)
        print(f"{phase:<22}{t:>12.2f}{f:>12.2f}{t / f if f > 0 else float('inf'):>8.1f}")
    t, f = (best[n][0] for n in PATHS)
    print(f"{'whole process':<22}{t:>12.2f}{f:>12.2f}{t / f:>8.1f}")
    t, f = (best[n][1]["CPU"] for n in PATHS)
    print(f"{'its CPU seconds':<22}{t:>12.2f}{f:>12.2f}{t / f:>8.1f}")
    print(f"ldm --help: {min(helps):.2f} s; torch vs torch-free PNG: max difference {diff.max()}/255 in "
          f"{int((diff > 0).sum())} of {diff.size} values")
    one, pairs = batch_cost(a.repeats)
    print(f"a guided step for 8 images: one U-Net call on 16 rows {one * 1000:.0f} ms, 8 calls on [uncond, cond] "
          f"pairs {pairs * 1000:.0f} ms ({pairs / one:.2f}x: the price of images that do not depend on their batch)")


if __name__ == "__main__":
    main()
