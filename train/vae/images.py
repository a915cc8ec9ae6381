"""The autoencoder's images, read through ``train.data`` and held in memory as uint8.

``load_vae_split`` cuts a data set by the one held-out rule (``train.data.split``): the trainer reads
its training rows, ``ldm eval-vae`` its held-out rows, so the VAE, the CLIP model and the U-Net of one
data set hold out the same images. ``pixels`` decodes rows once into a (N, 3, H, W) uint8 tensor:
RGB, with transparency composited onto white (``train.data.images.to_rgb``); a row whose image changed
on disk since the scan is left out and counted in the data summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from train.data.captioned import CaptionedImages
from train.data import Split, load_split


def load_vae_split(path: Union[str, Path], holdout_fraction: float, size: Optional[int] = None,
                   progress: bool = True, allow_outside_paths: bool = False) -> Split:
    """``path`` split into training and held-out rows; ``size`` resizes (and centre-crops) every image to
    size x size, None keeps each image's own size. Images of any size are kept (no minimum side).
    ``allow_outside_paths``: read images outside the data set's folder (``train.data.sources``)."""
    if not str(path):
        raise ValueError("data.path is empty; give the data set to train on, e.g. data.path=data/emoji "
                         "(made by `ldm data emoji --out data/emoji`)")
    return load_split(path, holdout_fraction, size=size, min_size=1, progress=progress,
                      allow_outside_paths=allow_outside_paths)


def pixels(data: CaptionedImages, rows: Sequence[int]) -> torch.Tensor:
    """Rows ``rows`` of ``data`` decoded once, resized and cropped by its transform: uint8 (N, 3, H, W).
    Rows whose image no longer decodes are left out (``CaptionedImages.read_rows``: counted in the summary)."""
    arrays = [np.asarray(image, dtype=np.uint8) for _, image in data.read_rows(rows, data.transform.resize_crop)]
    if not arrays:  # (H, W, 3) each
        raise ValueError(f"{data.summary().path}: no images to read; see `ldm data check {data.summary().path}`")
    shapes = sorted({a.shape[:2] for a in arrays})
    if len(shapes) > 1:
        raise ValueError(f"images in {data.summary().path} have different sizes {shapes[:4]}; "
                         "set model.resize_input: true to resize them to model.resolution")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0
