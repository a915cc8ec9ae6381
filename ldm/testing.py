"""Small models built from configs with random weights, for tests, benchmarks and smoke runs.

Nothing here downloads anything: the U-Nets and autoencoders come from diffusers configs, the
text encoders from open_clip / transformers configs, and the CLIP tokenizer from the BPE
vocabulary that open_clip ships.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

# name -> (U-Net block_out_channels, layers_per_block, text width, text layers, tokenizer merges)
SIZES = {
    "tiny": ((8, 16), 1, 16, 1, 200),
    "bench": ((64, 128, 256), 2, 256, 4, None),  # ~18M-parameter U-Net at 16x16x4 latents
}


def unet(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16, sample_size=8, seed=0):
    """A UNet2DConditionModel whose first blocks cross-attend and whose last block does not."""
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=min(8, block_out_channels[0] // 2),
        norm_num_groups=min(32, block_out_channels[0] // 2),
    ).eval()


def kl_autoencoder(seed=0, channels=(8, 16, 16), sample_size=32):
    """A Stable Diffusion-style AutoencoderKL with f = 2^(len(channels) - 1)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        norm_num_groups=min(32, channels[0] // 2), sample_size=sample_size, scaling_factor=0.5,
    ).eval()


def write_sd_folder_rest(folder: Path, num_merges: Optional[int] = None) -> None:
    """What a Stable Diffusion 1.x folder holds besides its three models: CLIP's tokenizer files, the DDIM
    scheduler config of SD 1.5 (with set_alpha_to_one: DDIM's last step lands on abar = 1, as ours does; SD 1.5's
    own config has False) and model_index.json, as diffusers' StableDiffusionPipeline loads them."""
    from diffusers import DDIMScheduler

    from conditioning.bpe import write_clip_tokenizer_files

    write_clip_tokenizer_files(folder / "tokenizer", num_merges=num_merges)
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=True,
                  steps_offset=1, clip_sample=False).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }, indent=2))


def build_sd_folder(folder: Path, size: str = "tiny") -> Path:
    """A Stable Diffusion 1.x-layout folder (UNet2DConditionModel, AutoencoderKL f=4, CLIPTextModel,
    CLIPTokenizer, DDIMScheduler) with random weights, which diffusers' StableDiffusionPipeline loads."""
    from transformers import CLIPTextConfig, CLIPTextModel

    channels, layers, width, text_layers, merges = SIZES[size]
    folder = Path(folder)
    sample_size = 16 if size == "bench" else 8
    unet(channels, layers, width, sample_size).save_pretrained(folder / "unet")
    kl_autoencoder(channels=(32, 64, 64) if size == "bench" else (8, 16, 16), sample_size=4 * sample_size).save_pretrained(folder / "vae")
    torch.manual_seed(0)
    vocab = 49408 if merges is None else 512 + merges + 2
    CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
                                 num_attention_heads=max(1, width // 64) if width >= 64 else 2,
                                 max_position_embeddings=77, vocab_size=vocab)).save_pretrained(folder / "text_encoder")
    write_sd_folder_rest(folder, num_merges=merges)
    return folder


def text_encoder(seed=0):
    """A tiny open_clip text encoder (width 16, one layer, 77 tokens) with random weights."""
    from conditioning import build_text_encoder

    torch.manual_seed(seed)
    return build_text_encoder({"backend": "open_clip", "model_cfg": {
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}})


def build_bundle(folder: Path) -> Path:
    """One of our bundles: a tiny VQ-VAE (f = 4), a tiny open_clip CLIP and a tiny U-Net, random weights."""
    from ldm.bundle import save_bundle
    from ldm.schedule import NoiseSchedule, SamplingConfig
    from vae import AutoencoderConfig, build_autoencoder

    torch.manual_seed(0)
    autoencoder = build_autoencoder(AutoencoderConfig(kind="vq", resolution=32, channels=8, channel_mult=[1, 2, 2],
                                                      layers_per_block=1, mid_attention=False, norm_num_groups=4,
                                                      num_embeddings=16, embed_dim=4))
    encoder = text_encoder(seed=0)
    return save_bundle(folder, unet=unet(cross_attention_dim=encoder.context_dim), autoencoder=autoencoder,
                       text_encoder=encoder, schedule=NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012),
                       sampling=SamplingConfig())
