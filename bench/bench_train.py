"""U-Net training speed on this machine, side by side in one run (issue 6, point 10).

    python bench/bench_train.py [--steps 3] [--warmup 1] [--rounds 3] [--threads 2]

On the small 64 px config (configs/ldm/small-64.yaml: ~18M-parameter U-Net, 16x16x4 latents,
batch 32) it times training steps of:

  (a) a loop written the way diffusers' examples/text_to_image/train_text_to_image.py does it:
      a DataLoader decoding the PNGs, the frozen autoencoder and text encoder run on every batch,
      fp32, default memory layout, torch's default AdamW (for-loop on CPU), EMA as --use_ema;
  (b) our trainer (LDMTrainer) reading the latent/context cache, fp32, the same AdamW;
  (c) (b) plus each of: bf16 autocast (with the attention product in float32, the trainer's
      default on a CPU, and without), channels_last, fused AdamW, foreach AdamW;
  (d) ours with the speed settings configs/ldm/small-64.yaml ships with (chosen from (c) and the
      parts below).

Every round runs each variant for a few steps, in a shuffled order, and every speed-up is the
median over rounds of (a)'s time divided by the variant's time in the same round: a slow spell of
the shared cores, or a position in the run, hits both sides of a ratio alike. (d) gets rounds of
its own with (a) and (b). Before the rounds, the parts of a step are timed alone (U-Net forward
and backward in fp32 and bf16, the frozen encoders, each AdamW kernel). Also printed: achieved GFLOP/s (training FLOPs counted by
torch.utils.flop_counter on one step, over wall time) against this machine's matmul peak, measured
in the same run (2048^3 fp32 and bf16 matmuls).

The frozen encoders are the project's, built untrained from configs/vae/vq-f4-64.yaml and
configs/clip/emoji.yaml (untrained weights cost the same as trained ones).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.unet.cache import build_cache  # noqa: E402
from train.run.config import load_config  # noqa: E402
from train.unet.config import LDMTrainConfig  # noqa: E402

CONFIG = ROOT / "configs" / "ldm" / "small-64.yaml"


# -- frozen encoders ---------------------------------------------------------------------------------


def frozen_encoders():
    """The project's VQ-VAE and open_clip text encoder as configured for the emoji set, untrained
    (random weights cost the same as trained ones)."""
    from conditioning import build_text_encoder
    from train.clip.config import load_train_config
    from train.vae.config import VAETrainingConfig
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

    from train.unet.trainer import build_trainer
    from train.run.log import read_csv

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(*((True,) if state is AcceleratorState else ()))
    cfg = load_config(LDMTrainConfig, CONFIG, [*BASE_OVERRIDES(config, out, warmup + steps), *BASELINE, *overrides])
    trainer = build_trainer(cfg, autoencoder=ae, text_encoder=te)
    trainer.fit()
    rows = read_csv(Path(cfg.train.output_dir) / "logs" / "train.csv")
    shutil.rmtree(cfg.train.output_dir)  # its checkpoint and bundle: ~0.5 GB a run
    return [(float(r["step_s"]), float(r["cpu_s"])) for r in rows][warmup:]


def BASE_OVERRIDES(config: LDMTrainConfig, out: Path, max_steps: int) -> list[str]:  # noqa: N802
    return [f"data.path={config.data.path}", f"cache.dir={config.cache.dir}", f"train.output_dir={tempfile.mkdtemp(dir=out)}",
            f"train.batch_size={config.train.batch_size}", f"train.max_steps={max_steps}", "train.log_every=1",
            "checkpoint.every=100000", "validation.every=0", "validation.prompts=[]", "validation.heldout_batches=1"]


# (b): the speed settings of (a); the variants add to these
BASELINE = ["optim.implementation=for-loop", "train.mixed_precision=fp32", "train.channels_last=false"]


def config_speed_settings(config: LDMTrainConfig) -> list[str]:
    """The speed settings CONFIG ships with, as overrides of BASELINE."""
    fp32_attention = "null" if config.train.fp32_attention is None else str(config.train.fp32_attention).lower()
    return [f"optim.implementation={config.optim.implementation}", f"train.mixed_precision={config.train.mixed_precision}",
            f"train.channels_last={str(config.train.channels_last).lower()}", f"train.fp32_attention={fp32_attention}"]


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


# -- the parts of a step, timed alone ------------------------------------------------------------------


def component_times(unet, ae, te, batch: int, repeats: int = 4) -> dict[str, float]:
    """Median seconds of the parts of one training step, each timed alone on fixed inputs; the parts
    run in turn (twice untimed, then ``repeats`` times), so that a slow spell hits all of them."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ldm.unet import FP32AttentionProcessor

    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(batch, 4, 16, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    ctx, images = torch.randn(batch, te.max_length, te.context_dim, generator=g), torch.randn(batch, 3, 64, 64, generator=g)
    unet = copy.deepcopy(unet).train()
    params = list(unet.parameters())

    def fwd_bwd(dtype, processor):
        def step():
            unet.set_attn_processor(processor)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = unet(z, t, encoder_hidden_states=ctx).sample.float().pow(2).mean()
            loss.backward()
        return step

    def encode():
        with torch.no_grad():
            ae.encode(images)
            te(["a koala bear, twemoji style"] * batch)

    def adamw(impl):
        kind = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
        return torch.optim.AdamW(params, lr=1e-6, **kind).step  # steps on the gradients of the U-Net calls

    parts = {
        "U-Net fwd+bwd, fp32": fwd_bwd(None, AttnProcessor2_0()),
        "U-Net fwd+bwd, bf16 autocast, attention product bf16": fwd_bwd(torch.bfloat16, AttnProcessor2_0()),
        "U-Net fwd+bwd, bf16 autocast, attention product fp32": fwd_bwd(torch.bfloat16, FP32AttentionProcessor()),
        "frozen encoders fwd (VQ-VAE encoder + text encoder), fp32": encode,
        **{f"AdamW step, {impl}": adamw(impl) for impl in ("for-loop", "foreach", "fused")},
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for r in range(2 + repeats):
        for name, fn in parts.items():
            seconds = _timed(fn)
            if r >= 2:
                times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


# -- main -----------------------------------------------------------------------------------------------

A = "(a) diffusers-style: encode every step, fp32"
B = "(b) ours: cache, fp32"
# (c): one speed option at a time on top of (b)
OPTIONS = {
    "(c) ours + bf16 autocast (attention product fp32)": ["train.mixed_precision=bf16"],
    "(c) ours + bf16 autocast, attention bf16 too": ["train.mixed_precision=bf16", "train.fp32_attention=false"],
    "(c) ours + channels_last": ["train.channels_last=true"],
    "(c) ours + fused AdamW": ["optim.implementation=fused"],
    "(c) ours + foreach AdamW": ["optim.implementation=foreach"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/work/data/emoji")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench-cache"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each variant's run")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all variants, in a shuffled order each")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled variant orders")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the trainer's progress bar

    config = load_config(LDMTrainConfig, CONFIG, [f"data.path={args.data}", f"cache.dir={args.cache}",
                                                  f"train.batch_size={args.batch}"])
    ae, te, which = frozen_encoders()
    ae.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    print(f"torch {torch.__version__}, {args.threads} threads; frozen encoders: {which}")
    print(f"batch {args.batch}; each round runs every variant for {args.warmup} + {args.steps} steps, in a shuffled "
          f"order; {args.rounds} rounds, then {args.rounds} more of (a), (b), (d)")

    t0 = time.perf_counter()
    _, built = build_cache(config.cache, config.data, ae, te, progress=False)
    print(f"cache: {'built' if built else 'reused'} in {time.perf_counter() - t0:.1f} s (paid once per data set and encoders)")

    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    from train.unet.trainer import build_trainer

    out = Path(tempfile.mkdtemp(prefix="bench-train-"))  # the runs' folders, each removed when read
    unet = build_trainer(load_config(LDMTrainConfig, CONFIG, BASE_OVERRIDES(config, out, 1)),
                         autoencoder=ae, text_encoder=te).unet
    n_params = sum(p.numel() for p in unet.parameters())
    unet_flops, encoder_flops = training_flops(unet, ae, te, args.batch, te.max_length)
    print(f"U-Net {n_params / 1e6:.1f}M parameters; one step: U-Net fwd+bwd {unet_flops / 1e9:.0f} GFLOP, "
          f"encoders fwd {encoder_flops / 1e9:.0f} GFLOP; matmul peak ({args.threads} threads) fp32 {peak32:.0f} GFLOP/s, "
          f"bf16 {peak16:.0f} GFLOP/s")

    print("\nparts of a step, each timed alone, in turn (median of 4; wall seconds):")
    for name, seconds in component_times(unet, ae, te, args.batch).items():
        print(f"  {name:<60} {seconds:7.3f} s")
    print()

    rng = random.Random(args.seed)
    rounds: dict[str, list[dict[str, tuple[float, float]]]] = {}  # variant -> per round: median (wall, CPU) s/step

    def run(name, overrides):
        if overrides is None:
            steps = diffusers_style_steps(config, copy.deepcopy(unet), ae, te, args.steps, args.warmup)
        else:
            steps = our_steps(config, ae, te, overrides, args.steps, args.warmup, out)
        return tuple(statistics.median(s[i] for s in steps) for i in (0, 1))

    def play(variants: dict, label: str):
        for r in range(args.rounds):
            names = list(variants)
            rng.shuffle(names)
            medians = {name: run(name, variants[name]) for name in names}
            for name in names:
                rounds.setdefault(name, []).append(medians)
                print(f"  {label}, round {r + 1}: {name}: wall {medians[name][0]:.3f} s/step, CPU {medians[name][1]:.3f} s/step",
                      flush=True)

    play({A: None, B: [], **OPTIONS}, "(a)-(c)")

    combo = config_speed_settings(config)
    D = f"(d) ours with {CONFIG.name}'s settings: " + ", ".join(x.split("=")[-1] for x in combo[:2])
    play({A: None, B: [], D: combo}, "(a),(b),(d)")

    print(f"\nPer variant: median step time over its rounds; speed-ups are the median over rounds of (a)'s time / the "
          f"variant's time in the same round (min-max in brackets); GFLOP/s from wall time ({args.threads} thread(s)).")
    print(f"{'variant':<52} {'wall s':>7} {'CPU s':>7} {'img/s':>6} {'vs (a), wall':>21} {'vs (a), CPU':>9} "
          f"{'GFLOP/s':>8} {'% fp32 pk':>9} {'% bf16 pk':>9}")
    for name in [A, B, *OPTIONS, D]:
        ms = rounds[name]
        wall, cpu = (statistics.median(m[name][i] for m in ms) for i in (0, 1))
        # speed-ups: (a)'s time / this variant's, in the same round
        walls, cpus = ([m[A][i] / m[name][i] for m in ms] for i in (0, 1))
        flops = unet_flops + (encoder_flops if name == A else 0)
        gflops = flops / wall / 1e9
        spread = f"({min(walls):.2f}-{max(walls):.2f})"
        print(f"{name:<52} {wall:>7.3f} {cpu:>7.3f} {args.batch / wall:>6.1f} {statistics.median(walls):>7.2f}x {spread:>13} "
              f"{statistics.median(cpus):>8.2f}x {gflops:>8.1f} {100 * gflops / peak32:>8.0f}% {100 * gflops / peak16:>8.0f}%")
    print(f"\n(d) used: {combo}")
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
