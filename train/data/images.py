"""Decoding any image to RGB (``ldm.images``, re-exported here), and the training transform (resize, crop,
optional flip, to [-1, 1]).

``decode_image`` opens a path or bytes, loads every pixel and converts to RGB with ``to_rgb``
(transparency on white, EXIF rotation, 16-bit greyscale, first frame of an animation); images over
``MAX_PIXELS`` are refused from their header. They live in ``ldm.images`` so that ``ldm`` (reference
sets for ``ldm.fidelity``) reads images exactly as training does without importing ``train``.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from ldm.images import MAX_PIXELS, TOO_LARGE, VECTOR, ImageError, decode_image, to_rgb

__all__ = ["CROPS", "MAX_PIXELS", "TOO_LARGE", "VECTOR", "ImageError", "ImageTransform", "decode_image", "to_rgb"]

CROPS = ("center", "random")


class ImageTransform:
    """PIL RGB image -> float tensor (3, H, W) in [-1, 1].

    Args:
        size: output side (int) or (height, width); None keeps the image's own size.
        crop: "center" or "random": after scaling the shorter side to fit, which window to keep.
        hflip: flip left-right with probability 1/2. Off by default: it breaks "left"/"right" captions.
        generator: torch generator for the random crop and flip (the global one if None; DataLoader
            workers seed theirs differently).
    """

    def __init__(self, size: Union[int, tuple[int, int], None] = None, crop: str = "center", hflip: bool = False,
                 generator: Optional[torch.Generator] = None):
        if crop not in CROPS:
            raise ValueError(f"crop={crop!r}; allowed: {', '.join(CROPS)}")
        if isinstance(size, int):
            size = (size, size)
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"size={size!r}; give a positive int or (height, width)")
        self.size = size
        self.crop = crop
        self.hflip = bool(hflip)
        self.generator = generator

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator)) if high > 1 else 0

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Scale so the image covers ``size`` (bicubic, antialiased), then crop to it; flip if asked."""
        if self.size is not None:
            height, width = self.size
            scale = max(height / image.height, width / image.width)
            new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            if new != image.size:
                image = image.resize(new, Image.BICUBIC)
            if self.crop == "center":
                left, top = (image.width - width) // 2, (image.height - height) // 2
            else:
                left, top = self._randint(image.width - width + 1), self._randint(image.height - height + 1)
            if (left, top, width, height) != (0, 0, image.width, image.height):
                image = image.crop((left, top, left + width, top + height))
        if self.hflip and self._randint(2):
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.array(self.resize_crop(image), dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W) in [-1, 1]

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, crop={self.crop!r}, hflip={self.hflip})"

