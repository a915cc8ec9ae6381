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

``train.data.load_split`` applies the held-out rule to a data set; ``CaptionedImages.key`` and
``CaptionedImages.caption`` follow these rules.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


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
    return caption_index_of_hash(n, seed, epoch, key_hash(key) if n > 1 else 0)


def caption_index_of_hash(n: int, seed: int, epoch: int, hashed: int) -> int:
    """``caption_index`` for a row whose ``key_hash`` is ``hashed`` (what the sharded cache stores)."""
    if n == 1:
        return 0
    return int(np.random.default_rng((seed, epoch, int(hashed))).integers(n))
