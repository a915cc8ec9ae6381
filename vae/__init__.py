"""Autoencoders of the first stage: VQ-VAE, KL autoencoders, latent scaling.

    from vae import load_autoencoder
    ae = load_autoencoder("bundle/vae")          # VQModel or AutoencoderKL folder
    z = ae.encode(images)                        # (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) * scaling_factor
    x = ae.decode(z)                             # back to images in [-1, 1]
"""

from vae.autoencoder import Autoencoder, build_autoencoder, compute_scaling_factor, load_autoencoder
from vae.config import AutoencoderConfig, LossConfig, QuantizerConfig

__all__ = ["Autoencoder", "AutoencoderConfig", "LossConfig", "QuantizerConfig", "build_autoencoder",
           "compute_scaling_factor", "load_autoencoder"]
