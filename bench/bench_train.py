"""U-Net training speed on this machine, side by side in one run (issue 6, point 10).

    python bench/bench_train.py [--steps 10] [--warmup 3] [--rounds 2] [--threads 2]

On the small 64 px config (configs/ldm/small-64.yaml: ~18M-parameter U-Net, 16x16x4 latents,
batch 32) it times training steps of:

  (a) a loop written the way diffusers' examples/text_to_image/train_text_to_image.py does it:
      a DataLoader decoding the PNGs, the frozen autoencoder and text encoder run on every batch,
      fp32, default memory layout, torch's default AdamW (for-loop on CPU), EMA as --use_ema;
  (b) our trainer (LDMTrainer) reading the latent/context cache, fp32, the same AdamW;
  (c) (b) plus each of: bf16 autocast, channels_last, fused AdamW, foreach AdamW;
  (d) (b) with the settings of (c) that were faster, together.

Variants are run round-robin (``--rounds``) and each one's median step time is reported, since
the cores are shared. Also printed: achieved GFLOP/s (training FLOPs counted by
torch.utils.flop_counter on one step) against this machine's matmul peak, measured in the same
run (2048^3 fp32 and bf16 matmuls).

The frozen encoders are the project's, built untrained from configs/vae/vq-f4-64.yaml and
configs/clip/emoji.yaml (untrained weights cost the same as trained ones).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.cache import build_cache  # noqa: E402
from train.config import load_config  # noqa: E402
from train.ldm_config import LDMTrainConfig  # noqa: E402

CONFIG = ROOT / "configs" / "ldm" / "small-64.yaml"


# -- frozen encoders ---------------------------------------------------------------------------------


def frozen_encoders():
    """The project's VQ-VAE and open_clip text encoder as configured for the emoji set, untrained
    (random weights cost the same as trained ones)."""
    from conditioning import build_text_encoder
    from train.clip_config import load_train_config
    from train.vae_train_config import VAETrainingConfig
    from vae import build_autoencoder

    torch.manual_seed(0)
    ae = build_autoencoder(load_config(VAETrainingConfig, ROOT / "configs" / "vae" / "vq-f4-64.yaml").model)
    clip = load_train_config(str(ROOT / "configs" / "clip" / "emoji.yaml")).model
    te = build_text_encoder({"backend": "open_clip", "model_cfg": clip.to_open_clip()})
    return ae, te, "the project's VQ-VAE (configs/vae/vq-f4-64.yaml) and open_clip text encoder (configs/clip/emoji.yaml), untrained"


# -- (a) the diffusers-style loop -------------------------------------------------------------------


def diffusers_style_steps(config: LDMTrainConfig, unet, ae, te, steps: int, warmup: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per step of a train_text_to_image.py-style loop: decode, encode images and captions, train."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from train.data import load_captioned_images

    data = load_captioned_images(config.data.path, split="train", size=config.data.resolution, progress=False)
    loader = torch.utils.data.DataLoader(data, batch_size=config.train.batch_size, shuffle=True, num_workers=0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    ema = EMAModel(unet.parameters(), decay=config.ema.decay)
    times = []
    batches = iter(loader)
    for step in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        pixel_values, captions = next(batches)  # (B, 3, 64, 64)
        with torch.no_grad():
            latents = ae.encode(pixel_values)  # (B, 4, 16, 16), times the scaling factor
            encoder_hidden_states = te(list(captions))[0]  # (B, 77, D)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times[warmup:]


# -- (b)-(d) our trainer ------------------------------------------------------------------------------


def our_steps(config: LDMTrainConfig, ae, te, overrides: list[str], steps: int, warmup: int, out: Path) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per step of LDMTrainer, from its train.csv (checkpoints and validation excluded)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from train.ldm_trainer import build_trainer
    from train.run_log import read_csv

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(*((True,) if state is AcceleratorState else ()))
    cfg = load_config(LDMTrainConfig, CONFIG, [*BASE_OVERRIDES(config, out, warmup + steps), *overrides])
    trainer = build_trainer(cfg, autoencoder=ae, text_encoder=te)
    trainer.fit()
    rows = read_csv(Path(cfg.train.output_dir) / "logs" / "train.csv")
    return [(float(r["step_s"]), float(r["cpu_s"])) for r in rows][warmup:]


def BASE_OVERRIDES(config: LDMTrainConfig, out: Path, max_steps: int) -> list[str]:  # noqa: N802
    return [f"data.path={config.data.path}", f"cache.dir={config.cache.dir}", f"train.output_dir={tempfile.mkdtemp(dir=out)}",
            f"train.batch_size={config.train.batch_size}", f"train.max_steps={max_steps}", "train.log_every=1",
            "checkpoint.every=100000", "validation.every=0", "validation.prompts=[]", "validation.heldout_batches=1",
            "optim.implementation=for-loop", "train.mixed_precision=fp32", "train.channels_last=false"]


# -- FLOPs and peak -----------------------------------------------------------------------------------


def matmul_peak(dtype) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(2):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def training_flops(unet, ae, te, batch: int, context_len: int) -> tuple[float, float]:
    """(U-Net forward + backward FLOPs, frozen encoders' forward FLOPs) for one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn(batch, 4, 16, 16)
    ctx = torch.randn(batch, context_len, te.context_dim)
    with FlopCounterMode(display=False) as counter:
        unet(z, torch.randint(0, 1000, (batch,)), encoder_hidden_states=ctx).sample.pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    train = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ae.encode(torch.randn(batch, 3, 64, 64))
        te(["a koala bear, twemoji style"] * batch)
    return float(train), float(counter.get_total_flops())


# -- main -----------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/work/data/emoji")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench-cache"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(LDMTrainConfig, CONFIG, [f"data.path={args.data}", f"cache.dir={args.cache}",
                                                  f"train.batch_size={args.batch}"])
    ae, te, which = frozen_encoders()
    ae.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    print(f"torch {torch.__version__}, {args.threads} threads; frozen encoders: {which}")
    print(f"batch {args.batch}, {args.steps} timed steps x {args.rounds} rounds per variant (after {args.warmup} warm-up)")

    t0 = time.perf_counter()
    _, built = build_cache(config.cache, config.data, ae, te, progress=False)
    print(f"cache: {'built' if built else 'reused'} in {time.perf_counter() - t0:.1f} s (paid once per data set and encoders)")

    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    from train.ldm_trainer import build_trainer

    unet = build_trainer(load_config(LDMTrainConfig, CONFIG, BASE_OVERRIDES(config, Path(tempfile.mkdtemp()), 1)),
                         autoencoder=ae, text_encoder=te).unet
    n_params = sum(p.numel() for p in unet.parameters())
    unet_flops, encoder_flops = training_flops(unet, ae, te, args.batch, te.max_length)
    print(f"U-Net {n_params / 1e6:.1f}M parameters; one step: U-Net fwd+bwd {unet_flops / 1e9:.0f} GFLOP, "
          f"encoders fwd {encoder_flops / 1e9:.0f} GFLOP; matmul peak fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")

    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    variants = {
        "(a) diffusers-style: encode every step, fp32": None,
        "(b) ours: cache, fp32": [],
        "(c) ours + bf16 autocast": ["train.mixed_precision=bf16"],
        "(c) ours + channels_last": ["train.channels_last=true"],
        "(c) ours + fused AdamW": ["optim.implementation=fused"],
        "(c) ours + foreach AdamW": ["optim.implementation=foreach"],
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}  # (wall, CPU) seconds per step

    def median(name, which):  # which: 0 wall, 1 CPU
        return statistics.median(t[which] for t in times[name])

    def run(name, overrides):
        if overrides is None:
            unet_a = copy.deepcopy(unet)
            times[name] += diffusers_style_steps(config, unet_a, ae, te, args.steps, args.warmup)
        else:
            times[name] += our_steps(config, ae, te, overrides, args.steps, args.warmup, out)

    for r in range(args.rounds):
        for name, overrides in variants.items():
            run(name, overrides)
            last = times[name][-args.steps:]
            print(f"  round {r + 1}: {name}: wall {statistics.median(t[0] for t in last):.3f} s/step, "
                  f"CPU {statistics.median(t[1] for t in last):.3f} s/step", flush=True)

    base = median("(b) ours: cache, fp32", 1)
    faster = [o for name, o in variants.items() if o and median(name, 1) < base * 0.97]
    combo = [x for o in faster for x in o]
    name_d = "(d) ours + " + (", ".join(o[0].split("=")[-1] for o in faster) if faster else "nothing (no option was faster)")
    variants[name_d] = combo
    times[name_d] = []
    for _ in range(args.rounds):
        run(name_d, combo)

    a = "(a) diffusers-style: encode every step, fp32"
    print(f"\nmedians; speed-ups and GFLOP/s from CPU time ({args.threads} thread(s); the cores are shared, so wall time "
          "also holds waiting for them)")
    print(f"{'variant':<48} {'wall s':>7} {'CPU s':>7} {'img/s':>6} {'vs (a)':>7} {'wall vs (a)':>11} {'GFLOP/s':>8} "
          f"{'% fp32 pk':>9} {'% bf16 pk':>9}")
    for name in times:
        wall, cpu = median(name, 0), median(name, 1)
        flops = unet_flops + (encoder_flops if name.startswith("(a)") else 0)
        gflops = flops / cpu / 1e9
        print(f"{name:<48} {wall:>7.3f} {cpu:>7.3f} {args.batch / cpu:>6.1f} {median(a, 1) / cpu:>6.2f}x "
              f"{median(a, 0) / wall:>10.2f}x {gflops:>8.1f} {100 * gflops / peak32:>8.0f}% {100 * gflops / peak16:>8.0f}%")
    print(f"\n(d) used: {combo or 'the fp32 baseline'}")


if __name__ == "__main__":
    main()
