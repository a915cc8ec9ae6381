"""Latent text-to-image diffusion: schedule maths, samplers, guidance, pipeline, CLI."""

__version__ = "0.1.0"
