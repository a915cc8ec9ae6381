"""Fine-tuning a bundle (ours, or a Stable Diffusion folder in diffusers layout) on new captioned images.

    result = finetune("path/to/bundle", config)      # config: FinetuneConfig, config.data.path set

Two methods (``lora.method``):

* ``lora`` (default): the U-Net is frozen and peft LoRA adapters of rank r are trained on its
  attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), W + (alpha / r) B A with
  B = 0 at the start, so step 0 is the base model. The output bundle keeps the base U-Net in
  ``unet/`` as the base stores it and the adapter in ``pytorch_lora_weights.safetensors`` (diffusers'
  layout, ``ldm.lora``); ``Text2ImagePipeline.from_pretrained`` merges it.
* ``full``: every U-Net weight is trained; the bundle's ``unet/`` holds the new (EMA) weights.

The autoencoder, the text encoder and the noise schedule are the bundle's, frozen and unchanged.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import conditioning
from train.unet.config import FinetuneConfig
from train.unet.trainer import LDMTrainer, TrainResult


def add_lora(unet, config) -> None:
    """Freeze ``unet`` and give it a trainable LoRA adapter on ``config.target_modules``."""
    from peft import LoraConfig

    if config.rank < 1:
        raise ValueError(f"lora.rank={config.rank} must be >= 1")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                target_modules=list(config.target_modules), init_lora_weights=True))


def finetune(model: str | Path, config: FinetuneConfig, *, resume: Optional[str] = None,
             stop_at_step: Optional[int] = None) -> TrainResult:
    import vae
    from ldm.bundle import check_bundle, load_schedule, load_unet

    root = check_bundle(model)
    schedule, sampling = load_schedule(root)
    if config.objective.prediction is not None and config.objective.prediction != sampling.prediction:
        raise ValueError(
            f"objective.prediction={config.objective.prediction} but the model at {root} predicts {sampling.prediction}; "
            "leave objective.prediction null to keep the model's"
        )
    if sampling.prediction not in ("eps", "v"):
        raise ValueError(f"the model at {root} predicts {sampling.prediction!r}; fine-tuning supports eps and v models")
    unet = load_unet(root)
    autoencoder = vae.load_autoencoder(root / "vae")
    text_encoder = conditioning.load_text_encoder(root)
    native = int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
    if config.data.resolution == 0:
        config.data.resolution = native * autoencoder.downsample_factor
    base_unet = None
    if config.lora.method == "lora":
        base_unet = copy.deepcopy(unet)
        add_lora(unet, config.lora)
    else:
        unet.requires_grad_(True)
    trainer = LDMTrainer(config, unet=unet, autoencoder=autoencoder, text_encoder=text_encoder, schedule=schedule,
                         sampling=sampling, output_dir=config.train.output_dir, lora=config.lora.method == "lora",
                         base_unet=base_unet, base=root)
    return trainer.fit(resume=resume, stop_at_step=stop_at_step)
