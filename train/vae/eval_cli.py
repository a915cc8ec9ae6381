"""Evaluate an autoencoder on held-out images: PSNR, SSIM, codebook usage and perplexity, and a PNG grid.

    ldm eval-vae --vae /work/models/vae-emoji-f4/vae --data /work/data/emoji

Reads the rows of DATA/metadata.jsonl whose split is --split (default "test"), reconstructs them
(encode, then decode; VQ quantises), prints the mean metrics and writes a PNG with --grid originals
in the top row and their reconstructions below (default: VAE_DIR/../eval-vae.png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", required=True, metavar="DIR", help="autoencoder folder (diffusers VQModel/AutoencoderKL)")
    parser.add_argument("--data", required=True, metavar="DIR", help="imagefolder with metadata.jsonl")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="rows to evaluate (default test)")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate at most this many images (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grid", type=int, default=8, help="images shown in the PNG")
    parser.add_argument("--out", default=None, metavar="PNG", help="where to write the PNG")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")
    parser.add_argument("--sample-posterior", action="store_true", help="KL: decode a posterior sample, not the mean")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from train.vae.data import read_imagefolder, to_model_range
    from vae.autoencoder import load_autoencoder
    from vae.metrics import code_histogram, codebook_usage, perplexity, psnr, ssim, to_unit

    if args.batch_size < 1 or args.grid < 0 or args.max_images < 0:
        raise ValueError("--batch-size must be >= 1, --grid and --max-images >= 0")
    ae = load_autoencoder(args.vae, sample_posterior=args.sample_posterior)
    images = read_imagefolder(args.data, args.split, max_images=args.max_images)  # (N, 3, H, W) uint8
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
    out = Path(args.out) if args.out else Path(args.vae).resolve().parent / "eval-vae.png"
    if args.grid:
        write_grid(torch.cat(originals)[: args.grid], torch.cat(recons)[: args.grid], out)
        print(f"wrote {out} (top: originals, bottom: reconstructions)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def write_grid(top, bottom, path: Path) -> None:
    """Two rows of images in [0, 1] (N, 3, H, W) -> one PNG, written atomically."""
    import os

    import numpy as np
    from PIL import Image

    rows = [np.concatenate(list(r.permute(0, 2, 3, 1).numpy()), axis=1) for r in (top, bottom)]  # (H, N*W, 3)
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)
