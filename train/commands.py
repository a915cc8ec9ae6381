"""The training subcommands of ``ldm``: a table that ``train`` owns and ``ldm.cli`` reads when
the command line is parsed, so that ``import ldm`` never imports ``train``.

name -> (module, one-line description). Each module has ``add_arguments(parser)`` and
``run(args) -> exit code`` and imports torch and friends inside ``run``, so ``--help`` stays instant.
"""

COMMANDS = {
    "data": ("train.data.cli", "build (emoji, shapes) or check a captioned image data set"),
    "train-vae": ("train.vae.cli", "train the autoencoder (VQ-VAE) from a YAML config"),
    "eval-vae": ("train.vae.eval_cli",
                 "evaluate an autoencoder on held-out images: PSNR, SSIM, codebook use; PNG of reconstructions"),
    "train-clip": ("train.clip.cli", "train a small CLIP text/image encoder from a YAML config"),
    "train": ("train.unet.cli", "train the latent diffusion U-Net from a YAML config"),
    "finetune": ("train.unet.finetune_cli", "fine-tune a model bundle on your own captioned images"),
    "pack": ("train.unet.pack_cli",
             "pack a trained bundle for shipping: fp16 weights, token table cut to the training vocabulary"),
}
