"""A minimal reader of an imagefolder with metadata.jsonl, for the autoencoder's trainer and evaluator.

INTEGRATION: a stand-in for ``train.data`` (issue 3, written in parallel). Replace ``read_imagefolder``
with that module's loader when merging and delete this file.

metadata.jsonl has one JSON object per line: ``file_name`` (relative to the folder), ``text``, and an
optional ``split`` ("train" or "test"; rows without one count as "train").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

SPLITS = ("train", "test")


def read_imagefolder(path: Union[str, Path], split: str = "train", size: Optional[int] = None,
                     max_images: int = 0) -> torch.Tensor:
    """All images of ``split`` as one uint8 tensor (N, 3, H, W), RGB, alpha composited onto white.
    With ``size`` every image must be size x size, or is resized to it when it is not square-equal."""
    from PIL import Image

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    folder = Path(path)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: the data folder needs a metadata.jsonl "
                                "(file_name, text, optional split); build one with 'ldm data emoji --out DIR'")
    arrays = []
    with meta.open() as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "file_name" not in row:
                raise ValueError(f"{meta}:{line_no}: row has no file_name")
            if row.get("split", "train") != split:
                continue
            image = Image.open(folder / row["file_name"])
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(image))
            if max_images and len(arrays) >= max_images:
                break
    if not arrays:
        raise ValueError(f"{meta} has no rows with split {split!r}")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images in {folder} ({split}) have different sizes {sorted(shapes)[:4]}; pass a size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0
