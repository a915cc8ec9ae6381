"""Figures and figures-of-merit for docs/training-report.md, from the shipped models and their runs.

    python scripts/make_report.py [--emoji ldm/default_model] [--shapes ldm/shapes_model] \
        [--runs runs] [--data data] [--out docs/figures]

Writes to --out: loss-curves.png, heldout-emoji.png (held-out prompts x seeds), sweep-emoji/ and
sweep-shapes/ (`ldm sweep` outputs: grid, metrics.csv/json, metrics.png), samplers-emoji.png and
samplers-shapes.png (DDIM against DDPM at 10 to 1000 steps) and report.json with every number.
Uses the ONNX Runtime backend (the same images as PyTorch to float tolerance, faster on a CPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ldm_io import write_text

STEPS = (10, 25, 50, 100, 1000)
EMOJI_TRAIN_PROMPTS = ["koala, twemoji style", "red apple, noto style", "grinning face, twemoji style",
                       "fire, noto style"]
# training captions README's examples are chosen from (make_report.py --candidates: each one's CLIP score, 4 seeds)
README_CANDIDATES = [f"{name}, {style} style" for name in (
    "koala", "red apple", "grinning face", "fire", "cat face", "dog face", "rocket", "snowman", "banana", "watermelon",
    "four leaf clover", "christmas tree", "smiling face with sunglasses", "crown", "rainbow", "ghost",
    "face with tears of joy", "hamburger", "strawberry") for style in ("twemoji", "noto")]
SHAPES_PROMPTS = ["a large red circle in the centre", "a small blue square at the top left",
                  "a large green triangle at the bottom right", "a small yellow circle at the left",
                  "a large purple square at the top", "a small cyan triangle at the bottom",
                  "a large yellow triangle at the right", "a small red square at the bottom left"]


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def loss_curves(runs: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("emoji CLIP: contrastive loss", [runs / "clip-emoji" / "logs" / "train.csv"], "loss"),
        ("emoji VQ-VAE: train PSNR (dB)", [runs / "vae-emoji-f4" / "logs" / "train.csv"], "psnr"),
        ("emoji U-Net: loss", [runs / "ldm-emoji" / "logs" / "train.csv"], "loss"),
        ("shapes CLIP: contrastive loss", [runs / "clip-shapes" / "logs" / "train.csv"], "loss"),
        ("shapes VQ-VAE: train PSNR (dB)", [runs / "vae-shapes" / "logs" / "train.csv"], "psnr"),
        ("shapes U-Net: loss", [runs / "ldm-shapes" / "logs" / "train.csv"], "loss"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, paths, key) in zip(axes.flat, panels):
        for path in paths:
            rows = [r for r in read_rows(path) if r.get(key) not in (None, "")]
            ax.plot([float(r["step"]) for r in rows], [float(r[key]) for r in rows], lw=1, label="train")
        heldout = read_rows(paths[0].parent / "val.csv")  # the U-Net runs: held-out loss, trained and EMA weights
        for key_, label in (("loss", "held-out"), ("loss_ema", "held-out, EMA")):
            if heldout and key_ in heldout[0]:
                ax.plot([float(r["step"]) for r in heldout], [float(r[key_]) for r in heldout], "o-", label=label)
        if heldout:
            ax.legend()
        if key == "loss" and "U-Net" in title:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss-curves.png", dpi=90)
    plt.close(fig)


def row_grid(rows: list[tuple[str, list[Image.Image]]], scale: int = 2, label_w: int = 260) -> Image.Image:
    """One labelled row per (label, images)."""
    w, h = rows[0][1][0].size
    w, h = w * scale, h * scale
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + cols * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * h + h // 2 - 6), label[:42], fill="black")
        for c, im in enumerate(images):
            grid.paste(im.resize((w, h), Image.NEAREST), (label_w + c * w, r * h))
    return grid


def heldout_rows(data: Path) -> list[tuple[str, str]]:
    """(file_name, first caption) of every row of the data set's test split."""
    rows = read_rows(data / "metadata.jsonl")
    return [(r["file_name"], r["text"] if isinstance(r["text"], str) else r["text"][0]) for r in rows if r.get("split") == "test"]


