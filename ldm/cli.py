"""The ``ldm`` command line: one console script, one subcommand per job.

Errors the user can fix (bad arguments, missing files) are printed as one line
``ldm <command>: error: ...`` with exit code 2 and no traceback.

Each subcommand lives in a module with two functions, ``add_arguments(parser)``
and ``run(args) -> exit code``. The library's own subcommands are listed in
``LIBRARY_COMMANDS``; the training subcommands are the table ``train.commands``
owns, read only when a command line is parsed, so that ``import ldm`` (and this
module) never imports ``train``. Only the chosen subcommand's module is
imported, and those modules import torch and friends inside ``run``, so
``ldm --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Optional, Sequence

from ldm import __version__
from ldm.errors import UsageError  # noqa: F401  (re-exported: command modules raise it)

# name -> (module, one-line description) of the subcommands that need no training code.
LIBRARY_COMMANDS = {
    "generate": ("ldm.generate_cli", "generate images from a prompt"),
    "sweep": ("ldm.sweep_cli", "sweep the guidance weight over prompts and seeds; grid, metrics and plot"),
    "export-web": ("ldm.web.export_cli", "export a model as a static web page that generates images in the browser"),
    "serve-web": ("ldm.web.serve_cli", "serve an exported web page on 127.0.0.1 (with the headers wasm threads need)"),
}

# The order `ldm --help` lists them in.
ORDER = ["generate", "sweep", "data", "train-vae", "eval-vae", "train-clip", "train", "finetune", "pack",
         "export-web", "serve-web"]


def commands() -> dict[str, tuple[str, str]]:
    """Every subcommand: name -> (module, description), in ``ORDER``."""
    from train.commands import COMMANDS  # the training half's own table

    table = {**LIBRARY_COMMANDS, **COMMANDS}
    return {name: table[name] for name in ORDER if name in table} | table


def _chosen(argv: Sequence[str], names) -> Optional[str]:
    """The subcommand named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in names else None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` gets its module imported and its arguments."""
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Latent text-to-image diffusion toolkit: data, training, generation, guidance sweeps.",
    )
    parser.add_argument("--version", action="version", version=f"ldm-toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    table = commands()
    chosen = _chosen(argv, table)
    for name, (module_name, summary) in table.items():
        if name != chosen:
            sub.add_parser(name, help=summary, description=summary)
            continue
        module: ModuleType = importlib.import_module(module_name)
        p = sub.add_parser(name, help=summary, description=module.__doc__ or summary,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra  # key=value overrides given after an option (argparse leaves them over)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"ldm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
