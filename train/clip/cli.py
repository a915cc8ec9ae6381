"""Train a small CLIP (open_clip architecture, contrastive loss) on a captioned image folder.

CONFIG is a YAML file with the sections model, data, optim and run (see
configs/clip/*.yaml; every key is documented in train/clip/trainer.py and
conditioning/clip_model.py). Unknown keys and wrong types are errors. Any key
can be overridden on the command line as section.key=value, e.g.

    ldm train-clip configs/clip/emoji.yaml run.output_dir=runs/clip-emoji optim.max_steps=3000

Checkpoints go to <run.output_dir>/checkpoints every run.checkpoint_every steps,
written atomically; continue a stopped run with --resume latest. At the end
<run.output_dir> holds text_encoder/ and tokenizer/ (a bundle's text encoder,
also usable as the CLIP scorer) and metrics.json with held-out retrieval.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (configs/clip/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=5e-4")
    parser.add_argument("--resume", metavar="latest|DIR", default=None,
                        help="continue from the newest checkpoint of run.output_dir ('latest') or from a checkpoint folder")


def run(args: argparse.Namespace) -> int:
    from train.clip.config import load_train_config
    from train.clip.trainer import train

    config = load_train_config(args.config, args.overrides)
    train(config, resume=args.resume)
    return 0
