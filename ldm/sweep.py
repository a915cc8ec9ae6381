"""Sweeps: prompts x cells x seeds, where a cell is one setting of the axes (guidance weight w, guidance
method, sampler steps, sampler, DDIM eta). Each seed's starting noise (and the noise of stochastic sampler
steps) is shared by every cell, so a row of a grid shows one image changing with the axes alone.

The work is a fixed list of sampler batches (``plan_batches``), which depends on the request only: the
rows of cells that share steps, sampler, eta and guidance method go into one batch whatever their weight
(each row guided with its own w), so cells of few prompts and seeds still fill a batch. Because each batch
is fixed, a sweep split over processes (batch k on rank k mod N) or resumed after a stop makes each image
from the same batch, hence the same pixels, as one unbroken process does.

Metrics per cell, each with a percentile bootstrap interval (``<name>_low``, ``<name>_high``) and the number
of images behind it (``<name>_n``):

* ``clip_score``: 100 x cosine(CLIP image embedding, CLIP text embedding), averaged over images
  (the convention of Hessel et al. 2021 without the clip at 0);
* ``diversity``: mean pairwise cosine distance (1 - cos) between the CLIP image embeddings of
  one prompt's images across seeds, averaged over prompts (needs two or more seeds);
* for prompts in the shapes set's caption language, ``shape_acc``, ``colour_acc``, ``size_acc``,
  ``position_acc`` and ``all_acc`` (every attribute right) read back by ``ldm.shapes``' exact checker;
* against real images (a reference set, ``ldm.fidelity``): ``kid``, ``fd`` and ``cmmd`` with their own
  bootstrap (``_low``, ``_high``, ``_n_generated``, ``_n_reference``).

The intervals of the per-image metrics resample prompts (all seeds of a drawn prompt together: one
prompt's images are not independent draws), or seeds when there is one prompt. Resamples come from a fixed
seed, so a sweep's metrics.json is a function of its images.

A model that has learned anything shows alignment rising with w and diversity falling.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ldm.pipeline import GenerationRequest, Text2ImagePipeline, to_pil
from ldm_io import write_text

COMMAND = "ldm sweep"
# What a sweep writes into --out: the request first, images as they are made, the rest at the end.
SWEEP_FILES = ("grid.png", "metrics.csv", "metrics.json", "metrics.png", "pareto.png", "suggestion.txt", "sweep.json",
               "images", "grids")
AXES = ("guidance_method", "steps", "method", "eta", "guidance")  # the order cells are listed in (w fastest)
AXIS_NAMES = {"guidance": "w", "guidance_method": "guidance method", "steps": "steps", "method": "sampler",
              "eta": "eta"}
BOOTSTRAP = 200  # resamples behind each interval (as ldm.fidelity's)
LEVEL = 0.95  # the intervals' coverage
ATTRIBUTES = ("colour", "shape", "size", "position", "all")  # ldm.shapes.score_attributes' keys
MIX_WEIGHTS = True  # whether one sampler batch may hold rows of several weights (the pipeline takes per-row w)


@dataclass(frozen=True)
class Cell:
    """One setting of the sweep's axes; every (prompt, seed) is made once per cell."""

    guidance: float
    guidance_method: str = "cfg"  # a canonical spec (ldm.guidance.format_guidance_method)
    steps: int = 50
    method: str = "ddim"
    eta: float = 0.0

    def value(self, axis: str):
        return getattr(self, axis)

    def text(self, axis: str) -> str:
        """``w = 4``, ``guidance method = rescale:0.7``: one axis, in full words."""
        v = self.value(axis)
        return f"{AXIS_NAMES[axis]} = {v:g}" if isinstance(v, float) else f"{AXIS_NAMES[axis]} = {v}"

    @property
    def key(self) -> str:
        """The cell's folder name under images/: ``cfg_w4_ddim_50``, ``rescale-0.7_w2_ddim_25_eta0.5``."""
        text = f"{self.guidance_method}_w{self.guidance:g}_{self.method}_{self.steps}"
        text += f"_eta{self.eta:g}" if self.eta else ""
        return re.sub(r"[^A-Za-z0-9.=_-]+", "-", text)


