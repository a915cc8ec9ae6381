"""Sweep guidance and sampler settings: prompts x cells x seeds, with metrics, plots and a suggestion.

A cell is one setting of the axes. Each axis takes a comma-separated list; the sweep makes every combination:
  --guidance 1,2,4,8            guidance weight w (1 = no guidance, 0 = unconditional)
  --guidance-method cfg,rescale:0.7,interval:0.3-14.6,apg:eta=0,r=15,beta=-0.5
                                how w is applied (see ldm generate --help)
  --steps 10,25,50              sampler steps
  --method ddim,ddpm,dpmpp-2m,euler,euler-a   the sampler
  --eta 0,0.5                   DDIM's noise (ddim cells only; the other samplers get eta 0)
Each seed's starting noise (and the noise of stochastic steps) is shared by every cell. Prompts: arguments,
--prompts FILE (one a line), or --prompts-from DATA: a captioned data set's captions (--split, --limit).

Writes to --out:
  images/CELL/NNNNN-seedS.png  every image, its record in the PNG (ldm generate --from-png remakes it)
  grid.png, grids/     one grid per (prompt subset, axis pair), labelled in full words
  metrics.csv, .json   a row per cell: CLIP score, diversity across seeds, exact accuracy for shapes prompts,
                       and with --reference KID, FD and CMMD, each with its 95% bootstrap interval and the
                       number of images behind it
  metrics.png          each metric against w
  pareto.png           fidelity against alignment, a curve per guidance method, points labelled by w
  suggestion.txt       the cell a stated rule picks on the Pareto front (also printed)
  sweep.json           the request, which --resume checks
--out must be a new or empty folder; --overwrite replaces an earlier sweep there; --resume continues a stopped
sweep from the images already written (their records must match this request).

KID, FD and CMMD are computed on the embeddings of our small CLIP (the bundle's, or --clip): they compare
the cells of one sweep, not numbers in papers.

Several processes: `accelerate launch --multi_gpu --num_processes N -m ldm.cli sweep ...` (--multi_gpu also
on a CPU-only machine) splits the sampler batches over N processes; the first writes the metrics. They must
share --out (one machine, or a shared file system).

examples:
  ldm sweep "koala, twemoji style" "red apple, noto style" --guidance 1,2,4,8 --seeds 0,1,2,3 --out sweep/
  ldm sweep "a small red circle at the top left" "a large blue square in the centre" --model shapes \\
      --guidance 1,2,4 --guidance-method cfg,apg --reference shapes-data/ --out shapes-sweep/
  ldm sweep --prompts-from data/emoji --split heldout --reference data/emoji --guidance 1,3,6 \\
      --guidance-method cfg,rescale:0.7 --steps 25 --seeds 0,1 --out emoji-sweep/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from ldm.errors import UsageError
from ldm.generate_cli import add_model_arguments, check_request, load, model_path, progress_bar, with_estimate

SPLITS = ("heldout", "train", "all")
BATCH_CAP = {"cpu": 64, "cuda": 256}  # the largest batch the sweep picks itself: no faster on these 2 CPU cores


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="one or more prompts (or --prompts FILE, --prompts-from DATA)")
    p.add_argument("--prompts", dest="prompts_file", type=Path, default=None, metavar="FILE",
                   help="a text file of prompts, one a line (blank lines skipped)")
    p.add_argument("--prompts-from", type=Path, default=None, metavar="DATA",
                   help="a captioned data set (metadata.jsonl): its captions of --split are the prompts")
    p.add_argument("--split", default="heldout", choices=SPLITS,
                   help="the split of --prompts-from and of a captioned --reference: heldout (the set's test split), "
                        "train or all (default heldout)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="with --prompts-from: N captions, evenly spaced over the split")
    add_model_arguments(p, sweep=True)
    p.add_argument("--guidance", default="1,2,4,8", help="comma-separated weights w (default 1,2,4,8)")
    p.add_argument("--guidance-method", default="cfg",
                   help="comma-separated guidance methods: cfg, rescale:PHI, interval:SIGMA_LO-SIGMA_HI, "
                        "apg[:eta=E,r=R,beta=B] (default cfg)")
    p.add_argument("--steps", default="50", help="comma-separated sampler step counts (default 50)")
    p.add_argument("--method", default="ddim",
                   help="comma-separated samplers: ddim, ddpm, dpmpp-2m, euler, euler-a (default ddim)")
    p.add_argument("--eta", default="0", help="comma-separated DDIM eta values, for ddim cells (default 0)")
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds (default 0,1,2,3)")
    p.add_argument("--reference", type=Path, default=None, metavar="DIR",
                   help="real images to measure fidelity against (KID, FD, CMMD): a captioned data set (its --split) "
                        "or a folder of images")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples behind each interval (default 200; 0: none)")
    p.add_argument("--clip", type=Path, default=None,
                   help="CLIP for the metrics: a bundle or CLIP folder (default: the model's own text encoder, if it is a CLIP)")
    p.add_argument("--out", type=Path, required=True, help="output folder: new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier sweep in --out")
    p.add_argument("--resume", action="store_true", help="continue the stopped sweep in --out")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of the arguments, of --prompts FILE or of --prompts-from DATA (exactly one source)."""
    given = [name for name, v in (("prompt arguments", args.prompts), ("--prompts", args.prompts_file),
                                  ("--prompts-from", args.prompts_from)) if v]
    if len(given) != 1:
        raise UsageError("give prompts as arguments, --prompts FILE or --prompts-from DATA" if not given else
                         f"give prompts one way, not {' and '.join(given)}")
    if args.limit is not None and args.prompts_from is None:
        raise UsageError("--limit applies to --prompts-from DATA")
    if args.prompts:
        return list(args.prompts)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"--prompts {args.prompts_file} is not UTF-8 text; give a text file, one prompt a line") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts {args.prompts_file} holds no prompts; give one a line")
        return prompts
    from ldm.fidelity import METADATA, load_reference

    if not (args.prompts_from / METADATA).is_file():
        raise UsageError(f"--prompts-from {args.prompts_from} is not a captioned data set (no {METADATA}); "
                         f"give one, or --prompts FILE")
    ref = load_reference(args.prompts_from, None if args.split == "all" else args.split, args.limit)
    return list(ref.captions)


