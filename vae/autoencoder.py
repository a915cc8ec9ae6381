"""One interface over diffusers' VQModel and AutoencoderKL: images in [-1, 1] <-> scaled latents.

``encode`` returns latents already multiplied by ``scaling_factor`` (for VQ the pre-quantisation latents
LDM trains on; for KL the posterior mean, or a sample when ``sample_posterior``), and ``decode`` divides
by it (VQ quantises there, as diffusers' ``VQModel.decode`` does). When the config has a
``shift_factor`` (SD3/Flux-style KL autoencoders) latents are ``(z - shift) * scale``, as diffusers does.
The pipeline and the U-Net trainer only ever see this class; which kind sits behind it is ``kind``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm_io import atomic_directory
from vae.config import AutoencoderConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_TO_KIND = {"VQModel": "vq", "AutoencoderKL": "kl"}


def _diffusers_class(kind: str) -> type:
    from diffusers import AutoencoderKL, VQModel

    return {"vq": VQModel, "kl": AutoencoderKL}[kind]


class Autoencoder(nn.Module):
    """A diffusers VQModel or AutoencoderKL behind one encode/decode interface (see module docstring)."""

    def __init__(self, model: nn.Module, sample_posterior: bool = False, resize_input: bool = False) -> None:
        super().__init__()
        name = type(model).__name__
        if name not in CLASS_TO_KIND:
            raise ValueError(f"autoencoder model must be one of {', '.join(CLASS_TO_KIND)}; got {name}")
        self.model = model
        self.kind = CLASS_TO_KIND[name]
        self.sample_posterior = sample_posterior
        self.resize_input = resize_input

    # --- what the rest of the project reads -------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of ``encode``'s output: the code dimension for VQ (after quant_conv), z channels for KL."""
        if self.kind == "vq":
            return int(self.model.config.vq_embed_dim or self.model.config.latent_channels)
        return int(self.model.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.model.config, "shift_factor", None) or 0.0)

    @property
    def num_embeddings(self) -> Optional[int]:
        return int(self.model.config.num_vq_embeddings) if self.kind == "vq" else None

    def set_scaling_factor(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"scaling_factor must be > 0; got {value}")
        self.model.register_to_config(scaling_factor=float(value))

    # --- images <-> latents ---------------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) whose sides are multiples of f, resized down to them if ``resize_input``."""
        if images.ndim != 4 or images.shape[1] != self.model.config.in_channels:
            raise ValueError(f"images must be (B, {self.model.config.in_channels}, H, W); got {tuple(images.shape)}")
        f = self.downsample_factor
        h, w = images.shape[-2:]
        if h % f or w % f:
            if not self.resize_input:
                raise ValueError(
                    f"image size {h}x{w} is not divisible by the autoencoder's downsampling factor f={f}; "
                    f"use sizes that are multiples of {f} (e.g. {max(f, h // f * f)}x{max(f, w // f * f)}) "
                    "or set model.resize_input: true")
            size = (max(f, round(h / f) * f), max(f, round(w / f) * f))
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        return images

    def encode_unscaled(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                        sample: Optional[bool] = None) -> torch.Tensor:
        """Latents before scaling: VQ pre-quantisation h, or the KL posterior's mean (or a sample)."""
        images = self.check_images(images)  # (B, 3, H, W)
        if self.kind == "vq":
            return self.model.encode(images).latents  # (B, C, H/f, W/f)
        posterior = self.model.encode(images).latent_dist
        sample = self.sample_posterior if sample is None else sample
        return posterior.sample(generator=generator) if sample else posterior.mode()  # (B, C, H/f, W/f)

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
               sample: Optional[bool] = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f) times ``scaling_factor``."""
        return (self.encode_unscaled(images, generator, sample) - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f), about [-1, 1] (not clamped)."""
        z = latents / self.scaling_factor + self.shift_factor  # (B, C, h, w)
        return self.model.decode(z).sample  # (B, 3, h*f, w*f)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(images))."""
        return self.decode(self.encode(images))

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(decode(encode(images)) (B, 3, H, W), chosen codes (B, h, w) for VQ or None for KL)."""
        z = self.encode(images)  # (B, C, h, w)
        codes = None
        if self.kind == "vq":
            from vae.vq import nearest_codes

            h = z / self.scaling_factor + self.shift_factor  # (B, C, h, w)
            b, c, hh, ww = h.shape
            codes = nearest_codes(h.permute(0, 2, 3, 1).reshape(-1, c), self.model.quantize.embedding.weight)
            codes = codes.view(b, hh, ww)  # (B, h, w)
        return self.decode(z), codes

    # --- disk -------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Write ``folder`` (config.json + diffusion_pytorch_model.safetensors) atomically: a sibling
        temporary folder is filled and renamed into place, so a reader never sees half a folder."""
        with atomic_directory(folder) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
        return Path(folder)


