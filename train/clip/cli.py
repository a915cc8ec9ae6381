"""Train a small CLIP (open_clip architecture, contrastive loss) on a captioned image set.

CONFIG is a YAML file with the sections model, data, train, optim, checkpoint and validation (see
configs/clip/*.yaml; every key is documented in train/clip/config.py, train/run/sections.py and
conditioning/clip_model.py). Unknown keys and wrong types are errors; keys of the old dialect
(run.*, optim.batch_size, data.folder, ...) name their new key. Any key can be overridden on the
command line as section.key=value, e.g.

    ldm train-clip configs/clip/emoji.yaml train.output_dir=runs/clip-emoji train.max_steps=3000

Checkpoints go to <train.output_dir>/checkpoints every checkpoint.every steps, written atomically;
continue a stopped run with --resume latest. The run log is <train.output_dir>/logs (train.csv,
val.csv with held-out retrieval, log.txt). At the end <train.output_dir> holds text_encoder/ and
tokenizer/ (a bundle's text encoder, also usable as the CLIP scorer) and metrics.json.
"""

from __future__ import annotations

import argparse

from train.run.cli import add_run_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "configs/clip/*.yaml", "optim.lr=5e-4")


def run(args: argparse.Namespace) -> int:
    from train.clip.config import load_train_config
    from train.clip.trainer import train
    from train.run.start import claim_run_folder

    config = load_train_config(args.config, args.overrides)
    claim_run_folder(config.train.output_dir, args.resume, command="ldm train-clip", overwrite=args.overwrite,
                     inputs=[config.data.path])
    train(config, resume=args.resume)
    return 0
