"""Images/s of the captioned-image loader on the emoji set, against what a training step consumes.

Measures, on this machine: the one-off scan of ``load_captioned_images`` (decode every image,
count captions' tokens); decoding alone; ``data[i]`` (decode + resize/crop + to tensor) in a loop;
and a torch DataLoader (shuffled, batch 64) with 0, 1 and 2 workers, each over the whole set.
Prints each rate side by side with the rate a small U-Net training step needs on 2 cores
(~20-30 images/s at 64 px): the loader is no bottleneck when the ratio is well above 1.

    python bench/bench_loader.py [--data /work/data/emoji] [--size 64] [--batch-size 64] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from train.data import load_captioned_images
from train.data.images import decode_image

TRAINING_NEEDS = 30.0  # images/s a small U-Net step handles on 2 CPU cores at 64 px (upper end)


def rate(n: int, seconds: float) -> str:
    per_s = n / seconds
    return f"{per_s:9.0f} images/s  ({per_s / TRAINING_NEEDS:6.1f}x the {TRAINING_NEEDS:.0f} images/s training needs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/work/data/emoji")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    data = load_captioned_images(args.data, split="train", size=args.size, crop="random", progress=False)
    scan = time.perf_counter() - start
    n = len(data)
    print(data.summary())
    print(f"\n{n} images, {args.size} px, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'scan (once; with open_clip import)':36s} {rate(n, scan)}")

    start = time.perf_counter()
    for i in range(n):
        decode_image(data._refs[i])
    print(f"{'decode only':36s} {rate(n, time.perf_counter() - start)}")

    start = time.perf_counter()
    for i in range(n):
        data[i]
    print(f"{'data[i]: decode+crop+tensor':36s} {rate(n, time.perf_counter() - start)}")

    for workers in [int(w) for w in args.workers.split(",")]:
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                             generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        seen = sum(images.shape[0] for images, _ in loader)  # (B, 3, H, W) batches
        print(f"{f'DataLoader, {workers} worker(s)':36s} {rate(seen, time.perf_counter() - start)}")


if __name__ == "__main__":
    main()
