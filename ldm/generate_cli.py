"""Generate images from a prompt.

Each PNG carries, in its text chunks, everything needed to make it again: prompt, negative
prompt, seed, steps, method, eta, guidance, size, the model's path and hash, the batch it was
made in, and package versions. `ldm generate --from-png FILE` reads them back and regenerates
the image; on the same machine the result is bit-identical.

examples:
  ldm generate "koala, twemoji style"
  ldm generate "a small red circle at the top left" --model shapes --guidance 4 --num-images 8 --out circles.png
  ldm generate --from-png circles-3.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ldm.errors import UsageError

PNG_KEY = "ldm-toolkit"  # the PNG text chunk holding our JSON record


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by generate and sweep: the model and how to run it."""
    p.add_argument("--model", type=Path, default=None, help="model bundle folder, or the name of a model shipped in the package: default (emoji, 64 px) or shapes (32 px); default: default")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--method", default="ddim", help="sampler: ddim or ddpm (default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like (default 0)")
    p.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of the autoencoder's factor")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of the autoencoder's factor")
    p.add_argument("--batch-size", type=int, default=8, help="images per batched U-Net call (default 8)")
    p.add_argument("--backend", default="auto",
                   help="torch, onnx (ONNX Runtime, fp32 CPU; graphs exported once, cached beside the model) "
                        "or auto: onnx on the CPU, torch elsewhere (default auto)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the text prompt")
    add_model_arguments(p)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance weight w >= 0; 1 = off (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    p.add_argument("--num-images", type=int, default=1, help="how many images (default 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="output PNG (default out.png); with several images NAME-i.png, plus NAME-grid.png")
    p.add_argument("--from-png", type=Path, default=None, help="regenerate the image recorded in this PNG's metadata")


def model_path(model: Optional[Path]) -> Path:
    """The bundle folder for ``--model``: a folder, a packaged model's name (default, shapes) or None (default)."""
    from ldm.bundle import PACKAGED_MODELS, check_bundle

    name = "default" if model is None else str(model)
    if name in PACKAGED_MODELS and not Path(name).exists():
        if not PACKAGED_MODELS[name].is_dir():
            raise UsageError(f"no {name} model is installed (expected {PACKAGED_MODELS[name]}); give --model DIR")
        model = PACKAGED_MODELS[name]
    return check_bundle(model)


def progress_bar(quiet: bool, desc: str):
    """A progress(done, total) callback drawing a tqdm bar on stderr, or None when quiet."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="step", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return progress, bar.close


def versions() -> dict:
    import diffusers
    import torch

    from ldm import __version__

    return {"ldm-toolkit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def save_png(image, path: Path, record: dict) -> None:
    """Write ``image`` with ``record`` as JSON in a text chunk, atomically."""
    from PIL.PngImagePlugin import PngInfo

    from ldm_io import save_image

    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    info.add_text("parameters", f"{record['prompt']} | seed {record['seed']}, {record['steps']} {record['method']} steps, guidance {record['guidance']}")
    save_image(image, path, format="PNG", pnginfo=info)


def read_record(path: Path) -> dict:
    from PIL import Image

    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    with Image.open(path) as im:
        text = getattr(im, "text", {}) or {}
    if PNG_KEY not in text:
        raise UsageError(f"{path} has no '{PNG_KEY}' metadata; it was not written by ldm generate")
    return json.loads(text[PNG_KEY])


def output_paths(out: Optional[Path], n: int) -> list[Path]:
    out = out or Path("out.png")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must be a .png file name")
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(n)]


def marked_png_info():
    """PNG text chunks that tell a later run this image is ldm generate's (so it may be replaced)."""
    from PIL.PngImagePlugin import PngInfo

    from ldm_io.outputs import software_text

    info = PngInfo()
    info.add_text(*software_text("generate"))
    return info


def grid_path(paths: list[Path]) -> Path:
    """NAME-grid.png beside NAME-0.png ... (several images)."""
    return paths[0].with_name(paths[0].stem.rsplit("-", 1)[0] + "-grid.png")


def regenerate_path(args: argparse.Namespace) -> Path:
    """Where --from-png's image goes: --out, else FILE-again.png beside it."""
    return args.out or args.from_png.with_name(args.from_png.stem + "-again.png")


def claim_outputs(args: argparse.Namespace) -> list[Path]:
    """Every PNG this command will write, checked before the model loads: a file name (not a folder)
    in a writable place, and where it exists, a PNG an ldm command wrote (replaced); never --from-png."""
    from ldm_io import claim_output_file
    from ldm_io.outputs import written_by_ldm

    if args.from_png is not None:
        paths = [regenerate_path(args)]
        if paths[0].resolve() == args.from_png.resolve():
            raise UsageError(f"--out {paths[0]} is the --from-png file; write the remade image to another file")
    else:
        paths = output_paths(args.out, max(args.num_images, 1))
        paths += [grid_path(paths)] if len(paths) > 1 else []
    for path in paths:
        claim_output_file(path, command="ldm generate", ours=written_by_ldm, inputs=[args.from_png])
    return paths


def run(args: argparse.Namespace) -> int:
    claim_outputs(args)
    if args.from_png is not None:
        return regenerate(args)
    if not args.prompt:
        raise UsageError("give a prompt, e.g. ldm generate \"koala, twemoji style\", or --from-png FILE")
    if args.num_images < 1:
        raise UsageError(f"--num-images {args.num_images} must be >= 1")
    images, records = generate(args, [args.prompt], args.seed, args.num_images)
    paths = output_paths(args.out, len(images))
    for image, record, path in zip(images, records, paths):
        save_png(image, path, record)
    if len(images) > 1:
        from ldm.pipeline import image_grid
        from ldm_io import save_image

        cols = min(len(images), 8)
        rows = -(-len(images) // cols)
        filler = [images[0].copy().point(lambda _: 255)] * (rows * cols - len(images))
        grid = image_grid(images + filler, rows, cols)
        save_image(grid, grid_path(paths), pnginfo=marked_png_info())
    print("\n".join(str(p) for p in paths))
    return 0


def load(args: argparse.Namespace, model: Path):
    from ldm.pipeline import Text2ImagePipeline

    return Text2ImagePipeline.from_pretrained(model, device=args.device, backend=args.backend)


def generate(args: argparse.Namespace, batch_prompts: list[str], seed: int, num_images: int, model: Optional[Path] = None):
    """Images and their metadata records for prompts x num_images, seeds from ``seed``."""
    from ldm.backends import resolve_backend
    from ldm.bundle import bundle_hash

    model = model_path(model or args.model)
    pipe = load(args, model)
    progress, close = progress_bar(args.quiet, "generate")
    req = pipe.request(batch_prompts, args.negative, seed, num_images)
    try:
        images = pipe(batch_prompts, args.negative, steps=args.steps, method=args.method, eta=args.eta,
                      guidance=args.guidance, seed=seed, num_images=num_images, height=args.height, width=args.width,
                      batch_size=args.batch_size, progress=progress)
    finally:
        close()
    common = {
        "negative_prompt": args.negative, "steps": args.steps, "method": args.method, "eta": args.eta,
        "guidance": args.guidance, "width": images[0].size[0], "height": images[0].size[1],
        "model": str(model), "model_hash": bundle_hash(model), "device": args.device,
        "backend": resolve_backend(args.backend, args.device),
        "batch_size": args.batch_size, "versions": versions(),
    }
    records = []
    for i, (p, s) in enumerate(zip(req.prompts, req.seeds)):
        first = i - i % args.batch_size  # the batch this image was made in, so it can be remade exactly
        batch = slice(first, first + args.batch_size)
        records.append({**common, "prompt": p, "seed": s, "batch_prompts": req.prompts[batch],
                        "batch_seeds": req.seeds[batch], "batch_index": i - first})
    return images, records


def regenerate(args: argparse.Namespace) -> int:
    """Remake the image recorded in --from-png, in the same batch it was made in."""
    import numpy as np
    from PIL import Image

    from ldm.bundle import bundle_hash

    rec = read_record(args.from_png)
    model = model_path(args.model or Path(rec["model"]))
    if bundle_hash(model) != rec["model_hash"]:
        print(f"warning: model {model} differs from the one that made {args.from_png} (hash {rec['model_hash']})", file=sys.stderr)
    for key in ("steps", "method", "eta", "guidance", "height", "width", "batch_size", "backend"):
        setattr(args, key, rec[key])
    args.negative = rec["negative_prompt"]
    from ldm.pipeline import GenerationRequest, to_pil

    pipe = load(args, model)
    n = len(rec["batch_prompts"])
    req = GenerationRequest(rec["batch_prompts"], [args.negative] * n, rec["batch_seeds"])
    progress, close = progress_bar(args.quiet, "regenerate")
    try:
        latents = pipe.generate_latents(req, steps=args.steps, method=args.method, eta=args.eta, guidance=args.guidance,
                                        height=args.height, width=args.width, batch_size=args.batch_size, progress=progress)
    finally:
        close()
    image = to_pil(pipe.decode(latents))[rec["batch_index"]]
    out = regenerate_path(args)
    save_png(image, out, rec)
    with Image.open(args.from_png) as original:
        diff = np.abs(np.asarray(original.convert("RGB"), dtype=np.int16) - np.asarray(image, dtype=np.int16))
    print(f"{out}: {'bit-identical to' if diff.max() == 0 else f'max pixel difference {diff.max()} from'} {args.from_png}")
    return 0
