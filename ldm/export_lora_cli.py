"""Export a LoRA in the kohya/A1111 key layout, which A1111, ComfyUI and diffusers read.

The source is a bundle written by `ldm finetune` (its pytorch_lora_weights.safetensors, or unet_lora/
in a bundle made before) or a LoRA file in diffusers' layout (unet.<module>.lora_A/lora_B.weight). The
output holds, for each U-Net module, lora_unet_<module path with _>.lora_down.weight (A, r x in),
.lora_up.weight (B, out x r) and .alpha: the update is (alpha / r) B A, the same as the source's.
Put it in A1111's models/Lora or ComfyUI's models/loras with the base model it was trained on.

examples:
  ldm export-lora runs/finetune/bundle --out my_style.safetensors
  ldm generate "koala, my style" --model sd15 --lora my_style.safetensors:0.8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.errors import UsageError

COMMAND = "ldm export-lora"
MARK = ("ldm-toolkit", "export-lora")  # a metadata entry of the files this command writes (so it may replace them)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, metavar="BUNDLE|LORA_FILE",
                   help="a bundle written by ldm finetune (lora.method=lora), or a LoRA .safetensors in diffusers' layout")
    p.add_argument("--out", type=Path, required=True,
                   help="the kohya/A1111 .safetensors to write (an earlier export there is replaced)")


def written_here(path: Path) -> bool:
    """A file this command wrote: a safetensors whose metadata carries ``MARK``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(MARK[0]) == MARK[1]
    except Exception:  # noqa: BLE001  (not safetensors at all: not ours)
        return False


def run(args: argparse.Namespace) -> int:
    from ldm.lora import read_lora, save_kohya
    from ldm_io import claim_output_file

    if args.out.suffix != ".safetensors":
        raise UsageError(f"--out {args.out} must be a .safetensors file name")
    claim_output_file(args.out, command=COMMAND, inputs=[args.source],
                      sealed=[args.source] if args.source.is_dir() else [], ours=written_here)
    lora = read_lora(args.source)
    save_kohya(lora, args.out, metadata=dict([MARK]))
    ranks = sorted({m.rank for m in lora.every_module})
    print(f"{args.out}: {len(lora.every_module)} modules, rank {'/'.join(map(str, ranks))}, kohya/A1111 layout "
          f"(from {lora.path})")
    return 0