def emoji_scores(bundle: Path, data: Path, out: Path | None = None) -> tuple[dict, list[str]]:
    """The held-out CLIP score of a bundle: 8 held-out captions (drawn with seed 0) and the 4 training prompts x
    seeds 0-3, DDIM 50 steps, guidance 4, scored by the bundle's own CLIP; with ``out``, heldout-emoji.png too.
    Returns (the report's emoji_prompts entry, with each prompt's mean score, the held-out captions)."""
    from conditioning.scorer import load_clip_scorer
    from ldm.pipeline import Text2ImagePipeline
    from ldm.sweep import run_sweep

    pipe = Text2ImagePipeline.from_pretrained(bundle, backend="onnx")
    scorer = load_clip_scorer(bundle)
    seeds = [0, 1, 2, 3]
    heldout = random.Random(0).sample(sorted({caption for _, caption in heldout_rows(data)}), 8)
    t0 = time.perf_counter()
    res = run_sweep(pipe, heldout + EMOJI_TRAIN_PROMPTS, [4.0], seeds, steps=50)
    images = res.images[res.cells[0]]
    k = len(seeds)
    if out is not None:
        row_grid([(p, images[i * k:(i + 1) * k]) for i, p in enumerate(res.prompts)]).save(out / "heldout-emoji.png")
    scores = scorer.score(images, [p for p in res.prompts for _ in seeds])  # (N,)
    n_held = len(heldout) * k
    return {"heldout": heldout, "train": EMOJI_TRAIN_PROMPTS, "guidance": 4.0, "steps": 50,
            "clip_score_heldout": float(scores[:n_held].mean()), "clip_score_train": float(scores[n_held:].mean()),
            "per_prompt": {p: float(scores[i * k:(i + 1) * k].mean()) for i, p in enumerate(res.prompts)},
            "seconds": time.perf_counter() - t0}, heldout


def candidate_scores(bundle: Path) -> dict[str, float]:
    """README_CANDIDATES' mean CLIP scores (seeds 0-3, DDIM 50 steps, guidance 4, the bundle's CLIP), best first."""
    from conditioning.scorer import load_clip_scorer
    from ldm.pipeline import Text2ImagePipeline
    from ldm.sweep import run_sweep

    pipe = Text2ImagePipeline.from_pretrained(bundle, backend="onnx")
    seeds = [0, 1, 2, 3]
    res = run_sweep(pipe, README_CANDIDATES, [4.0], seeds, steps=50)
    scores = load_clip_scorer(bundle).score(res.images[res.cells[0]], [p for p in res.prompts for _ in seeds])  # (N,)
    k = len(seeds)
    means = {p: round(float(scores[i * k:(i + 1) * k].mean()), 2) for i, p in enumerate(res.prompts)}
    return dict(sorted(means.items(), key=lambda kv: -kv[1]))


def emoji_section(bundle: Path, data: Path, out: Path, report: dict) -> None:
    from conditioning.scorer import load_clip_scorer
    from ldm.pipeline import Text2ImagePipeline
    from ldm.sweep import clip_metrics, run_sweep
    from ldm.sweep_report import write_outputs

    pipe = Text2ImagePipeline.from_pretrained(bundle, backend="onnx")
    scorer = load_clip_scorer(bundle)
    seeds = [0, 1, 2, 3]
    test_rows = heldout_rows(data)
    report["emoji_prompts"], heldout = emoji_scores(bundle, data, out)
    # references: the same CLIP on real held-out images with their captions, and on mismatched pairs
    real_images = [Image.open(data / name).convert("RGB") for name, _ in test_rows[:128]]
    real_caps = [caption for _, caption in test_rows[:128]]
    report["emoji_prompts"]["clip_score_real_images"] = float(scorer.score(real_images, real_caps).mean())
    report["emoji_prompts"]["clip_score_real_mismatched"] = float(scorer.score(real_images, real_caps[1:] + real_caps[:1]).mean())

    t0 = time.perf_counter()
    sweep = run_sweep(pipe, EMOJI_TRAIN_PROMPTS[:2] + heldout[:2], [1.0, 2.0, 3.0, 4.0, 6.0, 8.0], seeds, steps=50)
    clip_metrics(sweep, scorer)
    write_outputs(sweep, out / "sweep-emoji", overwrite=True)  # this script's own earlier figures
    report["sweep_emoji"] = {"prompts": sweep.prompts, "metrics": {str(c.guidance): m for c, m in sweep.metrics.items()},
                             "seconds": time.perf_counter() - t0}

    rows, metrics = [], {}
    prompts = EMOJI_TRAIN_PROMPTS[:2] + heldout[:2]
    for method in ("ddim", "ddpm"):
        for steps in STEPS:
            t0 = time.perf_counter()
            res = run_sweep(pipe, prompts, [4.0], [0, 1], steps=steps, method=method)
            clip_metrics(res, scorer)
            metrics[f"{method} {steps}"] = {**res.metrics[res.cells[0]], "seconds": time.perf_counter() - t0}
            rows.append((f"{method.upper()} {steps} steps  CLIP {res.metrics[res.cells[0]]['clip_score']:.1f}", res.images[res.cells[0]]))
    row_grid(rows).save(out / "samplers-emoji.png")
    report["samplers_emoji"] = {"prompts": prompts, "seeds": [0, 1], "guidance": 4.0, "metrics": metrics}


