"""Write a model bundle as one Stable Diffusion single-file checkpoint (.safetensors, the original
LDM/CompVis key layout) that AUTOMATIC1111, ComfyUI and diffusers' from_single_file read.

The bundle needs a KL autoencoder (AutoencoderKL) and a transformers CLIP text encoder (CLIPTextModel),
as a Stable Diffusion folder has: OpenAI CLIP (quick_gelu) is written in SD 1's layout, OpenCLIP-style
(gelu) in SD 2's. A LoRA in the bundle (unet_lora/) is fused into the U-Net's weights. What the tensors'
shapes cannot tell a reader (heads, groups, scaling factor, schedule) goes into the file's metadata, which
`ldm generate --model FILE` reads back; other tools use Stable Diffusion's own values for them.

examples:
  ldm export-single-file my-sd-bundle --out my-model.safetensors
  ldm export-single-file my-sd-bundle --out my-model-fp16.safetensors --half
  ldm generate "a koala" --model my-model.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="model bundle folder (AutoencoderKL + transformers CLIPTextModel)")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the size; not bit-exact)")


def run(args: argparse.Namespace) -> int:
    import sys

    from ldm.generate_cli import model_path
    from ldm.single_file import export_single_file, written_by_export
    from ldm_io import claim_output_file

    if args.out.suffix.lower() != ".safetensors":
        raise UsageError(f"--out {args.out} must be a .safetensors file name")
    claim_output_file(args.out, command="ldm export-single-file", inputs=[args.bundle], ours=written_by_export)
    bundle = model_path(args.bundle)
    out = export_single_file(bundle, args.out, half=args.half, progress=lambda what: print(f"{what} ...", file=sys.stderr))
    print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0
