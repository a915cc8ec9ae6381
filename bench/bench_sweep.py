"""A 256-image sweep against the same images made by `ldm generate` calls, side by side in one run.

    python bench/bench_sweep.py                    # shapes model, DDIM 10 steps; --steps, --backend, --out

The sweep: 2 shapes prompts x 16 seeds x 2 guidance methods (cfg, apg) x 4 weights (2, 3, 4, 6) = 256 images.
Three ways to make those images, timed in this one run on this machine:

1. `ldm sweep ... --out DIR` as one command (whole process: start, load, every image, then the metrics,
   grids and plots); its sampler batches span cells (rows of several weights in one batch).
2. `ldm generate PROMPT --guidance W --guidance-method M --num-images 16 --seed 0` once per (cell, prompt):
   16 commands, each starting, loading the model and making its 16 images (seeds 0-15) in batches of 8.
3. In one process, the pipeline called once per (cell, prompt) (`ldm generate`'s way: batches of 8 of one
   cell, one U-Net call per image), against the sweep's own batch plan (``ldm.sweep.generate``: one U-Net call
   per step on a batch of up to 64 rows across cells): the batching alone, without process starts or metrics.

Prints images/s of each and the ratios, and how far the sweep's images are from the generate commands'
(the same seeds give the same starting noise; batch composition may flip a rounding). Writes a JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a small red circle at the top left", "a large blue square in the centre"]
SEEDS = list(range(16))
METHODS = ["cfg", "apg"]
WEIGHTS = [2.0, 3.0, 4.0, 6.0]


def ldm(*args: str) -> float:
    """Run `ldm ARGS` as a user would (a fresh interpreter); returns its wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ldm.cli", *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    p.add_argument("--backend", default="auto", help="torch, onnx or auto, for every way (default auto)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-sweep.json"))
    args = p.parse_args()
    n = len(PROMPTS) * len(SEEDS) * len(METHODS) * len(WEIGHTS)
    common = ["--model", "shapes", "--steps", str(args.steps), "--backend", args.backend, "--quiet"]
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ldm("generate", PROMPTS[0], *common, "--out", str(tmp / "warm.png"))  # ONNX graphs exported, files cached
        times["ldm sweep (one command)"] = ldm(
            "sweep", *PROMPTS, *common, "--guidance", ",".join(f"{w:g}" for w in WEIGHTS), "--guidance-method",
            ",".join(METHODS), "--seeds", ",".join(map(str, SEEDS)), "--out", str(tmp / "sweep"))
        total, diffs = 0.0, []
        for method in METHODS:
            for w in WEIGHTS:
                for k, prompt in enumerate(PROMPTS):
                    out = tmp / "gen" / f"{method}-{w:g}-{k}.png"
                    total += ldm("generate", prompt, *common, "--guidance", f"{w:g}", "--guidance-method", method,
                                 "--num-images", str(len(SEEDS)), "--seed", "0", "--out", str(out))
                    for s in SEEDS:
                        cell = next((tmp / "sweep" / "images").glob(f"{method}*_w{w:g}_ddim_{args.steps}"))
                        a = np.asarray(Image.open(out.with_name(f"{out.stem}-{s}.png")), dtype=int)
                        b = np.asarray(Image.open(cell / f"{k:05d}-seed{s}.png"), dtype=int)
                        diffs.append(int(np.abs(a - b).max()))
        times[f"ldm generate x {len(METHODS) * len(WEIGHTS) * len(PROMPTS)} commands"] = total
    times.update(in_process(args))
    print(f"{n} images, shapes model, DDIM {args.steps} steps, backend {args.backend}, {os.cpu_count()} CPUs")
    for name, seconds in times.items():
        print(f"  {name:58s} {seconds:7.1f} s  {n / seconds:6.2f} images/s")
    calls = next(k for k in times if k.startswith("ldm generate"))
    print(f"  the sweep command is {times[calls] / times['ldm sweep (one command)']:.2f}x the {calls}")
    plan = times["in process: the sweep's batch plan (across cells)"]
    per_cell = times["in process: one pipeline call per (cell, prompt)"]
    print(f"  in process, the sweep's batches across cells are {per_cell / plan:.2f}x one call per (cell, prompt)")
    print(f"  sweep images vs generate commands: max pixel difference {max(diffs)} (of 255), "
          f"{sum(d == 0 for d in diffs)}/{len(diffs)} identical")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": n, "steps": args.steps, "backend": args.backend, "seconds": times,
                                    "max_pixel_difference": max(diffs),
                                    "identical": sum(d == 0 for d in diffs)}, indent=2))


def in_process(args) -> dict[str, float]:
    """Generation alone in this process: one pipeline call per (cell, prompt) against the sweep's batch plan."""
    import torch

    from ldm.bundle import PACKAGED_MODELS
    from ldm.pipeline import Text2ImagePipeline
    from ldm.sweep import SweepSpec, generate, make_cells, plan_batches

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from ldm.backends import resolve_backend

    pipe = Text2ImagePipeline.from_pretrained(PACKAGED_MODELS["shapes"], backend=resolve_backend(args.backend, "cpu"))
    cells = make_cells(WEIGHTS, METHODS, [args.steps])
    spec = SweepSpec(PROMPTS, SEEDS, cells, batch_size=64)  # what ldm sweep picks on a CPU here
    pipe(PROMPTS[0], steps=2)  # warm-up
    start = time.perf_counter()
    for cell in cells:
        for prompt in PROMPTS:
            pipe(prompt, steps=cell.steps, guidance=cell.guidance, guidance_method=cell.guidance_method, seed=0,
                 num_images=len(SEEDS))
    per_cell = time.perf_counter() - start
    start = time.perf_counter()
    for _ in generate(pipe, spec, plan_batches(spec)):
        pass
    plan = time.perf_counter() - start
    return {"in process: one pipeline call per (cell, prompt)": per_cell,
            "in process: the sweep's batch plan (across cells)": plan}


if __name__ == "__main__":
    main()
