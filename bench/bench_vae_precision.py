"""Training-step speed of the 64 px VQ-VAE on this machine: fp32 vs bf16 autocast vs channels_last, 1 vs 2 threads.

    python bench/bench_vae_precision.py [--config configs/vae/vq-f4-64.yaml] [--batch 16] [--rounds 5]

Variants are timed in interleaved rounds (so load from other processes hits them alike) and reported as
images/s with the ratio to fp32 at the same thread count. What it measures is one full training step:
encoder, quantiser (EMA codebook), decoder, L1 + L2 loss, backward, Adam.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from train.run.config import load_config
from train.vae.config import VAETrainingConfig
from vae import build_autoencoder
from vae.vq import CodebookTrainer

VARIANTS = [  # (name, autocast dtype or None, channels_last)
    ("fp32", None, False),
    ("bf16", torch.bfloat16, False),
    ("fp32+channels_last", None, True),
    ("bf16+channels_last", torch.bfloat16, True),
]


def make_step(config: VAETrainingConfig, dtype, channels_last: bool, batch: int):
    torch.manual_seed(0)
    ae = build_autoencoder(config.model)
    model = ae.model.train()
    codebook = CodebookTrainer(model.quantize.embedding, config.quantizer)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = (torch.rand(batch, 3, config.model.resolution, config.model.resolution) * 2 - 1).contiguous(memory_format=fmt)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            q = codebook(model.quant_conv(model.encoder(x)))
            rec = model.decoder(model.post_quant_conv(q.z_q))
            loss = (rec.float() - x).abs().mean() + (rec.float() - x).square().mean() + q.commitment_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/vae/vq-f4-64.yaml")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    config = load_config(VAETrainingConfig, args.config)
    times: dict[tuple[str, int], list[float]] = {}
    steps = {name: make_step(config, dtype, cl, args.batch) for name, dtype, cl in VARIANTS}
    threads = [int(t) for t in args.threads.split(",")]
    for n in threads:  # warm-up (oneDNN primitive creation)
        torch.set_num_threads(n)
        for step in steps.values():
            step()
    for _ in range(args.rounds):
        for n in threads:
            torch.set_num_threads(n)
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times.setdefault((name, n), []).append(time.perf_counter() - start)
    print(f"batch {args.batch} at {config.model.resolution} px, median of {args.rounds} interleaved rounds")
    print(f"{'variant':<22}{'threads':>8}{'img/s':>10}{'vs fp32':>10}")
    for n in threads:
        base = statistics.median(times[("fp32", n)])
        for name, _, _ in VARIANTS:
            t = statistics.median(times[(name, n)])
            print(f"{name:<22}{n:>8}{args.batch / t:>10.1f}{base / t:>9.2f}x")


if __name__ == "__main__":
    main()
