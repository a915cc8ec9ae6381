"""The ``ldm`` command line: one console script, one subcommand per job.

Errors are printed as one line ``ldm <command>: error: ...`` with no traceback, and the exit code
says whose they are (``EXIT_CODES``): 2 for what the user can fix (bad arguments, missing or wrong
files, a folder that cannot be written), 3 for a fault of the machine (a full disk, out of memory,
an I/O error), 130 for Ctrl-C. A training run that stops on its own (diverged) exits with 1. An
exception of any other kind is a bug in the toolkit and keeps its traceback, for the report.

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
import errno
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
    "export-lora": ("ldm.export_lora_cli", "write a fine-tune's LoRA in the kohya/A1111 layout (A1111, ComfyUI)"),
    "export-single-file": ("ldm.export_single_file_cli",
                           "write a bundle as one Stable Diffusion .safetensors file (original layout, for A1111/ComfyUI)"),
}

EXIT_CODES = {0: "done", 1: "a training run stopped on its own (diverged)", 2: "a user error: arguments, inputs, outputs",
              3: "a fault of the machine: disk full, out of memory, I/O error", 130: "interrupted (Ctrl-C)"}

# errno values of an OSError that is the machine's fault, not the user's (exit 3)
_MACHINE_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded", errno.EIO: "I/O error"}

# The order `ldm --help` lists them in.
ORDER = ["generate", "sweep", "data", "train-vae", "eval-vae", "train-clip", "train", "finetune", "pack",
         "export-lora", "export-single-file", "export-web", "serve-web"]


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
    except BaseException as exc:  # noqa: BLE001  (sorted by _error_line; bugs are re-raised there)
        code, line = _error_line(exc)
        print(f"ldm {args.command}: error: {line}", file=sys.stderr)
        return code


def _error_line(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that reached the command line; re-raises a bug's."""
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted; what was written so far is complete (every file is renamed into place when done)"
    if isinstance(exc, OSError) and exc.errno in _MACHINE_FAULTS:
        if not str(exc).startswith("[Errno"):  # a message of ours (ldm_io.DiskFull: what is intact, how to resume)
            return 3, _one_line(exc)
        where = f" writing {exc.filename}" if exc.filename else ""
        return 3, f"{_MACHINE_FAULTS[exc.errno]}{where}; free some space (or choose another folder) and run again"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return 3, "out of memory; lower the batch size, the image size or the number of images"
    if isinstance(exc, (UsageError, ValueError, OSError)):  # the user's to fix: arguments, files, folders
        return 2, _one_line(exc)
    raise exc


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (an OSError without its own message: its strerror and file)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename and str(exc).startswith("[Errno"):
        text = f"{exc.filename}: {exc.strerror}"
        if exc.errno == errno.EROFS:
            text += " (a read-only file system); choose another folder"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            text += " (permission denied); choose a folder you can write to"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
