"""Export a model bundle as a static web site that generates images in the browser.

The site holds the text encoder, U-Net and decoder as ONNX graphs, the tokenizer, the sampler's
per-step coefficients, Python's starting noise for the first --seeds seeds, onnxruntime-web (fetched
once with npm, then cached) and the page. Serve it with `ldm serve-web DIR` (any static server works;
that one sends the headers that let wasm run on several threads).

examples:
  ldm export-web --out site/
  ldm export-web --model my-bundle --out site/ --seeds 8 --max-steps 100
  ldm serve-web site/

--out must be a new or empty folder; --overwrite replaces an earlier exported site there (one holding
only a site's files), never the model bundle, a folder around it, or a folder of other files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="model bundle folder, or the name of a model shipped in the package: default (emoji, 64 px) or shapes (32 px); default: default")
    p.add_argument("--out", type=Path, required=True, help="site folder to write: new or empty")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds an earlier exported site (never the model or a folder around it)")
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 get Python's exact noise in the page (default 4)")
    p.add_argument("--max-steps", type=int, default=50, help="largest step count the page offers (default 50)")
    p.add_argument("--etas", default="0,0.5,1", help="DDIM eta values the page offers, comma-separated (default 0,0.5,1)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--prompt", default="koala, twemoji style", help="the prompt the page starts with")


NOTE_NOISE = 256 << 20  # bytes: a larger noise.bin gets a note (the page downloads it whole)


def check_noise_size(model: Path, args: argparse.Namespace) -> None:
    """noise.bin holds --seeds x --max-steps latents of float32; it is built in memory, written, and downloaded
    by the page: refuse it where it cannot fit in memory or on the disk, and say its size when it is large."""
    import shutil

    from ldm.bundle import read_geometry
    from ldm.generate_cli import MEMORY_SHARE, available_memory, size_text
    from ldm.pipeline import image_size

    g = read_geometry(model)
    height, width = image_size(args.height, args.width, factor=g.factor, granularity=g.granularity,
                               sample_size=g.sample_size)
    size = max(args.seeds, 0) * max(args.max_steps, 0) * g.latent_channels * (height // g.factor) * (width // g.factor) * 4
    what = f"noise.bin would be {size_text(size)} (--seeds {args.seeds} x --max-steps {args.max_steps} latents of {width}x{height})"
    free, where = available_memory("cpu")
    parent = args.out.resolve().parent
    disk = shutil.disk_usage(parent if parent.is_dir() else Path.cwd()).free
    if size > MEMORY_SHARE * free or size > disk:
        room = f"{size_text(free)} of memory" if size > MEMORY_SHARE * free else f"{size_text(disk)} of disk"
        raise UsageError(f"{what}, and {where} {room} free; give fewer --seeds (the page draws noise of its own "
                         "for the others)")
    if size > NOTE_NOISE:
        print(f"note: {what}; the page downloads it whole before its first image", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ldm.generate_cli import model_path
    from ldm.web.export import export_site

    try:
        etas = tuple(float(e) for e in args.etas.split(",") if e.strip())
    except ValueError:
        raise UsageError(f"--etas={args.etas!r} must be comma-separated numbers >= 0, e.g. 0,0.5,1") from None
    if not etas:
        raise UsageError("--etas is empty; give at least one DDIM eta, e.g. 0")
    model = model_path(args.model)
    check_noise_size(model, args)
    out = export_site(model, args.out, seeds=args.seeds, max_steps=args.max_steps, etas=etas,
                      height=args.height, width=args.width, default_prompt=args.prompt, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB); serve it with: ldm serve-web {out}")
    return 0