def load_reference_set(args: argparse.Namespace):
    """--reference's images (a captioned set's --split, or a plain folder's images), or None."""
    if args.reference is None:
        return None
    from ldm.fidelity import METADATA, load_reference

    split = args.split if (args.reference / METADATA).is_file() and args.split != "all" else None
    try:
        return load_reference(args.reference, split)
    except ValueError as exc:
        if split is None:
            raise
        raise UsageError(f"--reference with --split {split}: {exc} (--split all uses every image)") from None


def make_spec(args: argparse.Namespace, prompts: list[str]):
    from ldm.guidance import format_guidance_method, parse_guidance_methods
    from ldm.sweep import SweepSpec, make_cells, parse_list

    methods = [format_guidance_method(m) for m in parse_guidance_methods(args.guidance_method)]
    cells = make_cells(parse_list(args.guidance, float, "--guidance"), methods, parse_list(args.steps, int, "--steps"),
                       [m.strip() for m in args.method.split(",") if m.strip()], parse_list(args.eta, float, "--eta"))
    return SweepSpec(prompts, parse_list(args.seeds, int, "--seeds"), cells, args.negative, args.sigmas, args.height,
                     args.width, 1 if args.batch_size is None else args.batch_size)  # None: auto_batch_size


def check_cells(args: argparse.Namespace, model: Path, spec) -> tuple:
    """Every cell's sampler options checked against the model, and the device and memory for one batch
    (``check_request``), before anything loads; returns the estimate and the free memory of the last check."""
    est = free = None
    for setting in dict.fromkeys((c.steps, c.method, c.eta, c.guidance_method) for c in spec.cells):
        weights = sorted({c.guidance for c in spec.cells if (c.steps, c.method, c.eta, c.guidance_method) == setting})
        one = argparse.Namespace(**{**vars(args), "batch_size": spec.batch_size,
                                    **dict(zip(("steps", "method", "eta", "guidance_method"), setting))})
        est, free = check_request(one, model, spec.batch_size, grid=False, guidances=weights,
                                  fewer="a smaller --batch-size")
    return est, free


def sweep_geometry(args: argparse.Namespace, model: Path) -> tuple:
    """(the model's geometry, image height, width) of the sweep: --height/--width or the model's own size."""
    from ldm.bundle import read_geometry
    from ldm.pipeline import image_size

    geometry = read_geometry(model)
    height, width = image_size(args.height, args.width, factor=geometry.factor, granularity=geometry.granularity,
                               sample_size=geometry.sample_size)
    return geometry, height, width


PNG_OVERHEAD = 4096  # bytes per image on disk beyond its pixels (an upper bound for PNG: the record, headers, chunks)