@dataclass
class SweepSpec:
    """A sweep's request: every (cell, prompt, seed) is one image."""

    prompts: list[str]
    seeds: list[int]
    cells: list[Cell]
    negative_prompt: Optional[str] = None
    sigmas: Optional[str] = None
    height: Optional[int] = None
    width: Optional[int] = None
    batch_size: int = 8

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("no prompts; give at least one prompt")
        if not self.seeds:
            raise ValueError("no seeds; give at least one, e.g. --seeds 0,1,2,3")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed; give each seed once")
        if not self.cells:
            raise ValueError("no cells to sweep")
        keys = [c.key for c in self.cells]
        if len(set(self.cells)) != len(self.cells):
            raise ValueError("a cell is given twice; give each weight, method, step count and eta once")
        if len(set(keys)) != len(keys):
            raise ValueError(f"two cells share the folder name {sorted(k for k in keys if keys.count(k) > 1)[0]}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an integer >= 1")

    @property
    def axes(self) -> list[str]:
        """The axes with more than one value, in ``AXES`` order."""
        return [a for a in AXES if len({c.value(a) for c in self.cells}) > 1]

    def as_json(self) -> dict:
        return {"prompts": self.prompts, "seeds": self.seeds, "cells": [asdict(c) for c in self.cells],
                "negative_prompt": self.negative_prompt, "sigmas": self.sigmas, "height": self.height,
                "width": self.width, "batch_size": self.batch_size}

    @classmethod
    def from_json(cls, d: dict) -> "SweepSpec":
        return cls(list(d["prompts"]), list(d["seeds"]), [Cell(**c) for c in d["cells"]], d["negative_prompt"],
                   d["sigmas"], d["height"], d["width"], d["batch_size"])

    def image_path(self, out: Path, cell: Cell, prompt_index: int, seed: int) -> Path:
        """out/images/<cell key>/<prompt index>-seed<seed>.png"""
        return Path(out) / "images" / cell.key / f"{prompt_index:05d}-seed{seed}.png"


def make_cells(weights: Sequence[float], guidance_methods: Sequence[str] = ("cfg",), steps: Sequence[int] = (50,),
               methods: Sequence[str] = ("ddim",), etas: Sequence[float] = (0.0,)) -> list[Cell]:
    """Every combination of the axes, w fastest (``AXES``). ``etas`` apply to DDIM only (the other samplers take
    none): a non-DDIM sampler gets one cell per weight with eta 0."""
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise ValueError(f"guidance weight {w!r} must be >= 0 and finite (1 = no guidance)")
    cells = []
    for gm, n, method in itertools.product(guidance_methods, steps, methods):
        for eta in etas if method == "ddim" else [0.0]:
            cells += [Cell(float(w), str(gm), int(n), method, float(eta)) for w in weights]
    if not cells:
        raise ValueError("no cells: eta applies to ddim only; add ddim to the samplers or give eta 0")
    if any(e != 0 for e in etas) and "ddim" not in methods:
        raise ValueError(f"eta {','.join(f'{e:g}' for e in etas)} applies to the ddim sampler only, which is not "
                         f"among {', '.join(methods)}")
    return list(dict.fromkeys(cells))


def parse_list(text: str, kind, name: str) -> list:
    """"1,2,4" -> [1, 2, 4] with a clear error for anything else."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise ValueError(f"{name}={text!r} must be a comma-separated list of {kind.__name__} values") from None
    if not values:
        raise ValueError(f"{name} is empty; give e.g. {name}=1,2,4")
    return values


# -- the batch plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One sampler call: row i is the image of cell ``cells[i]``, prompt ``prompts[i]``, seed ``seeds[i]``
    (indices into the spec's lists)."""

    cells: tuple[int, ...]
    prompts: tuple[int, ...]
    seeds: tuple[int, ...]

    def rows(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.cells, self.prompts, self.seeds)


def _weight_kind(w: float):
    """Weights 0 and 1 make a half-size U-Net call (one context only): they get batches of their own; so does
    every weight where the pipeline takes one w per call (``MIX_WEIGHTS``)."""
    return w if w in (0.0, 1.0) or not MIX_WEIGHTS else "guided"


def plan_batches(spec: SweepSpec) -> list[Batch]:
    """The sweep's sampler batches, a function of the request alone. Cells that differ only in w share batches
    (rows ordered cell, prompt, seed), except that w = 0 and w = 1 (half-size calls) are batched apart; each
    batch holds up to ``spec.batch_size`` rows."""
    groups: dict[tuple, list[tuple[int, int, int]]] = {}
    for c, cell in enumerate(spec.cells):
        key = (cell.guidance_method, cell.steps, cell.method, cell.eta, _weight_kind(cell.guidance))
        rows = groups.setdefault(key, [])
        rows += [(c, p, s) for p in range(len(spec.prompts)) for s in range(len(spec.seeds))]
    batches = []
    for rows in groups.values():
        for start in range(0, len(rows), spec.batch_size):
            cells, prompts, seeds = zip(*rows[start : start + spec.batch_size])
            batches.append(Batch(cells, prompts, seeds))
    return batches


