"""Stage 2: the latent diffusion U-Net (``ldm train``, ``ldm finetune``, ``ldm pack``)."""
