"""Train the latent diffusion U-Net from a YAML config.

The frozen autoencoder and text encoder (encoders.*) encode the data set once into a cache
(cache.dir); training then reads only the cache. Checkpoints, logs (CSV and TensorBoard), sample
grids and the final model bundle go to train.output_dir.

examples:
  ldm train configs/ldm/small-64.yaml data.path=/work/data/emoji \\
      encoders.autoencoder=runs/vae-emoji-f4/vae encoders.text_encoder=runs/clip-emoji
  ldm train configs/ldm/small-64.yaml ... --resume latest
  accelerate launch --num_processes 2 -m ldm.cli train configs/ldm/small-64.yaml ...
"""

from __future__ import annotations

import argparse
import sys

from train.run.cli import add_run_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "configs/ldm/*.yaml", "optim.lr=3e-4 train.max_steps=100")


def run(args: argparse.Namespace) -> int:
    from train.run.config import load_config
    from train.run.start import claim_run_folder
    from train.unet.config import LDMTrainConfig
    from train.unet.trainer import train_from_config

    if not args.config.is_file():
        raise FileNotFoundError(f"config {args.config} does not exist; see configs/ldm/ for examples")
    config = load_config(LDMTrainConfig, args.config, args.overrides)
    claim_run_folder(config.train.output_dir, args.resume, command="ldm train", overwrite=args.overwrite,
                     inputs=[config.data.path, config.cache.dir],
                     models=[config.encoders.autoencoder, config.encoders.text_encoder])
    return report("ldm train", lambda: train_from_config(config, resume=args.resume))


def report(command: str, fit) -> int:
    """Run ``fit()`` (a training run); print where the bundle went, or why training stopped (exit 1)."""
    from train.unet.trainer import TrainingDiverged

    try:
        result = fit()
    except TrainingDiverged as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 1
    if result.bundle is not None:
        print(f"model bundle: {result.bundle}")
    return 0