def disk_free(path: Path) -> int:
    """Bytes free on the file system that will hold ``path`` (its nearest existing folder)."""
    import shutil

    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_room(args: argparse.Namespace, model: Path, spec) -> None:
    """A sweep writes every image to --out and reads them all back to measure them: refuse one whose images would
    not fit the disk under --out (not checked on --resume, whose images are partly there) or the share of free
    memory a run may claim, before anything is written."""
    from ldm.generate_cli import MEMORY_SHARE, available_memory, size_text

    _, height, width = sweep_geometry(args, model)
    n = len(spec.cells) * len(spec.prompts) * len(spec.seeds)
    what = f"{n} images of {width}x{height} ({len(spec.cells)} cell(s) x {len(spec.prompts)} prompt(s) x {len(spec.seeds)} seed(s))"
    fewer = "ask for fewer prompts, --seeds or --guidance weights"
    if not args.resume:
        need, free = n * (height * width * 3 + PNG_OVERHEAD), disk_free(args.out)
        if need > free:
            raise UsageError(f"{what} need about {size_text(need)} of disk under {args.out}, which has "
                             f"{size_text(free)} free: {fewer}, or choose an --out on a larger disk")
    need = n * height * width * 3  # measuring holds every image's pixels at once
    free, where = available_memory("cpu")
    if need > MEMORY_SHARE * free:
        raise UsageError(f"measuring {what} reads them all back: about {size_text(need)} of memory, and {where} "
                         f"{size_text(free)} free: {fewer}")


def auto_batch_size(args: argparse.Namespace, model: Path, spec) -> int:
    """The largest batch (a power of two, at most ``BATCH_CAP`` for the device and the largest group of rows)
    whose memory estimate fits the share of free memory a run may claim."""
    from ldm.generate_cli import MEMORY_SHARE, available_memory
    from ldm.pipeline import memory_estimate

    geometry, height, width = sweep_geometry(args, model)
    free, _ = available_memory(args.device)
    rows = len(spec.prompts) * len(spec.seeds) * max(
        sum(1 for c in spec.cells if (c.guidance_method, c.steps, c.method, c.eta) == k)
        for k in {(c.guidance_method, c.steps, c.method, c.eta) for c in spec.cells})
    b = min(BATCH_CAP.get(args.device.split(":")[0], BATCH_CAP["cpu"]), rows)
    while b > 1 and memory_estimate(geometry, num_images=b, batch_size=b, height=height, width=width).total > MEMORY_SHARE * free:
        b //= 2
    return max(1, b)


class Ranks:
    """This process's place in a launch of several (accelerate launch / torchrun set WORLD_SIZE), or the only one."""

    def __init__(self, device: str):
        self.state = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            self.state = PartialState(cpu=not (device.startswith("cuda") and torch.cuda.is_available()))
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, error: Optional[BaseException]) -> None:
        """Every process waits here; if any failed, the others stop too (saying which failed) and the one that
        failed raises its own error."""
        if self.state is not None:
            from accelerate.utils import gather_object

            errors = gather_object([None if error is None else f"process {self.rank}: {error}"])
            failed = next((e for e in errors if e), None)
            if failed and error is None:
                raise UsageError(f"stopped because {failed}")
        if error is not None:
            raise error


def run(args: argparse.Namespace) -> int:
    from ldm.generate_cli import check_device
    from ldm.sweep import claim_sweep_output, start_output, write_images

    check_device(args.device, args.backend)
    ranks = Ranks(args.device)
    if ranks.state is not None and ranks.state.device.type == "cuda":
        args.device = str(ranks.state.device)  # one GPU per process
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise UsageError(f"--bootstrap {args.bootstrap} must be 0 (no intervals) or >= 2")
    prompts = read_prompts(args)
    spec = make_spec(args, prompts)
    model = model_path(args.model)
    error, reference = None, None
    if ranks.main:
        try:
            claim_sweep_output(args.out, overwrite=args.overwrite, resume=args.resume, models=[model, args.clip])
            reference = load_reference_set(args)  # before the long part: a bad --reference is a one-line error now
            if reference is not None:
                if clip_scorer(args.clip or model) is None:
                    raise UsageError("--reference needs a CLIP to embed images with; give --clip a CLIP folder")
                if len(reference) < 2 or len(spec.prompts) * len(spec.seeds) < 2:
                    raise UsageError(f"--reference: KID, FD and CMMD need 2 or more images per set; the reference has "
                                     f"{len(reference)}, each cell {len(spec.prompts) * len(spec.seeds)} (prompts x seeds)")
            if args.batch_size is None:
                spec.batch_size = auto_batch_size(args, model, spec)
            est, free = check_cells(args, model, spec)
            check_room(args, model, spec)
            spec = start_output(args.out, spec, request(args, model), overwrite=args.overwrite, resume=args.resume)
        except (UsageError, ValueError, OSError) as exc:
            error = exc
    ranks.agree(error)
    if not ranks.main:
        import json

        from ldm.sweep import SweepSpec

        spec = SweepSpec.from_json(json.loads((args.out / "sweep.json").read_text(encoding="utf-8"))["spec"])
        est, free = check_cells(args, model, spec)
    pipe = load(args, model)
    common = record_common(args, model, pipe, spec)
    progress, close = progress_bar(args.quiet or not ranks.main, "sweep")
    progress = with_estimate(progress, est, free)
    error = None
    try:
        made = write_images(pipe, spec, args.out, common, rank=ranks.rank, world=ranks.world, resume=args.resume,
                            progress=progress)
    except (UsageError, ValueError, OSError) as exc:
        error = exc
    finally:
        close()
    ranks.agree(error)
    if not ranks.main:
        return 0
    if args.resume:
        print(f"resumed: {made} batch(es) made here, the rest read from {args.out / 'images'}", file=sys.stderr)
    return report(args, model, spec, reference)


