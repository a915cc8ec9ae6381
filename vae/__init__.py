"""Autoencoders of the first stage: VQ-VAE, KL autoencoders, latent scaling."""
