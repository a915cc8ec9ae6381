"""Captioned image pairs for CLIP training, held in memory: a minimal reader, order and augmentation.

TO BE REPLACED at integration by ``train.data`` (issue 3), which reads every
supported layout, skips bad files and reports them: ``_load_pairs`` is the one
function to swap. This minimal reader knows one layout, an image folder with
``metadata.jsonl`` rows ``{"file_name", "text", "split"?}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from train.clip_config import ClipDataConfig, ClipTrainConfig


def _load_pairs(folder: str | Path) -> list[tuple[Path, str, Optional[str]]]:
    """(image path, caption, split or None) for each row of ``folder/metadata.jsonl``."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} does not exist; data.folder must be an image folder with metadata.jsonl")
    pairs = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise ValueError(f"{meta}:{n}: each row needs string fields file_name and text")
        pairs.append((folder / row["file_name"], row["text"], row.get("split")))
    if not pairs:
        raise ValueError(f"{meta} has no rows")
    return pairs


def _read_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB; transparency composited on white; resized (bicubic) when needed."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def _split(pairs, test_fraction: float) -> tuple[list, list]:
    if any(split is not None for _, _, split in pairs):
        return [p for p in pairs if p[2] != "test"], [p for p in pairs if p[2] == "test"]

    def held_out(path: Path) -> bool:
        return int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16) / 16**8 < test_fraction

    return [p for p in pairs if not held_out(p[0])], [p for p in pairs if held_out(p[0])]


@dataclasses.dataclass
class PairSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    tokens: torch.Tensor  # (N, L) long
    captions: list[str]


def load_pair_sets(config: ClipTrainConfig, tokenize) -> tuple[PairSet, PairSet]:
    """(train, test) images and token ids, held in memory."""
    train_pairs, test_pairs = _split(_load_pairs(config.data.folder), config.data.test_fraction)
    if config.data.max_train:
        train_pairs = train_pairs[: config.data.max_train]
    if len(train_pairs) < config.optim.batch_size:
        raise ValueError(f"{len(train_pairs)} training pairs in {config.data.folder}, fewer than "
                         f"optim.batch_size={config.optim.batch_size}")
    size = config.model.vision.image_size

    def build(pairs) -> PairSet:
        if not pairs:
            return PairSet(torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, 77, dtype=torch.long), [])
        images = np.stack([_read_image(path, size) for path, _, _ in pairs])  # (N, S, S, 3)
        captions = [text for _, text, _ in pairs]
        return PairSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), tokenize(captions), captions)

    return build(train_pairs), build(test_pairs)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the n training pairs for one epoch, the same on every run."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


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
    if config.hflip:
        flip = torch.rand(batch, generator=generator) < 0.5  # (B,)
        images = torch.where(flip.view(batch, 1, 1, 1), images.flip(-1), images)
    return images
