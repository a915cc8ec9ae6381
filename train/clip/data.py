"""Captioned image pairs for CLIP training, held in memory: loading and the held-out split through ``train.data``, augmentation.

Images come from ``train.data.load_captioned_images`` (every supported layout;
bad rows skipped and counted, summary printed), resized and centre-cropped once
to the tower's input size and kept as uint8. The held-out rows are those of
``train.data.split`` (the data set's ``test`` split, else ``data.holdout_fraction``
of the rows by a hash of each image's path), the same rows the VAE and the U-Net
of this data set hold out. Where an image has several captions,
training draws one per epoch (``train.data``'s draw); evaluation uses the first.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from train.clip.config import ClipDataConfig, ClipTrainConfig
from train.data import CaptionedImages
from train.data import load_split


class PairSet:
    """Images (N, 3, S, S) uint8 in memory, their captions, and the token ids of every caption. Rows whose
    image changed on disk since the scan are left out (``CaptionedImages.read_rows``: counted in the summary)."""

    def __init__(self, data: Optional[CaptionedImages], rows: Sequence[int], size: int,
                 tokenize: Callable[[list[str]], torch.Tensor]):
        read = list(data.read_rows(rows, data.transform.resize_crop)) if data is not None else []
        self.data, self.rows = data, [i for i, _ in read]
        self.captions = [data.captions(i) for i in self.rows] if data is not None else []  # per image, all captions
        pixels = [np.asarray(image, dtype=np.uint8) for _, image in read]
        self.images = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous() if pixels
                       else torch.zeros(0, 3, size, size, dtype=torch.uint8))  # (N, 3, S, S)
        distinct = sorted({c for options in self.captions for c in options})
        self._token_row = {c: i for i, c in enumerate(distinct)}
        self._tokens = tokenize(distinct) if distinct else torch.zeros(0, 77, dtype=torch.long)  # (U, L)

    def __len__(self) -> int:
        return len(self.rows)

    def first_captions(self) -> list[str]:
        return [options[0] for options in self.captions]

    def tokens(self, index: torch.Tensor, epoch: Optional[int] = None) -> torch.Tensor:
        """Token ids (B, L) of images ``index``: each one's caption for ``epoch``, or its first one."""
        captions = [self.captions[i][0] if epoch is None else self.data.caption(self.rows[i], epoch) for i in index.tolist()]
        return self._tokens[[self._token_row[c] for c in captions]]


def load_pair_sets(config: ClipTrainConfig, tokenize: Callable[[list[str]], torch.Tensor],
                   progress: bool = True, log: Callable[[str], None] = print) -> tuple[PairSet, PairSet]:
    """(train, held-out) pairs of ``config.data.path`` at the image tower's size, split by
    ``train.data.split`` (the rows every trainer of this data set holds out)."""
    data, size = config.data, config.model.vision.image_size
    split = load_split(data.path, data.holdout_fraction, size=size, crop="center", seed=config.train.seed, progress=progress,
                       allow_outside_paths=data.allow_outside_paths)
    train_rows = split.train_rows[: data.max_images] if data.max_images else split.train_rows
    train, heldout = PairSet(split.train, train_rows, size, tokenize), PairSet(split.heldout, split.heldout_rows, size, tokenize)
    log(split.summary())
    if len(train) < config.train.batch_size:
        raise ValueError(f"{len(train)} training pairs in {data.path}, fewer than train.batch_size={config.train.batch_size}")
    return train, heldout


def augment(images: torch.Tensor, config: ClipDataConfig, generator: torch.Generator) -> torch.Tensor:
    """Random resized crops and flips of a float batch (B, 3, S, S)."""
    batch, _, size, _ = images.shape
    if config.min_crop_scale < 1:
        out = torch.empty_like(images)
        for i in range(batch):
            scale = config.min_crop_scale + (1 - config.min_crop_scale) * torch.rand((), generator=generator).item()
            side = max(1, round(size * math.sqrt(scale)))
            top = int(torch.randint(0, size - side + 1, (), generator=generator))
            left = int(torch.randint(0, size - side + 1, (), generator=generator))
            crop = images[i : i + 1, :, top : top + side, left : left + side]  # (1, 3, side, side)
            out[i : i + 1] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images = out
    if config.flip:
        flip = torch.rand(batch, generator=generator) < 0.5  # (B,)
        images = torch.where(flip.view(batch, 1, 1, 1), images.flip(-1), images)
    return images
