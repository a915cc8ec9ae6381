"""Decoding any image to RGB, and the training transform (resize, crop, optional flip, to [-1, 1]).

``decode_image`` opens a path or bytes, loads every pixel (so truncated files fail here, not in a
training step) and converts to RGB with ``to_rgb``: EXIF rotation applied; RGBA, LA, PA and
palette or greyscale images with a transparent colour composited on white; 16-bit greyscale
(I;16) scaled by 1/257; CMYK, L, 1, P and the rest through Pillow's conversion; an animated image
gives its first frame.

An image of more than ``MAX_PIXELS`` (8192 x 8192) pixels is refused from its header, before any
pixel is decompressed (a "decompression bomb" declares a huge size over a few bytes): this one limit
replaces Pillow's own ``Image.MAX_IMAGE_PIXELS`` check, which lets images up to 89 MP decode and
only warns up to 179 MP.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

CROPS = ("center", "random")
MAX_PIXELS = 8192 * 8192  # larger images are skipped unread (64 megapixels: ~200 MB as RGB)

# skip reasons (the data summary's labels)
TOO_LARGE = "too large (over 8192x8192 pixels)"
VECTOR = "vector image (SVG)"


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is the short label the data summary counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB; transparency composited on white."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block leaves the image as stored
        pass
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        if mode.startswith("I;16") or values.max() > 255:
            values = values / 257.0  # 16-bit range
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if "A" in mode or "a" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _is_svg(head: bytes) -> bool:
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head)


def decode_image(source: Union[str, Path, bytes, None], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully load an image from a path or bytes, as RGB; raises ``ImageError`` with the reason.
    Images of more than ``max_pixels`` pixels are refused before their pixels are read."""
    if source is None:
        raise ImageError("missing image", "the row names no image")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError("missing file", str(path))
        if path.stat().st_size == 0:
            raise ImageError("empty file", str(path))
        opener = path
    else:
        if len(source) == 0:
            raise ImageError("empty file", "zero bytes")
        opener = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides, below
            with Image.open(opener) as image:
                if image.width * image.height > max_pixels:
                    raise ImageError(TOO_LARGE, f"{image.width}x{image.height} pixels")
                image.load()  # the first frame of an animation
                return to_rgb(image)
    except ImageError:
        raise
    except Image.UnidentifiedImageError as exc:
        head = source[:1024] if isinstance(source, bytes) else _head(opener)
        if _is_svg(head):
            raise ImageError(VECTOR, "rasterise it (e.g. to PNG) to train on it") from None
        raise ImageError("not an image", str(exc)) from None
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused inside Image.open
        raise ImageError(TOO_LARGE, str(exc)) from None
    except Exception as exc:  # OSError "image file is truncated", SyntaxError, ValueError from broken chunks
        raise ImageError("truncated or corrupt", f"{type(exc).__name__}: {exc}") from None


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1024)
    except OSError:
        return b""


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

