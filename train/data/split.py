"""The one held-out rule and the one caption-choice rule of every trainer.

Held out (VAE, CLIP and U-Net alike, so that no trainer evaluates on what another trained on):

* the data set's ``test`` split, when it has one (a ``split`` column, or a ``test/`` folder);
* otherwise the rows whose key hashes below ``fraction``: sha256(key) read as a number in [0, 1).
  A row's key is its image's path relative to the data set (or, for images stored inside a
  table, its row number there), so the choice does not move when other rows are added, dropped
  or skipped. When that picks no row of a set of two or more, the row of smallest hash is held
  out, so a handful of images still gives a held-out loss.

Captions: an image with several captions gets, in epoch e, option
``default_rng((seed, e, hash(key))).integers(n)``: the same draw whichever trainer or process asks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from train.data.captioned import CaptionedImages


def key_hash(key: str) -> int:
    """A row key as a 64-bit number (the first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def heldout_flags(keys: Sequence[str], fraction: float) -> list[bool]:
    """Which rows are held out: hash(key) / 2**64 < fraction, and at least one of two or more rows."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout_fraction={fraction} must be in [0, 1)")
    hashes = [key_hash(k) for k in keys]
    flags = [h / 2**64 < fraction for h in hashes]
    if fraction > 0 and len(keys) >= 2 and not any(flags):
        flags[int(np.argmin(hashes))] = True
    return flags


def caption_index(n: int, seed: int, epoch: int, key: str) -> int:
    """Which of a row's ``n`` captions epoch ``epoch`` trains on."""
    if n == 1:
        return 0
    return int(np.random.default_rng((seed, epoch, key_hash(key))).integers(n))


@dataclass
class Split:
    """A data set cut into training and held-out rows (indices into ``train`` and ``heldout``)."""

    train: "CaptionedImages"
    train_rows: list[int]
    heldout: "CaptionedImages"  # the test split's own rows, or the same object as ``train``
    heldout_rows: list[int]

    def summary(self) -> str:
        same = self.heldout is self.train
        lines = [str(self.train.summary())] + ([] if same else [str(self.heldout.summary())])
        how = "by a hash of each image's path" if same else "the data set's test split"
        lines.append(f"held out: {len(self.heldout_rows)} images ({how}); training on {len(self.train_rows)}")
        return "\n".join(lines)


def load_split(path: Union[str, Path], holdout_fraction: float, **load_kw) -> Split:
    """``path`` loaded by ``train.data.load_captioned_images`` (``load_kw``) and split by the held-out rule."""
    from train.data.captioned import load_captioned_images

    train = load_captioned_images(path, split="train", **load_kw)
    if len(train):
        test = load_captioned_images(path, split="test", **load_kw)
        if len(test):
            return Split(train, list(range(len(train))), test, list(range(len(test))))
    else:
        train = load_captioned_images(path, split=None, **load_kw)
    if not len(train):
        raise ValueError(f"{path}: no usable (image, caption) pair; see `ldm data check {path}`")
    flags = heldout_flags([train.key(i) for i in range(len(train))], holdout_fraction)
    return Split(train, [i for i, f in enumerate(flags) if not f], train, [i for i, f in enumerate(flags) if f])


def heldout_keys(split: Split) -> list[str]:
    """The keys of the held-out images (what a test compares across trainers)."""
    return [split.heldout.key(i) for i in split.heldout_rows]