def rank_batches(batches: Sequence[Batch], rank: int, world: int) -> list[tuple[int, Batch]]:
    """(index, batch) of the batches process ``rank`` of ``world`` makes: every world-th, from the rank-th."""
    return [(k, b) for k, b in enumerate(batches) if k % world == rank]


# -- generation -------------------------------------------------------------------------------------------------


def generate_batch(pipe: Text2ImagePipeline, spec: SweepSpec, batch: Batch, progress=None) -> list[Image.Image]:
    """The images of one batch, in its row order: one sampler run over every row, each row guided with its
    cell's weight."""
    first = spec.cells[batch.cells[0]]
    weights = [spec.cells[c].guidance for c in batch.cells]
    n = len(weights)
    req = GenerationRequest([spec.prompts[p] for p in batch.prompts], [spec.negative_prompt] * n,
                            [spec.seeds[s] for s in batch.seeds])
    latents = pipe.generate_latents(req, steps=first.steps, method=first.method, eta=first.eta, sigmas=spec.sigmas,
                                    guidance=weights[0] if len(set(weights)) == 1 else weights,
                                    guidance_method=first.guidance_method, height=spec.height, width=spec.width,
                                    batch_size=n, progress=progress, batch_invariant=False)
    return to_pil(pipe.decode(latents, batch_invariant=False))


@dataclass
class SweepResult:
    """A sweep's images and metrics. ``images[cell]`` lists that cell's images ordered (prompt, seed), seed fastest.
    ``cells`` may be given as plain weights (cells that differ in w alone)."""

    cells: list[Cell]
    prompts: list[str]
    seeds: list[int]
    images: dict[Cell, list[Image.Image]]
    metrics: dict[Cell, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self):
        as_cell = lambda c: c if isinstance(c, Cell) else Cell(float(c))  # noqa: E731
        self.cells = [as_cell(c) for c in self.cells]
        self.images = {as_cell(c): v for c, v in self.images.items()}
        self.metrics = {as_cell(c): v for c, v in self.metrics.items()}

    @property
    def axes(self) -> list[str]:
        return [a for a in AXES if len({c.value(a) for c in self.cells}) > 1]


def run_sweep(
    pipe: Text2ImagePipeline,
    prompts: Sequence[str],
    weights: Sequence[float],
    seeds: Sequence[int],
    *,
    guidance_methods: Sequence[str] = ("cfg",),
    steps: Union[int, Sequence[int]] = 50,
    method: Union[str, Sequence[str]] = "ddim",
    eta: Union[float, Sequence[float]] = 0.0,
    negative_prompt: Optional[str] = None,
    sigmas: Optional[str] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: int = 8,
    progress=None,
) -> SweepResult:
    """Images for every (cell, prompt, seed) in memory; the same seed gives the same x_T in every cell.
    ``steps``, ``method`` and ``eta`` take one value or a list (an axis); see ``make_cells``."""
    listed = lambda v: [v] if isinstance(v, (int, float, str)) else list(v)  # noqa: E731
    cells = make_cells(weights, [_spec_text(g) for g in guidance_methods], listed(steps), listed(method), listed(eta))
    spec = SweepSpec(list(prompts), list(seeds), cells, negative_prompt, sigmas, height, width, batch_size)
    images: dict[Cell, dict[tuple[int, int], Image.Image]] = {c: {} for c in cells}
    for _, batch, made in generate(pipe, spec, plan_batches(spec), progress=progress):
        for (c, p, s), im in zip(batch.rows(), made):
            images[cells[c]][p, s] = im
    return SweepResult(cells, spec.prompts, spec.seeds, {c: [v[k] for k in sorted(v)] for c, v in images.items()})


def _spec_text(method) -> str:
    """A guidance-method spec in its canonical text (``ldm.guidance``)."""
    from ldm.guidance import format_guidance_method, parse_guidance_method

    return format_guidance_method(parse_guidance_method(method))


