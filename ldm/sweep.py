"""Guidance-weight sweeps: prompts x weights x seeds, with each seed's starting noise shared
across weights, so that a row of the grid shows one image changing with w alone.

Metrics per weight:
* ``clip_score``: 100 x cosine(CLIP image embedding, CLIP text embedding), averaged over images
  (the convention of Hessel et al. 2021 without the clip at 0);
* ``diversity``: mean pairwise cosine distance (1 - cos) between the CLIP image embeddings of
  one prompt's images across seeds, averaged over prompts (needs two or more seeds);
* for prompts in the shapes set's caption language, ``shape_acc``, ``colour_acc``, ``size_acc``,
  ``position_acc`` and ``all_acc`` (every attribute right) read back by ``ldm.shapes``' exact checker.
A model that has learned anything shows alignment rising with w and diversity falling.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw

from ldm.pipeline import GenerationRequest, Text2ImagePipeline, to_pil
from ldm_io import atomic_path, claim_output_dir, save_image, write_text

COMMAND = "ldm sweep"
SWEEP_FILES = ("grid.png", "metrics.csv", "metrics.json", "metrics.png")  # a folder of these (and no marker) is a sweep's


@dataclass
class SweepResult:
    weights: list[float]
    prompts: list[str]
    seeds: list[int]
    images: dict[float, list[Image.Image]]  # w -> images ordered (prompt, seed), seed fastest
    metrics: dict[float, dict[str, float]] = field(default_factory=dict)


def parse_list(text: str, kind, name: str) -> list:
    """"1,2,4" -> [1, 2, 4] with a clear error for anything else."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise ValueError(f"{name}={text!r} must be a comma-separated list of {kind.__name__} values") from None
    if not values:
        raise ValueError(f"{name} is empty; give e.g. {name}=1,2,4")
    return values


