"""Aspect-ratio buckets: training images of mixed shapes, each resized to the bucket of nearest
aspect ratio instead of centre-cropped to one square (sd-scripts' ``make_bucket_resolutions`` /
``BucketManager``, SimpleTuner's aspect buckets).

    buckets = make_buckets(area=512 * 512, step=64, min_side=256, max_side=1024)   # [(height, width), ...]
    index, cropped = assign(sizes, buckets)      # sizes: (N, 2) image (width, height)
    print(bucket_report(buckets, index, cropped))

Buckets: for every width w = min_side, min_side + step, ... <= max_side, the height is the largest
multiple of ``step`` with h * w <= area; (h, w) and (w, h) are kept when h lies in [min_side,
max_side]. So every bucket holds at most the training area's pixels (a batch never needs more
memory than the square one) and at least ``area - step * max(h, w)`` of them (h misses the exact
area / w by less than one step), and both sides are multiples of ``step``, which the trainer sets to
the model's latent granularity (the autoencoder's factor times 2^(U-Net down-samplings), the sizes
the U-Net accepts).

Assignment: an image of aspect ratio r = width / height goes to the bucket whose ratio r_b is
nearest in log scale, |log r - log r_b| smallest (portrait and landscape alike). It is scaled to
cover the bucket and centre-cropped (``train.data.images.ImageTransform``), which crops the share
``1 - min(r / r_b, r_b / r) = 1 - exp(-|log r - log r_b|)`` of its pixels: the nearest bucket in log
ratio is exactly the one that crops least.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def make_buckets(area: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """Every (height, width) with sides multiples of ``step`` in [min_side, max_side] and about ``area``
    pixels (see the module docstring), sorted by aspect ratio width / height."""
    if step < 1 or min_side < 1 or max_side < min_side:
        raise ValueError(f"bucket step={step}, min_side={min_side}, max_side={max_side}: need step >= 1 and "
                         "1 <= min_side <= max_side")
    buckets = set()
    w = -(-min_side // step) * step  # the first multiple of step >= min_side
    while w <= max_side:
        h = area // w // step * step
        if min_side <= h <= max_side:
            buckets |= {(h, w), (w, h)}
        w += step
    if not buckets:
        raise ValueError(f"no bucket with sides in [{min_side}, {max_side}] (multiples of {step}) holds about "
                         f"{area} pixels; widen data.buckets.min_side/max_side")
    return sorted(buckets, key=lambda hw: (hw[1] / hw[0], hw))


def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (as A1111 and image viewers write sizes) -> (height, width)."""
    m = _SIZE.match(text) if isinstance(text, str) else None
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise ValueError(f"data.buckets.sizes: {text!r} is not a size; write WIDTHxHEIGHT, e.g. 512x768")
    return int(m[2]), int(m[1])


def check_sizes(buckets: Sequence[tuple[int, int]], granularity: int, factor: int) -> None:
    """ValueError naming the first (height, width) whose sides are not multiples of ``granularity``
    (the autoencoder's ``factor`` times the U-Net's down-sampling)."""
    for h, w in buckets:
        if h % granularity or w % granularity:
            how = f"the autoencoder's factor {factor}"
            if granularity != factor:
                how += f" times the U-Net's down-sampling {granularity // factor}"
            raise ValueError(f"data.buckets.sizes: {w}x{h} is not divisible by the latent granularity {granularity} "
                             f"({how}); use sides that are multiples of {granularity}")


def assign(sizes: np.ndarray, buckets: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(bucket index (N,), share of pixels cropped (N,)) of images of ``sizes`` (N, 2) = (width, height):
    the bucket of nearest log aspect ratio (the first of equals) and the share its centre crop removes."""
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    log_r = np.log(sizes[:, 0] / sizes[:, 1])  # (N,) log(width / height)
    log_b = np.log(np.array([w / h for h, w in buckets], dtype=np.float64))  # (K,)
    distance = np.abs(log_r[:, None] - log_b[None, :])  # (N, K)
    index = distance.argmin(axis=1)  # (N,)
    cropped = 1.0 - np.exp(-distance[np.arange(len(index)), index])  # (N,)
    return index, cropped


def bucket_report(buckets: Sequence[tuple[int, int]], index: np.ndarray, cropped: np.ndarray,
                  heldout: np.ndarray | None = None) -> str:
    """The data summary's lines: per bucket used, its size (WIDTHxHEIGHT), its images and the mean and
    max share of their pixels cropped; then the same over all images."""
    index, cropped = np.asarray(index), np.asarray(cropped, dtype=np.float64)
    used = sorted(set(index.tolist()))
    lines = [f"aspect-ratio buckets: {len(used)} used of {len(buckets)}; each image is resized to cover its bucket "
             f"and centre-cropped"]
    for k in used:
        h, w = buckets[k]
        mine = index == k
        held = f" ({int(heldout[mine].sum())} held out)" if heldout is not None and heldout[mine].any() else ""
        lines.append(f"  {w}x{h}: {int(mine.sum())} images{held}, cropped mean {100 * cropped[mine].mean():.1f}%, "
                     f"max {100 * cropped[mine].max():.1f}% of their pixels")
    if len(cropped):
        lines.append(f"  all: cropped mean {100 * cropped.mean():.1f}%, max {100 * cropped.max():.1f}% of the pixels")
    return "\n".join(lines)