def request(args: argparse.Namespace, model: Path) -> dict:
    """What besides the spec a resumed sweep must share with the stopped one: the model and the backend."""
    from ldm.backends import resolve_backend
    from ldm.bundle import bundle_hash

    return {"model_hash": bundle_hash(model), "backend": resolve_backend(args.backend, args.device)}


def record_common(args: argparse.Namespace, model: Path, pipe, spec) -> dict:
    """The record fields every image of the sweep shares (as ``ldm generate`` writes them)."""
    from ldm.backends import resolve_backend
    from ldm.bundle import bundle_hash
    from ldm.generate_cli import versions

    f = pipe.downsample_factor
    _, h, w = pipe.latent_shape(spec.height, spec.width)
    return {"model": str(model), "model_hash": bundle_hash(model), "device": args.device,
            "backend": resolve_backend(args.backend, args.device), "versions": versions(), "loras": [],
            "width": w * f, "height": h * f}


def report(args: argparse.Namespace, model: Path, spec, reference) -> int:
    """Read the sweep's images back, measure every cell, write the reading files and print the suggestion."""
    from tqdm import tqdm

    from ldm.sweep import clip_metrics, fidelity_metrics, read_images, shapes_metrics
    from ldm.sweep_report import base_metrics, suggest, suggestion_text, write_report

    result = read_images(spec, args.out)
    scorer = clip_scorer(args.clip or model)
    groups = (scorer is not None) + (reference is not None) + 1  # CLIP, fidelity, shapes: a pass over the cells each
    bar = None if args.quiet else tqdm(total=groups * len(result.cells), desc="measure", unit="cell", leave=False,
                                       file=sys.stderr)
    tick = None if bar is None else (lambda: bar.update(1))
    try:
        embeddings = clip_metrics(result, scorer, bootstrap=args.bootstrap, progress=tick) if scorer is not None else None
        shapes_metrics(result, bootstrap=args.bootstrap, progress=tick)
        if reference is not None:
            from ldm.fidelity import reference_embeddings

            fidelity_metrics(result, embeddings, reference_embeddings(reference, scorer), bootstrap=args.bootstrap,
                             progress=tick)
    finally:
        if bar is not None:
            bar.close()
    paths = write_report(result, args.out)
    names = base_metrics(result)
    for cell in result.cells:
        m = result.metrics.get(cell, {})
        label = ", ".join(cell.text(a) for a in (result.axes or ["guidance"]))
        print(f"{label}: " + ", ".join(_shown(m, n) for n in names if n in m))
    print(suggestion_text(result, suggest(result)), end="")
    print("\n".join(str(p) for p in paths.values()))
    return 0


def _shown(m: dict, name: str) -> str:
    lo, hi = m.get(f"{name}_low"), m.get(f"{name}_high")
    if lo is None or hi is None or lo != lo:
        return f"{name}={m[name]:.4g}"
    return f"{name}={m[name]:.4g} [{lo:.4g}, {hi:.4g}]"


def clip_scorer(path: Path):
    """The CLIP scorer at ``path``, or None (with a note) when that folder holds no image tower."""
    import conditioning

    try:
        return conditioning.load_clip_scorer(path)
    except (ValueError, FileNotFoundError) as exc:
        print(f"note: no CLIP score or diversity ({exc}); give --clip a CLIP folder", file=sys.stderr)
        return None
