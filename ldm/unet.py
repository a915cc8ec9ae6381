"""The cross-attention U-Net: a typed config and the one factory that builds diffusers'
``UNet2DConditionModel`` from it.

The config holds the architecture only. Three sizes come from the other parts of the model and are
passed to ``build_unet``: the latent channels (the autoencoder's), the latent size (image size / f)
and the context width (the text encoder's), so a config cannot disagree with the parts it is
trained with. Stable Diffusion 1.x is ``block_out_channels=(320, 640, 1280, 1280)``,
``layers_per_block=2``, ``attention_head_dim=8`` with a 768-wide context (859.5M parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class UNetConfig:
    """Architecture of the denoising U-Net (diffusers' UNet2DConditionModel argument names)."""

    block_out_channels: tuple[int, ...] = (64, 128, 256)  # channels at each resolution, finest first
    # one per resolution: CrossAttnDownBlock2D (ResNets + cross-attention) or DownBlock2D (ResNets only)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")  # coarsest first
    layers_per_block: int = 2  # ResNet blocks per resolution on the way down (one more on the way up)
    attention_head_dim: int = 8  # attention heads per block (diffusers' legacy name for the head count; SD 1.x: 8)
    transformer_layers_per_block: int = 1  # transformer blocks per cross-attention block
    norm_num_groups: int = 32  # GroupNorm groups; must divide every entry of block_out_channels
    # width of the text context; None = the text encoder's. A value that differs from the encoder's is an error.
    cross_attention_dim: Optional[int] = None

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        n = len(self.block_out_channels)
        if n < 1 or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={self.block_out_channels} must be positive channel counts")
        for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCKS),
                                     ("up_block_types", self.up_block_types, UP_BLOCKS)):
            if len(types) != n:
                raise ValueError(f"{name} has {len(types)} entries; it needs one per block_out_channels entry ({n})")
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{name} entry {bad[0]!r} is not supported; allowed values: {', '.join(allowed)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry; {bad[0]} is not divisible")
        for name in ("layers_per_block", "attention_head_dim", "transformer_layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def build_unet(config: UNetConfig, *, latent_channels: int, sample_size: int, cross_attention_dim: int):
    """A freshly initialised UNet2DConditionModel for latents (B, latent_channels, sample_size, sample_size)
    and contexts (B, L, cross_attention_dim). Initialisation draws from torch's global generator."""
    from diffusers import UNet2DConditionModel

    if config.cross_attention_dim is not None and config.cross_attention_dim != cross_attention_dim:
        raise ValueError(
            f"model.cross_attention_dim={config.cross_attention_dim} but the text encoder's context is "
            f"{cross_attention_dim} wide; set model.cross_attention_dim={cross_attention_dim} or null"
        )
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=config.block_out_channels,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        transformer_layers_per_block=config.transformer_layers_per_block,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
    )


class FP32AttentionProcessor:
    """diffusers' scaled-dot-product attention with the product softmax(QK^T/sqrt(d))V taken in float32.

    Under bf16 autocast on a CPU, torch's bf16 flash-attention kernels are slower than its float32
    ones (forward + backward of one attention at this project's shapes: 1.6-3.6x), while the
    projections around them still gain from bf16. So the projections run in the autocast dtype and
    only q, k, v are cast up for the product (bench/bench_train.py, 18M-parameter U-Net, batch 32:
    forward + backward 1.88 s with bf16 attention, 1.48 s with this, 2.02 s in float32). In float32 it computes what ``AttnProcessor2_0`` does.
    Attention blocks using features this does not implement (masks, group or spatial norms, q/k norms,
    a cross norm) are handed to ``AttnProcessor2_0``.
    """

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        unusual = (attention_mask is not None, attn.spatial_norm is not None, attn.group_norm is not None,
                   attn.norm_cross, attn.norm_q is not None, attn.norm_k is not None, bool(args), bool(kwargs))
        if any(unusual):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        x = hidden_states
        if x.ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            x = x.flatten(2).transpose(1, 2)
        context = x if encoder_hidden_states is None else encoder_hidden_states  # (B, L, D)
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)  # (B, N or L, heads * d)
        batch, heads = q.shape[0], attn.heads

        def split(t):  # (B, N, heads * d) -> (B, heads, N, d), float32
            return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2).float()

        with torch.autocast(q.device.type, enabled=False):
            out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scale)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, N, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if hidden_states.ndim == 4:
            out = out.transpose(1, 2).reshape(hidden_states.shape)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
