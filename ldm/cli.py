"""The ``ldm`` command line: one console script, one subcommand per job.

Errors the user can fix (bad arguments, missing files) are printed as one line
``ldm <command>: error: ...`` with exit code 2 and no traceback.

Each subcommand lives in a module with two functions, ``add_arguments(parser)``
and ``run(args) -> exit code``, registered in ``_IMPLEMENTED`` below. Those
modules import torch and friends inside ``run`` so that ``ldm --help`` stays
instant. This file is the application's entry point and the one place in
``ldm`` that may reach into ``train`` (to dispatch the training commands).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Callable, Optional, Sequence

from ldm import __version__
from ldm.errors import UsageError  # noqa: F401  (re-exported: command modules raise it)

from ldm import generate_cli, sweep_cli  # noqa: E402,I001  (after UsageError: command modules import it from here)
from ldm.web import export_cli as web_export_cli, serve_cli as web_serve_cli  # noqa: E402
from train import clip_cli, data_cli, finetune_cli, ldm_cli as train_cli, pack_cli, vae_cli, vae_eval_cli  # noqa: E402


# name -> one-line description, in the order `ldm --help` lists them.
SUBCOMMANDS = {
    "generate": "generate images from a prompt",
    "sweep": "sweep the guidance weight over prompts and seeds; grid, metrics and plot",
    "data": "build (emoji, shapes) or check a captioned image data set",
    "train-vae": "train the autoencoder (VQ-VAE) from a YAML config",
    "eval-vae": "evaluate an autoencoder on held-out images: PSNR, SSIM, codebook use; PNG of reconstructions",
    "train-clip": "train a small CLIP text/image encoder from a YAML config",
    "train": "train the latent diffusion U-Net from a YAML config",
    "finetune": "fine-tune a model bundle on your own captioned images",
    "pack": "pack a trained bundle for shipping: fp16 weights, token table cut to the training vocabulary",
    "export-web": "export a model as a static web page that generates images in the browser",
    "serve-web": "serve an exported web page on 127.0.0.1 (with the headers wasm threads need)",
}

# Subcommands that exist: name -> module with add_arguments(parser) and run(args) -> exit code.
_IMPLEMENTED: dict[str, ModuleType] = {
    "generate": generate_cli,
    "sweep": sweep_cli,
    "data": data_cli,
    "train-vae": vae_cli,
    "eval-vae": vae_eval_cli,
    "train-clip": clip_cli,
    "train": train_cli,
    "finetune": finetune_cli,
    "pack": pack_cli,
    "export-web": web_export_cli,
    "serve-web": web_serve_cli,
}


def _not_available(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise UsageError(f"'ldm {name}' is not available yet in ldm-toolkit {__version__}")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Latent text-to-image diffusion toolkit: data, training, generation, guidance sweeps.",
    )
    parser.add_argument("--version", action="version", version=f"ldm-toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in SUBCOMMANDS.items():
        if name in _IMPLEMENTED:
            module = _IMPLEMENTED[name]
            p = sub.add_parser(name, help=summary, description=module.__doc__ or summary,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(p)
            run = module.run
        else:
            p = sub.add_parser(name, help=f"{summary} (not available yet)", description=f"{summary} (not available yet)")
            run = _not_available(name)
        p.set_defaults(run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in _IMPLEMENTED:
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
