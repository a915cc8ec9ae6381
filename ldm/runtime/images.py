"""Images for output, torch-free: the grid ``ldm generate`` writes beside several images."""

from __future__ import annotations

from typing import Sequence

from PIL import Image


def image_grid(images: Sequence[Image.Image], rows: int, cols: int) -> Image.Image:
    """Tile equally sized images row-major into one image."""
    if len(images) != rows * cols:
        raise ValueError(f"{len(images)} images do not fill a {rows}x{cols} grid")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