def build_autoencoder(config: AutoencoderConfig, sample_posterior: bool = False) -> Autoencoder:
    """A freshly initialised autoencoder of the architecture ``config`` describes."""
    model = _diffusers_class(config.kind)(**config.diffusers_kwargs())
    return Autoencoder(model, sample_posterior=sample_posterior, resize_input=config.resize_input)


def load_autoencoder(path: Union[str, Path], sample_posterior: bool = False, resize_input: bool = False,
                     device: Union[str, torch.device, None] = None) -> Autoencoder:
    """Load a diffusers-layout autoencoder folder (a bundle's ``vae/``): VQModel or AutoencoderKL.

    Weights are found and checked by ``ldm_io.weights.find_weights`` (safetensors; only an fp16 variant,
    ``diffusion_pytorch_model.fp16.safetensors``, loaded into float32; or ``.bin`` read with
    ``torch.load(weights_only=True)``), then matched key by key and shape by shape against the architecture
    config.json describes; a missing or corrupt file or a mismatch raises an error naming the file and what
    was expected.
    """
    from safetensors.torch import load_file

    from ldm_io.weights import find_weights, refused_pickle

    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: an autoencoder folder needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} (diffusers layout, _class_name VQModel or AutoencoderKL)")
    config = json.loads(config_file.read_text())
    name = config.get("_class_name")
    if name not in CLASS_TO_KIND:
        raise ValueError(f"{config_file}: _class_name must be one of {', '.join(CLASS_TO_KIND)}; got {name!r}")
    weights = find_weights(path, WEIGHTS_NAME.removesuffix(".safetensors"))
    weights_file = weights.files[0] if len(weights.files) == 1 else path
    model = _diffusers_class(CLASS_TO_KIND[name]).from_config(config)
    state = {}
    for f in weights.files:
        if weights.safetensors:
            state.update(load_file(f, device=str(device or "cpu")))
            continue
        try:
            state.update(torch.load(f, map_location=device or "cpu", weights_only=True))
        except (RuntimeError, pickle.UnpicklingError) as exc:
            raise refused_pickle(f, exc) from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match the {name} described by {config_file}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{weights_file}: {key} has shape {tuple(tensor.shape)} but {config_file} "
                             f"expects {tuple(expected[key].shape)}")
    model.load_state_dict(state)
    if device is not None:
        model.to(device)
    return Autoencoder(model.eval(), sample_posterior=sample_posterior, resize_input=resize_input)


@torch.no_grad()
def compute_scaling_factor(autoencoder: Autoencoder, images: Iterable[torch.Tensor], max_images: int = 1024) -> float:
    """1 / std of the unscaled latents (minus shift) over up to ``max_images`` images, stored into the
    autoencoder's config as ``scaling_factor`` (LDM section 4.3.2 / D.1; diffusers' convention). ``images``
    yields batches (B, 3, H, W) in [-1, 1]. Returns the factor."""
    seen, count, s1, s2 = 0, 0, 0.0, 0.0
    device = next(autoencoder.parameters()).device
    for batch in images:
        batch = batch[: max_images - seen]  # (b, 3, H, W)
        z = autoencoder.encode_unscaled(batch.to(device)).double() - autoencoder.shift_factor  # (b, C, h, w)
        seen += batch.shape[0]
        count += z.numel()
        s1 += z.sum().item()
        s2 += z.square().sum().item()
        if seen >= max_images:
            break
    if count == 0:
        raise ValueError("compute_scaling_factor got no images")
    var = (s2 - s1 * s1 / count) / max(count - 1, 1)
    if not var > 0:
        raise ValueError(f"latents have zero variance over {count} values; cannot compute a scaling factor")
    factor = 1.0 / var ** 0.5
    autoencoder.set_scaling_factor(factor)
    return factor
