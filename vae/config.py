"""Typed configs of the first stage: the autoencoder's architecture, its quantiser's training, its losses.

Each dataclass is one YAML section (``model:``, ``quantizer:``, ``loss:`` in ``configs/vae/*.yaml``).
The architecture follows CompVis' ``ddconfig`` (``ch``, ``ch_mult``, ``num_res_blocks``, ``z_channels``,
``n_embed``, ``embed_dim``) and is mapped onto diffusers' ``VQModel`` / ``AutoencoderKL`` by
``AutoencoderConfig.diffusers_kwargs`` so that every folder we save loads with diffusers too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

KINDS = ("vq", "kl")
CODEBOOK_UPDATES = ("ema", "loss")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``name`` and the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass
class AutoencoderConfig:
    """Architecture of the autoencoder (CompVis ddconfig names in brackets)."""

    kind: str = "vq"  # "vq" (diffusers VQModel) or "kl" (diffusers AutoencoderKL)
    resolution: int = 64  # training image size in pixels (diffusers sample_size)
    in_channels: int = 3  # image channels
    channels: int = 64  # base channel count [ch]
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # per level [ch_mult]; f = 2 ** (len - 1)
    layers_per_block: int = 2  # resnet blocks per encoder level; the decoder has one more [num_res_blocks]
    attention_levels: list[int] = field(default_factory=list)  # levels (0 = full size) with self-attention
    mid_attention: bool = True  # self-attention in the middle block, as in LDM
    norm_num_groups: int = 32  # GroupNorm groups; must divide every level's channel count
    latent_channels: int = 4  # channels of the latent the diffusion model sees [z_channels]
    num_embeddings: int = 512  # VQ: codebook size [n_embed]
    embed_dim: int = 4  # VQ: code dimension [embed_dim]
    scaling_factor: float = 1.0  # latent scale (1 / std of latents); set after training
    resize_input: bool = False  # resize images whose sides are not multiples of f instead of raising

    def __post_init__(self) -> None:
        check_choice("model.kind", self.kind, KINDS)
        if not self.channel_mult:
            raise ValueError("model.channel_mult must have at least one level")
        for level in self.attention_levels:
            if not 0 <= level < len(self.channel_mult):
                raise ValueError(f"model.attention_levels: level {level} is not in 0..{len(self.channel_mult) - 1}")
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(f"model.norm_num_groups={self.norm_num_groups} does not divide channel count {width}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"model.resolution={self.resolution} is not a multiple of f={self.downsample_factor}")
        if self.scaling_factor <= 0:
            raise ValueError(f"model.scaling_factor must be > 0; got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def block_out_channels(self) -> list[int]:
        return [self.channels * m for m in self.channel_mult]

    def diffusers_kwargs(self) -> dict:
        """Constructor arguments of diffusers' VQModel (kind "vq") or AutoencoderKL (kind "kl")."""
        levels = range(len(self.channel_mult))
        down = ["AttnDownEncoderBlock2D" if i in self.attention_levels else "DownEncoderBlock2D" for i in levels]
        # The decoder's up blocks run from the smallest level to the largest.
        up = ["AttnUpDecoderBlock2D" if i in self.attention_levels else "UpDecoderBlock2D" for i in reversed(levels)]
        kwargs = dict(
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            sample_size=self.resolution,
            norm_num_groups=self.norm_num_groups,
            scaling_factor=self.scaling_factor,
            mid_block_add_attention=self.mid_attention,
        )
        if self.kind == "vq":
            kwargs.update(num_vq_embeddings=self.num_embeddings, vq_embed_dim=self.embed_dim)
        return kwargs


@dataclass
class QuantizerConfig:
    """How the VQ codebook learns and stays healthy (ignored for kind "kl")."""

    beta: float = 0.25  # commitment loss weight: beta * ||z - sg[e]||^2 (VQ-VAE paper)
    update: str = "ema"  # "ema": codebook = EMA of assigned encoder outputs; "loss": learnt by ||sg[z] - e||^2
    ema_decay: float = 0.99  # EMA decay of code counts and sums (update "ema")
    kmeans_init: bool = True  # initialise the codebook by k-means on the first batch's encoder outputs
    kmeans_iters: int = 10  # Lloyd iterations of that k-means
    dead_code_threshold: float = 1.0  # restart codes whose EMA count of assignments per step falls below this; 0: never
    usage_window: int = 100  # steps over which codebook usage (fraction of codes hit) is counted for the log

    def __post_init__(self) -> None:
        check_choice("quantizer.update", self.update, CODEBOOK_UPDATES)
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"quantizer.ema_decay must be in (0, 1); got {self.ema_decay}")
        if self.beta < 0 or self.dead_code_threshold < 0:
            raise ValueError("quantizer.beta and quantizer.dead_code_threshold must be >= 0")


@dataclass
class LossConfig:
    """Weights of the autoencoder's training losses (VQGAN's VQLPIPSWithDiscriminator, made optional)."""

    l1_weight: float = 1.0  # mean |x - x_rec|
    l2_weight: float = 1.0  # mean (x - x_rec)^2
    codebook_weight: float = 1.0  # weight of codebook + commitment losses (VQ)
    kl_weight: float = 1.0e-6  # weight of KL(q(z|x) || N(0, I)) (KL autoencoders)
    lpips_weights: Optional[str] = None  # local file of LPIPS(vgg) linear layers (lpips/weights/v0.1/vgg.pth); None: off
    vgg_weights: Optional[str] = None  # local file of torchvision vgg16 weights (features.N.*); None: no LPIPS
    lpips_weight: float = 1.0  # weight of the LPIPS term when enabled
    disc_weight: float = 0.0  # weight of the PatchGAN hinge loss; 0: no discriminator
    disc_start: int = 10000  # step at which the discriminator and its loss switch on
    disc_layers: int = 3  # PatchGAN depth (n_layers)
    disc_channels: int = 64  # PatchGAN base width (ndf)
    disc_lr: float = 1.0e-4  # discriminator learning rate
    adaptive_weight: bool = True  # scale the GAN loss by ||grad rec|| / ||grad gan|| at the decoder's last layer

    def __post_init__(self) -> None:
        if (self.lpips_weights is None) != (self.vgg_weights is None):
            raise ValueError("loss.lpips_weights and loss.vgg_weights must be given together (or neither)")
        if self.l1_weight < 0 or self.l2_weight < 0 or self.l1_weight + self.l2_weight == 0:
            raise ValueError("loss.l1_weight and loss.l2_weight must be >= 0 and not both 0")