def run_sweep(
    pipe: Text2ImagePipeline,
    prompts: Sequence[str],
    weights: Sequence[float],
    seeds: Sequence[int],
    *,
    negative_prompt: Optional[str] = None,
    steps: int = 50,
    method: str = "ddim",
    eta: float = 0.0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: int = 8,
    progress=None,
) -> SweepResult:
    """Images for every (w, prompt, seed); the same seed gives the same x_T for every w."""
    if not prompts:
        raise ValueError("prompts is an empty list; give at least one prompt")
    for w in weights:
        if not w >= 0:
            raise ValueError(f"guidance weight {w} must be >= 0")
    rows = [(p, s) for p in prompts for s in seeds]
    req = GenerationRequest([p for p, _ in rows], [negative_prompt] * len(rows), [s for _, s in rows])
    images: dict[float, list[Image.Image]] = {}
    total = len(weights) * steps * -(-len(rows) // batch_size)
    for k, w in enumerate(weights):
        step_progress = None if progress is None else (lambda d, t, _k=k: progress(_k * t + d, total))
        latents = pipe.generate_latents(req, steps=steps, method=method, eta=eta, guidance=w, height=height,
                                        width=width, batch_size=batch_size, progress=step_progress)
        images[w] = to_pil(torch.cat([pipe.decode(latents[i : i + batch_size]) for i in range(0, len(latents), batch_size)]))
    return SweepResult(list(weights), list(prompts), list(seeds), images)


def clip_metrics(result: SweepResult, scorer) -> None:
    """CLIP score and diversity per weight, into ``result.metrics``."""
    n_seeds = len(result.seeds)
    for w, imgs in result.images.items():
        captions = [p for p in result.prompts for _ in result.seeds]
        img_emb = scorer.encode_image(imgs)  # (N, E), unit norm
        txt_emb = scorer.encode_text(captions)  # (N, E), unit norm
        m = result.metrics.setdefault(w, {})
        m["clip_score"] = float(100 * (img_emb * txt_emb).sum(-1).mean())
        if n_seeds > 1:
            per_prompt = img_emb.view(len(result.prompts), n_seeds, -1)  # (P, S, E)
            cos = per_prompt @ per_prompt.transpose(1, 2)  # (P, S, S)
            off = ~torch.eye(n_seeds, dtype=torch.bool)
            m["diversity"] = float((1 - cos[:, off]).mean())


def shapes_metrics(result: SweepResult) -> bool:
    """Attribute accuracy from the shapes checker, if every prompt is a shapes caption; returns whether it applied."""
    from ldm import shapes

    if not all(shapes.parse_caption(p) is not None for p in result.prompts):
        return False
    for w, imgs in result.images.items():
        captions = [p for p in result.prompts for _ in result.seeds]
        scores = [shapes.score_attributes(im, c) for im, c in zip(imgs, captions)]  # every attribute named
        m = result.metrics.setdefault(w, {})
        for attr in scores[0]:  # colour, shape, size, position, all
            m[f"{attr}_acc"] = float(sum(bool(s[attr]) for s in scores) / len(scores))
    return True


def wrap_label(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels: broken at spaces, a word wider than a line broken
    inside; nothing is cut, so the words that differ between columns all show."""
    lines: list[str] = []
    for word in text.split():
        line = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(line) <= width:
            lines[-1] = line
            continue
        while draw.textlength(word) > width and len(word) > 1:
            k = max([1] + [i for i in range(1, len(word)) if draw.textlength(word[:i]) <= width])
            lines.append(word[:k])
            word = word[k:]
        lines.append(word)
    return lines or [""]


def labelled_grid(result: SweepResult) -> Image.Image:
    """Rows: weights; columns: (prompt, seed). A label column on the left; a header on top with each prompt
    wrapped over its columns in full, and each column's seed."""
    first = result.images[result.weights[0]][0]
    w, h = first.size
    n_seeds = len(result.seeds)
    cols = len(result.prompts) * n_seeds
    label_w, line_h = 70, 11
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [wrap_label(measure, p, n_seeds * w - 4) for p in result.prompts]
    header_h = line_h * max(len(lines) for lines in labels) + 17  # one line: 28
    grid = Image.new("RGB", (label_w + cols * w, header_h + len(result.weights) * h), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(cols):
        if c % n_seeds == 0:
            for k, line in enumerate(labels[c // n_seeds]):
                draw.text((label_w + c * w + 2, 2 + k * line_h), line, fill="black")
        draw.text((label_w + c * w + 2, header_h - 14), f"seed {result.seeds[c % n_seeds]}", fill="gray")
    for r, weight in enumerate(result.weights):
        draw.text((4, header_h + r * h + h // 2 - 6), f"w = {weight:g}", fill="black")
        for c, im in enumerate(result.images[weight]):
            grid.paste(im, (label_w + c * w, header_h + r * h))
    return grid


def claim_sweep_output(out: Path, *, overwrite: bool = False, models: Sequence[Optional[Path]] = ()) -> None:
    """``out`` may receive a sweep: new or empty, or with ``overwrite`` an earlier sweep's folder (holding
    nothing else: grid.png, the first file written, and the other three); not inside one of ``models``
    (``ldm_io.claim_output_dir``)."""
    claim_output_dir(out, command=COMMAND, overwrite=overwrite, sealed=models, known=SWEEP_FILES,
                     signature=("grid.png",), replace=False)


def write_outputs(result: SweepResult, out: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """grid.png, metrics.csv, metrics.json and metrics.png (metrics against w) in ``out``, each written
    atomically; ``out`` is claimed first (``claim_sweep_output``)."""
    claim_sweep_output(out, overwrite=overwrite)
    paths = {name: out / name for name in SWEEP_FILES}
    save_image(labelled_grid(result), paths["grid.png"])
    names = sorted({k for m in result.metrics.values() for k in m})
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["guidance"] + names)
    for w in result.weights:
        writer.writerow([w] + [result.metrics.get(w, {}).get(n, "") for n in names])
    write_text(paths["metrics.csv"], table.getvalue())
    record = {"prompts": result.prompts, "seeds": result.seeds, "weights": result.weights,
              "metrics": {str(w): result.metrics.get(w, {}) for w in result.weights}}
    write_text(paths["metrics.json"], json.dumps(record, indent=2))
    plot_metrics(result, names, paths["metrics.png"])
    return paths


def plot_metrics(result: SweepResult, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(names))
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4 * cols, 3 * math.ceil(n / cols)), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot(result.weights, [result.metrics[w].get(name, float("nan")) for w in result.weights], "o-")
        ax.set_xlabel("guidance weight w")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if not names:
        axes.flat[0].text(0.5, 0.5, "no metrics (no CLIP scorer, not shapes prompts)", ha="center")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