def shapes_section(bundle: Path, out: Path, report: dict) -> None:
    from ldm.pipeline import Text2ImagePipeline
    from ldm.sweep import run_sweep, shapes_metrics
    from ldm.sweep_report import write_outputs

    pipe = Text2ImagePipeline.from_pretrained(bundle, backend="onnx")
    seeds = [0, 1, 2, 3]
    sweep = run_sweep(pipe, SHAPES_PROMPTS, [0.0, 1.0, 2.0, 4.0, 6.0, 8.0], seeds, steps=50, batch_size=32)
    shapes_metrics(sweep)
    write_outputs(sweep, out / "sweep-shapes", overwrite=True)
    report["sweep_shapes"] = {"prompts": sweep.prompts, "metrics": {str(c.guidance): m for c, m in sweep.metrics.items()}}

    rows, metrics = [], {}
    for method in ("ddim", "ddpm"):
        for steps in STEPS:
            t0 = time.perf_counter()
            res = run_sweep(pipe, SHAPES_PROMPTS, [4.0], seeds, steps=steps, method=method, batch_size=32)
            shapes_metrics(res)
            metrics[f"{method} {steps}"] = {**res.metrics[res.cells[0]], "seconds": time.perf_counter() - t0}
            rows.append((f"{method.upper()} {steps}  all-correct {res.metrics[res.cells[0]]['all_acc']:.2f}", res.images[res.cells[0]][::4]))
    row_grid(rows, scale=2, label_w=200).save(out / "samplers-shapes.png")
    report["samplers_shapes"] = {"prompts": SHAPES_PROMPTS, "seeds": seeds, "guidance": 4.0, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emoji", type=Path, default=Path("ldm/default_model"))
    parser.add_argument("--shapes", type=Path, default=Path("ldm/shapes_model"))
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="run folders of scripts/train_default_model.sh")
    parser.add_argument("--data", type=Path, default=Path("data"), help="data sets of scripts/train_default_model.sh")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--only", choices=["curves", "emoji", "shapes"], action="append", default=None)
    parser.add_argument("--score", type=Path, action="append", default=None, metavar="BUNDLE",
                        help="only print the held-out and training CLIP scores of these emoji bundles (as the report "
                             "computes them; e.g. a run's bundle before it replaces ldm/default_model); writes nothing")
    parser.add_argument("--candidates", type=Path, default=None, metavar="BUNDLE",
                        help="only score each of README_CANDIDATES (training captions; seeds 0-3, DDIM 50 steps, "
                             "guidance 4) with this bundle, best first: printed, and kept in --out/report.json "
                             "(readme_candidates)")
    args = parser.parse_args()
    if args.candidates:
        scores = candidate_scores(args.candidates)
        print(json.dumps(scores, indent=2))
        path = args.out / "report.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
        write_text(path, json.dumps({**report, "readme_candidates": scores}, indent=2))
        return
    if args.score:
        for bundle in args.score:
            print(json.dumps({"bundle": str(bundle), **emoji_scores(bundle, args.data / "emoji")[0]}, indent=2))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ["curves", "emoji", "shapes"])
    report_path = args.out / "report.json"
    report: dict = {}
    torch.manual_seed(0)
    if "curves" in only:
        loss_curves(args.runs, args.out)
    if "shapes" in only:
        shapes_section(args.shapes, args.out, report)
    if "emoji" in only:
        emoji_section(args.emoji, args.data / "emoji", args.out, report)
    if report_path.is_file():  # another run (--only) may have written its sections meanwhile
        report = {**json.loads(report_path.read_text()), **report}
    report_path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
