"""Train the autoencoder (VQ-VAE, or a KL autoencoder) from a YAML config.

    ldm train-vae configs/vae/vq-f4-64.yaml data.path=data/emoji train.output_dir=runs/vae-emoji train.max_steps=3000
    ldm train-vae configs/vae/vq-f4-64.yaml data.path=data/emoji train.output_dir=runs/vae-emoji --resume latest

Overrides are dotted section.key=value pairs (sections: model, quantizer, loss, data, train, optim,
checkpoint). The run folder gets config.yaml, logs/ (train.csv, log.txt), checkpoints/step-NNNNNNNN/ and,
at the end, vae/ (diffusers layout, scaling_factor = 1 / std of latents over a sample of the training images).
"""

from __future__ import annotations

import argparse

from train.run.cli import add_run_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "configs/vae/*.yaml", "optim.lr=2e-4")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the run log is still written)")


def run(args: argparse.Namespace) -> int:
    from train.run.config import load_config
    from train.run.start import claim_run_folder
    from train.vae.config import VAETrainingConfig
    from train.vae.trainer import train_vae

    config = load_config(VAETrainingConfig, args.config, args.overrides)
    claim_run_folder(config.train.output_dir, args.resume, command="ldm train-vae", overwrite=args.overwrite,
                     inputs=[config.data.path])
    folder = train_vae(config, resume=args.resume, progress=not args.quiet)
    print(folder)
    return 0
