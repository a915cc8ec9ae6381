"""Which sampler gives the best images per second on our models: quality and time per method and step count.

    python bench/bench_samplers.py --emoji data/emoji            # data/emoji: `ldm data emoji --out data/emoji`

For the shapes model (32 px) the measure is exact: the share of images whose colour, shape, size and
position are all right (``ldm.shapes.score_attributes``). For the default emoji model (64 px) it is the CLIP
score (the bundle's own CLIP) of held-out captions (the data set's test split, which neither model trained
on). Every method runs at 5, 10, 20 and 50 steps, guidance 4, the same prompts and seeds, on the CPU default
backend; time is the sampling wall time of the whole set. Prints a table and writes a JSON beside ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = [("ddim", None), ("ddpm", None), ("dpmpp-2m", None), ("dpmpp-2m", "karras"), ("euler", None),
           ("euler", "karras"), ("euler-a", None)]
STEPS = [5, 10, 20, 50]


def heldout_captions(data: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    held = sorted({r["text"] for r in rows if r.get("split") == "test" and not r.get("skin_tone")})
    return held[:: max(1, len(held) // n)][:n]


def run(pipe, prompts, seeds, score, *, method, sigmas, steps, guidance, batch_size=16):
    images, captions = [], []
    start = time.perf_counter()
    for seed in seeds:
        images += pipe(prompts, steps=steps, method=method, sigmas=sigmas, guidance=guidance, seed=seed,
                       batch_size=batch_size)
        captions += prompts
    seconds = time.perf_counter() - start
    return score(images, captions), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emoji", type=Path, required=True, help="the emoji data set (ldm data emoji), for held-out captions")
    p.add_argument("--prompts", type=int, default=32, help="prompts per model (default 32)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--out", type=Path, default=Path("runs/bench-samplers.json"))
    args = p.parse_args()

    from conditioning.scorer import load_clip_scorer
    from ldm import shapes
    from ldm.bundle import PACKAGED_MODELS
    from ldm.pipeline import Text2ImagePipeline

    specs = shapes.all_specs()
    shape_prompts = [s.caption for s in specs[:: len(specs) // args.prompts][: args.prompts]]
    scorer = load_clip_scorer(PACKAGED_MODELS["default"])

    def shapes_score(images, captions):
        return sum(bool(shapes.score_attributes(im, c)["all"]) for im, c in zip(images, captions)) / len(images)

    def clip_score(images, captions):
        with torch.no_grad():
            return float(100 * (scorer.encode_image(images) * scorer.encode_text(captions)).sum(-1).mean())

    cases = [("shapes", shape_prompts, shapes_score, "all-four-right"),
             ("default", heldout_captions(args.emoji, args.prompts), clip_score, "held-out CLIP score")]
    seeds = list(range(args.seeds))
    results = []
    for model, prompts, score, measure in cases:
        pipe = Text2ImagePipeline.from_pretrained(PACKAGED_MODELS[model], backend="auto")
        pipe(prompts[:2], steps=2, guidance=args.guidance)  # warm-up (ONNX sessions)
        for method, sigmas in METHODS:
            for steps in STEPS:
                value, seconds = run(pipe, prompts, seeds, score, method=method, sigmas=sigmas, steps=steps,
                                     guidance=args.guidance)
                row = {"model": model, "measure": measure, "method": method + (" karras" if sigmas else ""),
                       "steps": steps, "value": round(value, 4), "seconds": round(seconds, 2),
                       "images_per_s": round(len(prompts) * len(seeds) / seconds, 2)}
                results.append(row)
                print(f"{model:8s} {row['method']:16s} {steps:3d} steps  {measure} {value:7.3f}  "
                      f"{seconds:6.1f} s ({row['images_per_s']} img/s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from ldm_io import write_text

    write_text(args.out, json.dumps({"guidance": args.guidance, "prompts": args.prompts, "seeds": args.seeds,
                                     "cpu": _cpu(), "results": results}, indent=1))
    print(f"wrote {args.out}")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
