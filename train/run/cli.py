"""The command-line arguments every trainer shares: its YAML config, ``key=value`` overrides, and
what to do with a run folder that already holds a run (``--resume`` it or ``--overwrite`` it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


def add_run_arguments(parser: argparse.ArgumentParser, configs: Optional[str], example: str) -> None:
    """``config`` (when ``configs`` names where the recipes are; None: no positional config),
    ``overrides``, ``--resume`` and ``--overwrite``."""
    if configs is not None:
        parser.add_argument("config", type=Path, help=f"YAML config ({configs})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    parser.add_argument("--resume", default=None, metavar="latest|DIR",
                        help="continue from the newest complete checkpoint in train.output_dir (latest) or from a "
                             "checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace train.output_dir when it holds an earlier run (and nothing else); without it "
                             "a folder holding a run needs --resume")
