"""Sweep the classifier-free guidance weight: prompts x weights x seeds.

Each seed's starting noise is shared across weights. Writes to --out:
  grid.png      rows: weights; columns: prompts x seeds
  metrics.csv   one row per weight: CLIP score, diversity across seeds, and for shapes
  metrics.json  prompts the exact attribute accuracies read back by the shapes checker
  metrics.png   each metric against w
--out must be a new or empty folder; --overwrite replaces an earlier sweep's files there.

examples:
  ldm sweep "koala, twemoji style" "red apple, noto style" --guidance 1,2,4,8 --seeds 0,1,2,3 --out sweep/
  ldm sweep "a small red circle at the top left" --model shapes --guidance 0,1,2,4 --out shapes-sweep/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.errors import UsageError
from ldm.generate_cli import add_model_arguments, check_request, load, model_path, progress_bar, with_estimate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    add_model_arguments(p)
    p.add_argument("--guidance", default="1,2,4,8", help="comma-separated weights (default 1,2,4,8)")
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds (default 0,1,2,3)")
    p.add_argument("--clip", type=Path, default=None,
                   help="CLIP for the metrics: a bundle or CLIP folder (default: the model's own text encoder, if it is a CLIP)")
    p.add_argument("--out", type=Path, required=True, help="output folder: new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier sweep in --out")


def run(args: argparse.Namespace) -> int:
    from ldm.sweep import claim_sweep_output, clip_metrics, parse_list, run_sweep, shapes_metrics, write_outputs

    weights = parse_list(args.guidance, float, "--guidance")
    seeds = parse_list(args.seeds, int, "--seeds")
    if any(not w >= 0 for w in weights):
        raise UsageError(f"--guidance {args.guidance}: every weight must be >= 0")
    model = model_path(args.model)
    claim_sweep_output(args.out, overwrite=args.overwrite, models=[model, args.clip])  # before loading anything
    n = len(args.prompts) * len(seeds) * len(weights)
    est, free = check_request(args, model, n, grid=True, fewer="fewer prompts, --seeds or --guidance weights",
                              guidances=weights)
    pipe = load(args, model)
    progress, close = progress_bar(args.quiet, "sweep")
    progress = with_estimate(progress, est, free)
    try:
        result = run_sweep(pipe, args.prompts, weights, seeds, negative_prompt=args.negative, steps=args.steps,
                           method=args.method, eta=args.eta, sigmas=args.sigmas, height=args.height, width=args.width,
                           batch_size=args.batch_size, progress=progress)
    finally:
        close()
    scorer = clip_scorer(args.clip or model)
    if scorer is not None:
        clip_metrics(result, scorer)
    shapes_metrics(result)
    paths = write_outputs(result, args.out, overwrite=args.overwrite)
    for w in weights:
        print(f"w={w:g}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.get(w, {}).items())))
    print("\n".join(str(p) for p in paths.values()))
    return 0


def clip_scorer(path: Path):
    """The CLIP scorer at ``path``, or None (with a note) when that folder holds no image tower."""
    import sys

    import conditioning

    try:
        return conditioning.load_clip_scorer(path)
    except (ValueError, FileNotFoundError) as exc:
        print(f"note: no CLIP score or diversity ({exc}); give --clip a CLIP folder", file=sys.stderr)
        return None
