"""Evaluate an autoencoder on held-out images: PSNR, SSIM, codebook usage and perplexity, and a PNG grid.

    ldm eval-vae --vae runs/vae-emoji-f4/vae --data data/emoji

Reads DATA through ``train.data`` and cuts it by the held-out rule every trainer shares
(``train.data.split``: the data set's test split, else a hash of each image's path): --split test (the
default) evaluates the held-out rows, --split train the rows the trainers train on. It reconstructs them
(encode, then decode; VQ quantises), prints the mean metrics and writes a PNG with --grid originals in
the top row and their reconstructions below (default: VAE_DIR/../eval-vae.png).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldm_io import write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", required=True, metavar="DIR", help="autoencoder folder (diffusers VQModel/AutoencoderKL)")
    parser.add_argument("--data", required=True, metavar="DIR", help="data set (any format train.data reads)")
    parser.add_argument("--split", default="test", choices=("train", "test"),
                        help="test: the held-out rows (default); train: the training rows")
    parser.add_argument("--holdout-fraction", type=float, default=None, metavar="F",
                        help="held-out share when the data has no test split (default: data.holdout_fraction of the "
                             "run's VAE_DIR/../config.yaml when there is one, else 0.05)")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate at most this many images (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grid", type=int, default=8, help="images shown in the PNG")
    parser.add_argument("--out", default=None, metavar="PNG", help="where to write the PNG")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")
    parser.add_argument("--sample-posterior", action="store_true", help="KL: decode a posterior sample, not the mean")
    parser.add_argument("--allow-outside", action="store_true",
                        help="read images outside the data folder (absolute paths, '..', symlinks out of it; default: "
                             "the run's data.allow_outside_paths, else off: such rows are skipped)")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from train.vae.images import load_vae_split, pixels, to_model_range
    from vae.autoencoder import load_autoencoder
    from vae.metrics import code_histogram, codebook_usage, perplexity, psnr, ssim, to_unit

    if args.batch_size < 1 or args.grid < 0 or args.max_images < 0:
        raise ValueError("--batch-size must be >= 1, --grid and --max-images >= 0")
    out = claim_outputs(args)  # before loading anything
    ae = load_autoencoder(args.vae, sample_posterior=args.sample_posterior)
    split = load_vae_split(args.data, holdout_fraction(args), progress=False,
                           allow_outside_paths=args.allow_outside or bool(run_data(args).get("allow_outside_paths")))
    data, rows = (split.heldout, split.heldout_rows) if args.split == "test" else (split.train, split.train_rows)
    if not rows:
        raise ValueError(f"{args.data} has no {'held-out' if args.split == 'test' else 'training'} rows "
                         "(give --holdout-fraction above 0, or use a data set with a test split)")
    images = pixels(data, rows[: args.max_images or None])  # (N, 3, H, W) uint8
    print(split.summary(), file=sys.stderr)  # kept, and skipped by reason
    psnrs, ssims, originals, recons = [], [], [], []
    counts = torch.zeros(ae.num_embeddings or 1)
    with torch.no_grad():
        for i in tqdm(range(0, len(images), args.batch_size), desc="eval-vae", leave=False):
            x = to_model_range(images[i:i + args.batch_size])  # (B, 3, H, W)
            x_rec, codes = ae.reconstruct(x)
            a, b = to_unit(x), to_unit(x_rec)
            psnrs.append(psnr(b, a))
            ssims.append(ssim(b, a))
            if codes is not None:
                counts += code_histogram(codes, len(counts))
            if sum(len(o) for o in originals) < args.grid:
                originals.append(a)
                recons.append(b)
    result = {"images": len(images), "split": args.split, "psnr": float(torch.cat(psnrs).mean()),
              "ssim": float(torch.cat(ssims).mean()), "kind": ae.kind}
    if ae.kind == "vq":
        result.update(codebook_usage=codebook_usage(counts), perplexity=perplexity(counts),
                      codes_used=int((counts > 0).sum()), codebook_size=len(counts))
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    if args.grid:
        write_grid(torch.cat(originals)[: args.grid], torch.cat(recons)[: args.grid], out)
        print(f"wrote {out} (top: originals, bottom: reconstructions)")
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
    return 0


def claim_outputs(args: argparse.Namespace) -> Path:
    """The PNG path (default VAE_DIR/../eval-vae.png); it and --json checked: a file name in a writable
    place, outside the inputs, and where one exists, an earlier eval-vae output (then replaced)."""
    from ldm_io import claim_output_file
    from ldm_io.outputs import written_by_ldm

    def our_json(path: Path) -> bool:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and {"psnr", "ssim", "kind"} <= set(record)

    out = Path(args.out) if args.out else Path(args.vae).resolve().parent / "eval-vae.png"
    if args.grid:
        claim_output_file(out, command="ldm eval-vae", option="--out", inputs=[args.data], sealed=[args.vae],
                          ours=written_by_ldm)
    if args.json:
        claim_output_file(args.json, command="ldm eval-vae", option="--json", inputs=[args.data], sealed=[args.vae],
                          ours=our_json)
    return out


def holdout_fraction(args: argparse.Namespace) -> float:
    """--holdout-fraction, else the training run's data.holdout_fraction, else the config default."""
    from train.vae.config import VAEDataConfig

    if args.holdout_fraction is not None:
        return args.holdout_fraction
    data = run_data(args)
    if "holdout_fraction" in data:
        return float(data["holdout_fraction"])
    return VAEDataConfig.holdout_fraction


def run_data(args: argparse.Namespace) -> dict:
    """The data section of the training run's VAE_DIR/../config.yaml ({} when there is none)."""
    import yaml

    run_config = Path(args.vae).resolve().parent / "config.yaml"
    if run_config.is_file():
        return (yaml.safe_load(run_config.read_text()) or {}).get("data") or {}
    return {}


def write_grid(top, bottom, path: Path) -> None:
    """Two rows of images in [0, 1] (N, 3, H, W) -> one PNG, written atomically."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from ldm_io import save_image
    from ldm_io.outputs import software_text

    rows = [np.concatenate(list(r.permute(0, 2, 3, 1).numpy()), axis=1) for r in (top, bottom)]  # (H, N*W, 3)
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    info = PngInfo()
    info.add_text(*software_text("eval-vae"))  # an earlier grid may be replaced by the next run
    save_image(Image.fromarray(grid), path, format="PNG", pnginfo=info)
