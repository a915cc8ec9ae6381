"""Stage 1: the autoencoder (``ldm train-vae``, ``ldm eval-vae``)."""
