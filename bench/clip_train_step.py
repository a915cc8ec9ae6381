"""Seconds per training step of the small CLIP, side by side: fp32 vs bf16 autocast, 1 vs 2 threads.

    python bench/clip_train_step.py [configs/clip/emoji.yaml] [--batch 128] [--repeats 5]

Prints, for each setting, the median wall time and process CPU time of one step
(forward, ClipLoss, backward, AdamW) and of each tower's forward + backward,
and the ratio to fp32 / 1 thread. Settings alternate in rounds so that load
from other processes affects them alike. This is how configs/clip/emoji.yaml
chose fp32 and one thread on the shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from open_clip.loss import ClipLoss

from train.clip.config import load_train_config
from train.clip.model import ContrastivePair, encode_text_trimmed, param_groups
from conditioning.clip_model import build_open_clip_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/clip/emoji.yaml")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    cfg = load_train_config(args.config, ["data.path=unused"])
    torch.manual_seed(0)
    module = ContrastivePair(build_open_clip_model(cfg.model.to_open_clip()))
    clip = module.clip
    optimizer = torch.optim.AdamW(param_groups(module, 0.1), lr=1e-6)
    loss_fn = ClipLoss()
    size, batch = cfg.model.vision.image_size, args.batch
    images = torch.rand(batch, 3, size, size)  # (B, 3, S, S)
    tokens = torch.zeros(batch, 77, dtype=torch.long)  # (B, 77): 14-token captions, like the emoji set's
    tokens[:, 0], tokens[:, 1:14], tokens[:, 14] = 49406, torch.randint(0, 49000, (batch, 13)), 49407
    print(f"{sum(p.numel() for p in clip.parameters()) / 1e6:.2f}M parameters, batch {batch}, {size} px")

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            i, t, s = module(images, tokens)
            loss = loss_fn(i.float(), t.float(), s.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def vision(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = clip.encode_image(module.normalize(images))
        out.float().sum().backward()
        clip.zero_grad()

    def text(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = encode_text_trimmed(clip, tokens)
        out.float().sum().backward()
        clip.zero_grad()

    settings = [(threads, bf16) for threads in (1, 2) for bf16 in (False, True)]
    results = {(part, s): ([], []) for part in ("step", "vision", "text") for s in settings}
    for fn in (step, vision, text):
        for s in settings:  # warm-up
            torch.set_num_threads(s[0])
            fn(s[1])
    for _ in range(args.repeats):
        for part, fn in (("step", step), ("vision", vision), ("text", text)):
            for s in settings:
                torch.set_num_threads(s[0])
                wall, cpu = time.perf_counter(), time.process_time()
                fn(s[1])
                results[part, s][0].append(time.perf_counter() - wall)
                results[part, s][1].append(time.process_time() - cpu)
    for part in ("step", "vision", "text"):
        base = statistics.median(results[part, (1, False)][0])
        for s in settings:
            wall, cpu = (statistics.median(v) for v in results[part, s])
            print(f"{part:6s} threads={s[0]} {'bf16' if s[1] else 'fp32'}: wall {wall:.3f} s (x{base / wall:.2f} vs fp32 "
                  f"1 thread), cpu {cpu:.3f} s")


if __name__ == "__main__":
    main()
