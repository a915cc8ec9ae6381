"""Fine-tune a model bundle (ours, or a Stable Diffusion folder in diffusers layout) on your own
captioned images.

By default LoRA adapters (rank lora.rank) are trained on the U-Net's attention projections and
saved in the output bundle's pytorch_lora_weights.safetensors (diffusers' layout: diffusers'
load_lora_weights reads it; `ldm export-lora` writes it for A1111/ComfyUI) beside the base weights,
copied as the base stores them; lora.method=full trains every U-Net weight instead. Caption words the text encoder does not know (a packed bundle keeps only
its own captions' tokens) are listed at the start and get their own learned token rows
(text.train=new_words; frozen or full are the other choices). The data folder is an imagefolder
(images + metadata.jsonl with file_name and text). Output: runs/finetune/ (train.output_dir):
checkpoints/step-NNNNNNNN/, logs/ (val.csv: held-out loss, clip_score of the validation prompts and
base_clip_score of the base model's own prompts, from step 0), samples/step-NNNNNNNN.png (validation
prompts drawn from your held-out captions plus two of the base model's), bundle/. Settings are
FinetuneConfig's fields (train/unet/config.py, each default with the measurement that chose it), set
with --config YAML and/or key=value.

Images of mixed aspect ratios are trained in aspect-ratio buckets (sides multiples of the model's
granularity, about data.resolution^2 pixels; each batch from one bucket; the data summary reports
what is cropped); data.buckets.enabled=false turns that off (every image centre-cropped square),
data.buckets.sizes=[512x768,768x512,512x512] gives the buckets (WIDTHxHEIGHT) yourself.

Prior preservation (DreamBooth's class images, sd-scripts' regularisation images): prior.data=DIR, an
imagefolder of what the base model should keep drawing (its own training images, or its samples) with
their captions; prior.share of every batch (default 0.25) comes from it, its loss weighted by prior.weight.

examples:
  ldm finetune --model default --data my_images
  ldm finetune --model default --data my_images train.output_dir=runs/ft-mine train.max_steps=600
  ldm finetune --model sd-v1-5 --data my_images lora.rank=16 train.mixed_precision=bf16 data.resolution=512
  ldm finetune --model runs/ldm/bundle --data my_images lora.method=full optim.lr=1e-5
  ldm finetune --model sd-v1-5 --data my_photos data.buckets.enabled=false
  ldm generate "my prompt" --model runs/finetune/bundle
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.run.cli import add_run_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR|default|shapes",
                   help="bundle folder to start from, or a packaged model's name (default, shapes)")
    p.add_argument("--data", type=Path, required=True, help="captioned image folder (metadata.jsonl)")
    p.add_argument("--config", type=Path, default=None, help="YAML with FinetuneConfig sections (default: built-in defaults)")
    add_run_arguments(p, None, "lora.rank=16 optim.lr=1e-4 text.train=frozen")


def run(args: argparse.Namespace) -> int:
    from ldm.generate_cli import model_path
    from train.run.config import load_config
    from train.run.start import claim_run_folder
    from train.unet.finetune import finetune
    from train.unet.config import FinetuneConfig
    from train.unet.cli import report

    if args.config is not None and not args.config.is_file():
        raise FileNotFoundError(f"--config {args.config} does not exist")
    config = load_config(FinetuneConfig, args.config, [*args.overrides, f"data.path={args.data}"])
    model = model_path(Path(args.model))  # the packaged models by name, as `ldm generate` takes them
    claim_run_folder(config.train.output_dir, args.resume, command="ldm finetune", overwrite=args.overwrite,
                     inputs=[config.data.path, config.cache.dir], models=[model])
    return report("ldm finetune", lambda: finetune(model, config, resume=args.resume))
