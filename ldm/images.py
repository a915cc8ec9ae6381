"""Decoding any image file to RGB: the one reader of training data and of reference sets (``ldm.fidelity``).

``decode_image`` opens a path or bytes, loads every pixel (so truncated files fail here, not in a
training step) and converts to RGB with ``to_rgb``: EXIF rotation applied; RGBA, LA, PA and
palette or greyscale images with a transparent colour composited on white; 16-bit greyscale
(I;16) scaled by 1/257; CMYK, L, 1, P and the rest through Pillow's conversion; an animated image
gives its first frame.

An image of more than ``MAX_PIXELS`` (8192 x 8192) pixels is refused from its header, before any
pixel is decompressed (a "decompression bomb" declares a huge size over a few bytes): this one limit
replaces Pillow's own ``Image.MAX_IMAGE_PIXELS`` check, which lets images up to 89 MP decode and
only warns up to 179 MP.

(Moved here from ``train.data.images``, which re-exports it, so that ``ldm`` can read images without
importing ``train``.)
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["MAX_PIXELS", "TOO_LARGE", "VECTOR", "ImageError", "decode_image", "to_rgb"]

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
