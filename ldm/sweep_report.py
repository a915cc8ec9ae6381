"""What a sweep writes for reading: grids, metrics.csv/json, metrics.png, pareto.png and a suggestion.

* Grids: one per (prompt subset, axis pair): rows are the values of one axis (w when it varies), columns the
  prompts, each split by the values of the second axis and then by seed; the sweep's other axes stay at their
  first value, named on top. Labels are in full words, wrapped, never cut (``wrap_label``). The first is
  grid.png, the rest go to grids/.
* metrics.csv and metrics.json: one row per cell, its axes and every metric with its interval.
* metrics.png: each metric against w, one line per setting of the other axes, with the intervals as bars.
* pareto.png: fidelity against alignment, one curve per guidance method (and setting of the other axes),
  points labelled by w; the Pareto front and the suggested cell marked.
* The suggestion (printed, suggestion.txt, metrics.json): the cell that ``SUGGESTION_RULE`` picks.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from itertools import combinations
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from ldm.sweep import AXES, AXIS_NAMES, COMMAND, SWEEP_FILES, Cell, SweepResult, claim_sweep_output
from ldm_io import atomic_path, save_image, write_text

GRID_PROMPTS = (8, 4)  # prompts per grid: one axis, two axes
GRID_SEEDS = (8, 2)  # seeds shown per prompt: one axis, two axes
GRID_SUBSETS = 4  # grids per axis pair at most (the first prompts of a long list)
TOLERANCE = 0.01  # the suggestion's "within 1% of the best alignment"
# metric -> (words, higher is better); the order of the table's columns
METRICS = {"clip_score": ("CLIP score", True), "all_acc": ("all attributes right", True),
           "colour_acc": ("colour right", True), "shape_acc": ("shape right", True), "size_acc": ("size right", True),
           "position_acc": ("position right", True), "diversity": ("diversity", True),
           "kid": ("KID", False), "fd": ("Frechet distance", False), "cmmd": ("CMMD", False)}
SUFFIXES = ("_low", "_high", "_n", "_n_generated", "_n_reference")
TABLE_AXES = ("guidance", "guidance_method", "steps", "method", "eta")  # metrics.csv's first columns


def base_metrics(result: SweepResult) -> list[str]:
    """The metric names present (not their interval columns), in ``METRICS`` order, then any others."""
    names = {k for m in result.metrics.values() for k in m}
    base = {k for k in names if not any(k.endswith(s) and k[: -len(s)] in names for s in SUFFIXES)}
    return [k for k in METRICS if k in base] + sorted(base - set(METRICS))


# -- grids ------------------------------------------------------------------------------------------------------


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


def _values(cells: Sequence[Cell], axis: Optional[str]) -> list:
    return list(dict.fromkeys(c.value(axis) for c in cells)) if axis else [None]


def _value_text(axis: str, value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def labelled_grid(result: SweepResult, rows: Optional[str] = None, cols: Optional[str] = None,
                  prompts: Optional[Sequence[int]] = None, seeds: Optional[Sequence[int]] = None) -> Image.Image:
    """Rows: the values of axis ``rows`` (default: the first axis that varies, else w); columns: each prompt
    (indices ``prompts``, default all), split by the values of axis ``cols`` (if any), then by seed (indices
    ``seeds``, default all). The sweep's other varying axes stay at the first cell's value, named in a line
    on top. A label column on the left; a header with each prompt wrapped over its columns in full, each
    ``cols`` value over its columns, and each column's seed."""
    axes = result.axes
    rows = rows or next((a for a in ("guidance", *AXES) if a in axes), "guidance")
    prompt_ix = list(range(len(result.prompts))) if prompts is None else list(prompts)
    seed_ix = list(range(len(result.seeds))) if seeds is None else list(seeds)
    base = result.cells[0]
    fixed = [a for a in axes if a not in (rows, cols)]
    cells = [c for c in result.cells if all(c.value(a) == base.value(a) for a in fixed)]
    row_values, col_values = _values(cells, rows), _values(cells, cols)
    lookup = {(c.value(rows), c.value(cols) if cols else None): c for c in cells}
    n_seeds = len(result.seeds)
    w, h = result.images[cells[0]][0].size
    ns, nb = len(seed_ix), len(col_values)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = 11
    row_labels = [wrap_label(measure, Cell.text(lookup[v, col_values[0]], rows), 200) for v in row_values]
    label_w = max(70, 8 + max(measure.textlength(x) for lines in row_labels for x in lines))
    label_w = int(math.ceil(label_w))
    cols_n = len(prompt_ix) * nb * ns
    width = label_w + cols_n * w
    title = wrap_label(measure, ", ".join(base.text(a) for a in fixed), width - 8) if fixed else []
    if cols:
        title += wrap_label(measure, f"columns: {AXIS_NAMES[cols]}", width - 8)
    p_labels = [wrap_label(measure, result.prompts[p], nb * ns * w - 4) for p in prompt_ix]
    b_labels = [wrap_label(measure, _value_text(cols, v), ns * w - 4) for v in col_values] if cols else []
    n_title, n_p = len(title), max(len(x) for x in p_labels)
    n_b = max((len(x) for x in b_labels), default=0)
    header_h = line_h * (n_title + n_p + n_b) + 17  # one prompt line and nothing else: 28, as before
    grid = Image.new("RGB", (width, header_h + len(row_values) * h), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(title):
        draw.text((4, 2 + k * line_h), line, fill="black")
    y_p, y_b = 2 + n_title * line_h, 2 + (n_title + n_p) * line_h
    for i, p in enumerate(prompt_ix):
        x_p = label_w + i * nb * ns * w
        for k, line in enumerate(p_labels[i]):
            draw.text((x_p + 2, y_p + k * line_h), line, fill="black")
        for j in range(nb):
            x_b = x_p + j * ns * w
            for k, line in enumerate(b_labels[j] if cols else []):
                draw.text((x_b + 2, y_b + k * line_h), line, fill="navy")
            for q, s in enumerate(seed_ix):
                draw.text((x_b + q * w + 2, header_h - 14), f"seed {result.seeds[s]}", fill="gray")
    for r, v in enumerate(row_values):
        lines = row_labels[r]
        for k, line in enumerate(lines):
            draw.text((4, header_h + r * h + h // 2 - 6 * len(lines) + k * line_h), line, fill="black")
        for i, p in enumerate(prompt_ix):
            for j, b in enumerate(col_values):
                cell = lookup.get((v, b))
                if cell is None:
                    continue
                for q, s in enumerate(seed_ix):
                    x = label_w + ((i * nb + j) * ns + q) * w
                    grid.paste(result.images[cell][p * n_seeds + s], (x, header_h + r * h))
    return grid


def grid_plan(result: SweepResult) -> list[tuple[str, Optional[str], list[int], list[int]]]:
    """(rows axis, columns axis or None, prompt indices, seed indices) of every grid a sweep writes: each pair of
    varying axes (one axis when only one varies), w as the rows where it is one of them; each over up to
    ``GRID_SUBSETS`` subsets of ``GRID_PROMPTS`` prompts."""
    axes = result.axes
    if len(axes) <= 1:
        pairs = [(axes[0] if axes else "guidance", None)]
    else:
        pairs = [(b, a) if b == "guidance" else (a, b) for a, b in combinations(axes, 2)]
        pairs.sort(key=lambda pair: pair[0] != "guidance")  # w against each other axis first: grid.png is w x the first
    plan = []
    for rows, cols in pairs:
        k = 0 if cols is None else 1
        per, seeds = GRID_PROMPTS[k], list(range(min(GRID_SEEDS[k], len(result.seeds))))
        for start in range(0, min(len(result.prompts), per * GRID_SUBSETS), per):
            plan.append((rows, cols, list(range(start, min(start + per, len(result.prompts)))), seeds))
    return plan


def write_grids(result: SweepResult, out: Path) -> list[Path]:
    """grid.png (the first grid of ``grid_plan``) and grids/<rows>-by-<cols>-prompts-<a>-<b>.png for the others."""
    paths = []
    for k, (rows, cols, prompts, seeds) in enumerate(grid_plan(result)):
        name = f"{rows}" + (f"-by-{cols}" if cols else "") + f"-prompts-{prompts[0] + 1}-{prompts[-1] + 1}.png"
        path = out / "grid.png" if k == 0 else out / "grids" / name
        save_image(labelled_grid(result, rows, cols, prompts, seeds), path)
        paths.append(path)
    return paths


# -- tables -----------------------------------------------------------------------------------------------------


def table_columns(result: SweepResult) -> list[str]:
    names = {k for m in result.metrics.values() for k in m}
    ordered = []
    for b in base_metrics(result):
        ordered += [b] + [b + s for s in SUFFIXES if b + s in names]
    return ordered + sorted(names - set(ordered))


def metrics_table(result: SweepResult) -> str:
    """metrics.csv: a row per cell, its axes then every metric with its interval (empty where it does not apply)."""
    columns = table_columns(result)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(list(TABLE_AXES) + columns)
    for cell in result.cells:
        m = result.metrics.get(cell, {})
        writer.writerow([cell.value(a) for a in TABLE_AXES] + [m.get(n, "") for n in columns])
    return table.getvalue()


def _json_safe(x):
    """NaN (an interval that could not be drawn: one image, --bootstrap 0) as null: metrics.json stays JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def metrics_record(result: SweepResult, suggestion: Optional[dict]) -> dict:
    """metrics.json: the request, the axes that vary, each cell with its metrics, and the suggestion."""
    return _json_safe({"prompts": result.prompts, "seeds": result.seeds, "axes": result.axes,
                       "cells": [{**asdict(c), "key": c.key, "metrics": result.metrics.get(c, {})} for c in result.cells],
                       "suggestion": suggestion})


# -- suggestion -------------------------------------------------------------------------------------------------


def objectives(result: SweepResult) -> tuple[Optional[str], Optional[str]]:
    """(alignment metric, fidelity metric): exact attribute accuracy for shapes prompts, else CLIP score; KID
    against the reference when there is one, else diversity across seeds (None where the sweep lacks it)."""
    names = set(base_metrics(result))
    align = next((n for n in ("all_acc", "clip_score") if n in names), None)
    fid = next((n for n in ("kid", "diversity") if n in names), None)
    return align, fid


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if METRICS.get(metric, ("", True))[1] else a < b


def pareto_front(result: SweepResult, align: str, fid: str) -> list[Cell]:
    """The cells no other cell beats on both alignment and fidelity (as good on both and better on one)."""
    points = {c: (result.metrics[c][align], result.metrics[c][fid]) for c in result.cells}
    front = []
    for c, (a, f) in points.items():
        beaten = any(a2 >= a and not _better(fid, f, f2) and (a2 > a or _better(fid, f2, f))
                     for d, (a2, f2) in points.items() if d != c)
        if not beaten:
            front.append(c)
    return front


def suggest(result: SweepResult, tolerance: float = TOLERANCE) -> Optional[dict]:
    """The rule: among the cells whose alignment is within ``tolerance`` (relative) of the best cell's, the one
    of best fidelity (lowest KID; without a reference, highest diversity); ties go to the lower w. Without a
    fidelity metric, the lowest w within that band. None when the sweep has no alignment metric."""
    align, fid = objectives(result)
    if align is None:
        return None
    best = max(result.metrics[c][align] for c in result.cells)
    floor = best - tolerance * abs(best)
    band = [c for c in result.cells if result.metrics[c][align] >= floor]
    order = sorted(band, key=lambda c: (c.guidance, result.cells.index(c)))
    pick = order[0]
    if fid is not None:
        for c in order[1:]:
            if _better(fid, result.metrics[c][fid], result.metrics[pick][fid]):
                pick = c
    fid_words = (f"best fidelity ({'lowest' if not METRICS[fid][1] else 'highest'} {METRICS[fid][0]})"
                 if fid else "the lowest w")
    rule = (f"{fid_words} among the cells whose alignment ({METRICS[align][0]}) is within {tolerance:.0%} of the "
            f"best ({best:.4g}, so >= {floor:.4g}); ties go to the lower w")
    front = pareto_front(result, align, fid) if fid else []
    return {"rule": rule, "alignment": align, "fidelity": fid, "cell": {**asdict(pick), "key": pick.key},
            "metrics": result.metrics[pick], "on_pareto_front": pick in front if fid else None,
            "pareto_front": [c.key for c in front]}


def suggestion_text(result: SweepResult, s: Optional[dict]) -> str:
    if s is None:
        return "no suggestion: the sweep has no alignment metric (no CLIP scorer, not shapes prompts)\n"
    cell = Cell(**{k: v for k, v in s["cell"].items() if k != "key"})
    m = s["metrics"]

    def shown(name):
        lo, hi = m.get(f"{name}_low"), m.get(f"{name}_high")
        interval = f" [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None and lo == lo else ""
        return f"{METRICS.get(name, (name,))[0]} {m[name]:.4g}{interval}"

    axes = result.axes or ["guidance"]
    lines = [f"suggestion: {', '.join(cell.text(a) for a in axes)}",
             "  " + "; ".join(shown(n) for n in (s["alignment"], s["fidelity"]) if n),
             f"  rule: {s['rule']}"]
    if s["fidelity"]:
        lines.append(f"  Pareto front ({METRICS[s['alignment']][0]} against {METRICS[s['fidelity']][0]}): "
                     + "; ".join(", ".join(c.text(a) for a in axes) for c in result.cells if c.key in s["pareto_front"]))
    return "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(result: SweepResult) -> dict[str, list[Cell]]:
    """The cells grouped by every axis but w (a curve each), labelled by the varying ones in full words."""
    others = [a for a in result.axes if a != "guidance"]
    groups: dict[str, list[Cell]] = {}
    for c in result.cells:
        groups.setdefault(", ".join(_value_text(a, c.value(a)) for a in others) or "", []).append(c)
    return groups


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_metrics(result: SweepResult, path: Path) -> None:
    """Each metric against w, one line per setting of the other axes, intervals as error bars."""
    plt = _pyplot()
    names = base_metrics(result)
    n = max(1, len(names))
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4 * cols, 3 * math.ceil(n / cols)), squeeze=False)
    series = _series(result)
    for ax, name in zip(axes.flat, names):
        for label, cells in series.items():
            cells = [c for c in sorted(cells, key=lambda c: c.guidance) if name in result.metrics.get(c, {})]
            if not cells:
                continue
            ws = [c.guidance for c in cells]
            ys = [result.metrics[c][name] for c in cells]
            lo = [result.metrics[c].get(f"{name}_low", float("nan")) for c in cells]
            hi = [result.metrics[c].get(f"{name}_high", float("nan")) for c in cells]
            err = [[max(0.0, y - a) if a == a else 0.0 for y, a in zip(ys, lo)],
                   [max(0.0, b - y) if b == b else 0.0 for y, b in zip(ys, hi)]]
            ax.errorbar(ws, ys, yerr=err, fmt="o-", capsize=3, label=label or None)
        ax.set_xlabel("guidance weight w")
        ax.set_title(METRICS.get(name, (name,))[0] + ("" if METRICS.get(name, ("", True))[1] else " (lower is better)"))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if not names:
        axes.flat[0].text(0.5, 0.5, "no metrics (no CLIP scorer, not shapes prompts)", ha="center")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_pareto(result: SweepResult, suggestion: Optional[dict], path: Path) -> None:
    """Fidelity against alignment: a curve per guidance method (and setting of the other axes but w), points
    labelled by w, intervals as bars; the Pareto front dashed and the suggested cell circled."""
    plt = _pyplot()
    align, fid = objectives(result)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    if align is None or fid is None:
        ax.text(0.5, 0.5, "no Pareto plot: it needs an alignment metric (CLIP score or shapes accuracy)\n"
                "and a fidelity one (--reference, or two or more seeds for diversity)", ha="center", va="center",
                fontsize=8)
        ax.axis("off")
    else:
        for label, cells in _series(result).items():
            cells = sorted(cells, key=lambda c: c.guidance)
            xs = [result.metrics[c][align] for c in cells]
            ys = [result.metrics[c][fid] for c in cells]
            xerr = [[max(0.0, x - result.metrics[c].get(f"{align}_low", x)) for x, c in zip(xs, cells)],
                    [max(0.0, result.metrics[c].get(f"{align}_high", x) - x) for x, c in zip(xs, cells)]]
            yerr = [[max(0.0, y - result.metrics[c].get(f"{fid}_low", y)) for y, c in zip(ys, cells)],
                    [max(0.0, result.metrics[c].get(f"{fid}_high", y) - y) for y, c in zip(ys, cells)]]
            xerr = [[0.0 if v != v else v for v in side] for side in xerr]
            yerr = [[0.0 if v != v else v for v in side] for side in yerr]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-", capsize=2, alpha=0.85, label=label or None)
            for c, x, y in zip(cells, xs, ys):
                ax.annotate(f"w={c.guidance:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = sorted(pareto_front(result, align, fid), key=lambda c: result.metrics[c][align])
        ax.plot([result.metrics[c][align] for c in front], [result.metrics[c][fid] for c in front], "k--", lw=1,
                alpha=0.6, label="Pareto front")
        if suggestion is not None:
            pick = next(c for c in result.cells if c.key == suggestion["cell"]["key"])
            ax.plot([result.metrics[pick][align]], [result.metrics[pick][fid]], "o", ms=14, mfc="none", mec="red",
                    mew=2, label="suggested")
        ax.set_xlabel(f"{METRICS[align][0]} (alignment, higher is better)")
        better = "higher" if METRICS[fid][1] else "lower"
        ax.set_ylabel(f"{METRICS[fid][0]} ({'fidelity' if fid == 'kid' else 'no reference: diversity'}, "
                      f"{better} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_report(result: SweepResult, out: Path) -> dict[str, Path]:
    """Every reading file of a sweep into ``out`` (atomically each); returns name -> path, and the suggestion
    in ``result``'s metrics.json."""
    out = Path(out)
    grids = write_grids(result, out)
    suggestion = suggest(result)
    paths = {"grid.png": grids[0]}
    paths["metrics.csv"] = write_text(out / "metrics.csv", metrics_table(result))
    paths["metrics.json"] = write_text(out / "metrics.json", json.dumps(metrics_record(result, suggestion), indent=2,
                                                                        allow_nan=False))
    paths["metrics.png"] = out / "metrics.png"
    plot_metrics(result, paths["metrics.png"])
    paths["pareto.png"] = out / "pareto.png"
    plot_pareto(result, suggestion, paths["pareto.png"])
    paths["suggestion.txt"] = write_text(out / "suggestion.txt", suggestion_text(result, suggestion))
    for g in grids[1:]:
        paths[str(g.relative_to(out))] = g
    return paths


def write_outputs(result: SweepResult, out: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """An in-memory sweep's reading files (``write_report``) in ``out``, which is claimed first
    (``ldm.sweep.claim_sweep_output``; with ``overwrite`` an earlier sweep there is removed)."""
    from ldm_io.outputs import remove_output, write_marker

    if claim_sweep_output(out, overwrite=overwrite):
        remove_output(out)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_marker(out, COMMAND, SWEEP_FILES)
    return write_report(result, Path(out))