def generate(pipe: Text2ImagePipeline, spec: SweepSpec, batches: Sequence[Batch], *, indices: Optional[Sequence[int]] = None,
             progress=None) -> Iterator[tuple[int, Batch, list[Image.Image]]]:
    """(index, batch, images) for each batch in turn; ``progress(done, total)`` counts sampler steps over all of
    them. ``indices``: each batch's index in the plan (default 0, 1, ...)."""
    indices = list(range(len(batches))) if indices is None else list(indices)
    total = sum(spec.cells[b.cells[0]].steps for b in batches)
    done = 0
    for k, batch in zip(indices, batches):
        step = None if progress is None else (lambda d, t, _base=done: progress(_base + d, total))
        made = generate_batch(pipe, spec, batch, step)
        done += spec.cells[batch.cells[0]].steps
        yield k, batch, made


# -- images on disk: records, resume ----------------------------------------------------------------------------


def image_records(spec: SweepSpec, batch: Batch, common: dict) -> list[dict]:
    """Each image's PNG record, as ``ldm generate`` writes it (so ``ldm generate --from-png`` remakes it in the
    batch it was made in, with one U-Net call per step on the batch: ``batch_invariant`` False) plus
    ``sweep``: its cell and place in the sweep. ``common``: the model, device,
    backend, size, versions and LoRAs (``ldm.generate_cli.generate``'s record fields)."""
    prompts = [spec.prompts[p] for p in batch.prompts]
    seeds = [spec.seeds[s] for s in batch.seeds]
    records = []
    for i, (c, p, s) in enumerate(batch.rows()):
        cell = spec.cells[c]
        records.append({**common, "prompt": spec.prompts[p], "seed": spec.seeds[s], "negative_prompt": spec.negative_prompt,
                        "steps": cell.steps, "method": cell.method, "eta": cell.eta, "sigmas": spec.sigmas,
                        "guidance": cell.guidance, "guidance_method": cell.guidance_method,
                        "batch_size": len(prompts), "batch_prompts": prompts, "batch_seeds": seeds, "batch_index": i,
                        "batch_guidances": [spec.cells[x].guidance for x in batch.cells], "batch_invariant": False,
                        "sweep": {"cell": cell.key, "prompt_index": p, "seed_index": s}})
    return records


# The record fields that say which image a PNG is: a resumed sweep keeps a PNG only when all of these match.
IMAGE_FIELDS = ("prompt", "seed", "negative_prompt", "steps", "method", "eta", "sigmas", "guidance", "guidance_method",
                "batch_prompts", "batch_seeds", "batch_index", "batch_guidances", "model_hash", "width", "height",
                "sweep")


def read_png_record(path: Path) -> Optional[dict]:
    """The JSON record of a PNG this toolkit wrote, or None (no file, not a PNG, no record)."""
    from ldm.generate_cli import PNG_KEY
    from ldm_io.outputs import png_text_keys

    text = png_text_keys(path).get(PNG_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def record_mismatch(found: Optional[dict], wanted: dict) -> Optional[str]:
    """None when ``found`` records the image ``wanted`` describes; else the first field that differs, as text."""
    if found is None:
        return "it holds no record of ours"
    for key in IMAGE_FIELDS:
        if key in ("width", "height") and wanted.get(key) is None:
            continue
        if found.get(key) != wanted.get(key):
            if key == "guidance_method" and {found.get(key), wanted.get(key)} <= {None, "cfg"}:
                continue
            return f"{key}={found.get(key)!r} where this sweep asks {wanted.get(key)!r}"
    loras = [(x.get("hash"), x.get("scale")) for x in found.get("loras") or []]
    if loras != [(x.get("hash"), x.get("scale")) for x in wanted.get("loras") or []]:
        return "its LoRAs differ from this sweep's"
    return None


def batch_done(spec: SweepSpec, batch: Batch, out: Path, common: dict) -> bool:
    """Whether every image of ``batch`` is in ``out`` with a record of this sweep's request (a resumed sweep skips
    the batch). A batch with some images missing is made again whole; a PNG whose record names another request
    is a ValueError (the folder holds another sweep)."""
    paths = [spec.image_path(out, spec.cells[c], p, spec.seeds[s]) for c, p, s in batch.rows()]
    wanted = image_records(spec, batch, common)
    present = 0
    for path, record in zip(paths, wanted):
        if not path.exists():
            continue
        why = record_mismatch(read_png_record(path), record)
        if why is not None:
            raise ValueError(f"--resume: {path} was not made by this sweep ({why}); resume with the options it was "
                             f"started with, or start again with --overwrite")
        present += 1
    return present == len(paths)


def write_images(pipe: Text2ImagePipeline, spec: SweepSpec, out: Path, common: dict, *, rank: int = 0, world: int = 1,
                 resume: bool = False, progress=None, after_batch: Optional[Callable[[int], None]] = None) -> int:
    """Make this rank's batches and write each image as a PNG with its record (``image_records``), atomically;
    with ``resume``, batches whose images are all there are skipped. Returns the number of batches made."""
    from ldm.generate_cli import save_png

    mine = rank_batches(plan_batches(spec), rank, world)
    if resume:
        mine = [(k, b) for k, b in mine if not batch_done(spec, b, out, common)]
    made = 0
    for k, batch, images in generate(pipe, spec, [b for _, b in mine], indices=[k for k, _ in mine], progress=progress):
        for (c, p, s), image, record in zip(batch.rows(), images, image_records(spec, batch, common)):
            save_png(image, spec.image_path(out, spec.cells[c], p, spec.seeds[s]), record)
        made += 1
        if after_batch is not None:
            after_batch(k)
    return made


def read_images(spec: SweepSpec, out: Path) -> SweepResult:
    """The sweep's images read back from ``out``; a missing one is a ValueError naming it."""
    images: dict[Cell, list[Image.Image]] = {}
    for cell in spec.cells:
        row = []
        for p in range(len(spec.prompts)):
            for seed in spec.seeds:
                path = spec.image_path(out, cell, p, seed)
                if not path.is_file():
                    raise ValueError(f"{path} is missing: the sweep did not finish; run it again with --resume")
                with Image.open(path) as im:
                    row.append(im.convert("RGB"))
        images[cell] = row
    return SweepResult(spec.cells, spec.prompts, spec.seeds, images)


# -- metrics ----------------------------------------------------------------------------------------------------


def bootstrap_mean(values: np.ndarray, *, bootstrap: int = BOOTSTRAP, seed: int = 0,
                   level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of ``values`` (P, K): the mean over every entry, and the ``level`` percentile interval of
    that mean over ``bootstrap`` resamples of the P rows with replacement (each row's K entries stay together).
    With one row, the K entries are resampled instead. NaN bounds when there is nothing to resample."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.shape[0] == 1:
        values = values.T  # one prompt: resample its seeds
    mean = float(values.mean())
    n = values.shape[0]
    if n < 2 or bootstrap < 2:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=bootstrap)  # (B, n) copies of each row
    reps = counts @ values.mean(axis=1) / n  # (B,)
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)


def _put(m: dict, name: str, values: np.ndarray, n: int, bootstrap: int) -> None:
    m[name], m[f"{name}_low"], m[f"{name}_high"] = bootstrap_mean(values, bootstrap=bootstrap)
    m[f"{name}_n"] = n


def clip_metrics(result: SweepResult, scorer, *, bootstrap: int = BOOTSTRAP,
                 embeddings: Optional[dict[Cell, torch.Tensor]] = None, progress=None) -> dict[Cell, torch.Tensor]:
    """CLIP score and diversity per cell, with intervals, into ``result.metrics``; returns each cell's image
    embeddings (N, E) (given in ``embeddings``, or computed) for the fidelity metrics. ``progress()`` after
    each cell."""
    from ldm.fidelity import embed_images

    n_prompts, n_seeds = len(result.prompts), len(result.seeds)
    txt = scorer.encode_text(result.prompts).float().cpu()  # (P, E), unit norm
    out = {}
    for cell in result.cells:
        imgs = result.images[cell]
        img = embeddings[cell] if embeddings is not None and cell in embeddings else embed_images(scorer, imgs)
        out[cell] = img
        per = img.view(n_prompts, n_seeds, -1)  # (P, S, E)
        m = result.metrics.setdefault(cell, {})
        cos = (per * txt[:, None, :]).sum(-1)  # (P, S)
        _put(m, "clip_score", 100 * cos.numpy(), len(imgs), bootstrap)
        if n_seeds > 1:
            sim = per @ per.transpose(1, 2)  # (P, S, S)
            off = ~torch.eye(n_seeds, dtype=torch.bool)
            _put(m, "diversity", (1 - sim[:, off]).numpy(), len(imgs), bootstrap)  # (P, S (S - 1)) pairs
        if progress is not None:
            progress()
    return out


def shapes_metrics(result: SweepResult, *, bootstrap: int = BOOTSTRAP, progress=None) -> bool:
    """Attribute accuracy from the shapes checker, if every prompt is a shapes caption; returns whether it applied.
    ``progress()`` after each cell."""
    from ldm import shapes

    if not all(shapes.parse_caption(p) is not None for p in result.prompts):
        return False
    captions = [p for p in result.prompts for _ in result.seeds]
    for cell in result.cells:
        scores = [shapes.score_attributes(im, c) for im, c in zip(result.images[cell], captions)]  # every attribute named
        m = result.metrics.setdefault(cell, {})
        for attr in ATTRIBUTES:
            right = np.array([bool(s[attr]) for s in scores], dtype=np.float64).reshape(len(result.prompts), -1)
            _put(m, f"{attr}_acc", right, len(scores), bootstrap)
        if progress is not None:
            progress()
    return True


def fidelity_metrics(result: SweepResult, embeddings: dict[Cell, torch.Tensor], reference: torch.Tensor, *,
                     bootstrap: int = BOOTSTRAP, progress=None) -> None:
    """KID, FD and CMMD of each cell's images against the reference embeddings (``ldm.fidelity``), into
    ``result.metrics``. ``progress()`` after each cell."""
    from ldm import fidelity

    for cell in result.cells:
        est = fidelity.fidelity_metrics(embeddings[cell], reference, bootstrap=bootstrap, seed=0)
        result.metrics.setdefault(cell, {}).update(fidelity.flat_metrics(est))
        if progress is not None:
            progress()


# -- the output folder ------------------------------------------------------------------------------------------


def claim_sweep_output(out: Path, *, overwrite: bool = False, resume: bool = False,
                       models: Sequence[Optional[Path]] = ()) -> bool:
    """``out`` may receive a sweep: new or empty; with ``overwrite`` an earlier sweep's folder (holding nothing
    else); with ``resume`` also the folder of a sweep to continue (its sweep.json there). Not inside one of
    ``models`` (``ldm_io.claim_output_dir``). Returns True when ``out`` holds an earlier sweep."""
    from ldm_io import claim_output_dir

    if resume and overwrite:
        raise ValueError(f"--resume continues the sweep in {out} and --overwrite replaces it; give one of them")
    earlier = claim_output_dir(out, command=COMMAND, overwrite=overwrite or resume, sealed=models, known=SWEEP_FILES,
                               signature=("grid.png",), replace=False)
    if resume and earlier and not (Path(out) / "sweep.json").is_file():
        raise ValueError(f"--resume: {out} holds no sweep.json (a sweep made before --resume, or one that finished "
                         f"writing nothing); start it again with --overwrite")
    return earlier


def start_output(out: Path, spec: SweepSpec, request: dict, *, overwrite: bool = False, resume: bool = False) -> SweepSpec:
    """Prepare ``out`` for ``spec`` (on the main process, after ``claim_sweep_output``): replaced when
    ``overwrite``; marked as ldm sweep's; sweep.json (the request) written. With ``resume``, the sweep.json
    there must hold the same request (``request``: what else must match, e.g. the model's hash); the
    spec returned keeps its batch size, so every image is remade in the batch it was planned in."""
    from ldm_io.outputs import remove_output, write_marker

    out = Path(out)
    path = out / "sweep.json"
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            old = SweepSpec.from_json(saved["spec"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--resume: {path} is not a sweep's request ({exc}); start again with --overwrite") from None
        if replace(old, batch_size=spec.batch_size) != spec:
            differ = next(k for k in ("prompts", "seeds", "cells", "negative_prompt", "sigmas", "height", "width")
                          if getattr(old, k) != getattr(spec, k))
            raise ValueError(f"--resume: the sweep in {out} was started with other {differ}; resume it with the "
                             f"options it was started with, or start again with --overwrite")
        for key, value in request.items():
            if saved.get("request", {}).get(key) != value:
                raise ValueError(f"--resume: the sweep in {out} was started with another {key} "
                                 f"({saved.get('request', {}).get(key)!r}); resume with the same, or start again "
                                 f"with --overwrite")
        return old
    if overwrite and out.is_dir():
        remove_output(out)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, COMMAND, SWEEP_FILES)
    write_text(out / "sweep.json", json.dumps({"spec": spec.as_json(), "request": request}, indent=1))
    return spec
