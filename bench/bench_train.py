"""U-Net training speed on this machine, side by side in one run (issue 6, point 10; issue 14).

    python bench/bench_train.py [--data DIR] [--steps 2] [--warmup 1] [--rounds 2] [--threads 2]

On the small 64 px config (configs/ldm/small-64.yaml: ~18M-parameter U-Net, 16x16x4 latents,
batch 32) it times training steps of:

  (a) a loop written the way diffusers' examples/text_to_image/train_text_to_image.py does it:
      a DataLoader decoding the PNGs, the frozen autoencoder and text encoder run on every batch,
      fp32, default memory layout, torch's default AdamW (for-loop on CPU), EMA as --use_ema;
  (b) our trainer (LDMTrainer) reading the latent/context cache, fp32, the same AdamW;
  (c) (b) plus each of: bf16 autocast (with the attention product in float32, the trainer's
      default on a CPU, and without), channels_last, fused AdamW, foreach AdamW;
  (d) ours with the speed settings configs/ldm/small-64.yaml ships with (chosen from (c) and the
      parts below), its mixed precision as train.run.precision.resolve_mixed_precision picks it where
      the config's is "auto" or where the config's bf16 is hopeless on this CPU.

Data: without --data, a few hundred procedural 64 px images (``ldm data shapes``,
train.data.shapes.build_shapes_dataset) and their latent cache are built in a temporary folder
(a few seconds) and removed at the end; the speed of a step does not depend on what the images show.

Precision follows the CPU (issue 14): the run starts with train.run.precision's probe (bf16 autocast
vs fp32 on a small matmul + conv workload) and prints what ``mixed_precision: auto`` picks. bf16
is then timed beside fp32 (the U-Net's forward + backward alone, and the trainer's steps), bounded:
where the probe finds bf16 over 2x slower than fp32 (CPUs without bf16 instructions, e.g. ~150x on
an AVX2 Zen 3), the bf16 trainer variants are skipped with the reason printed, the bf16 U-Net
timing runs on a batch cut to what takes ~10 s at the probe's ratio, and the bf16 matmul peak is
measured at 512^3 instead of 2048^3.

Every round runs each variant for a few steps, in a shuffled order, and every speed-up is the
median over rounds of (a)'s time divided by the variant's time in the same round: a slow spell of
the shared cores, or a position in the run, hits both sides of a ratio alike. (d) runs in the same
rounds as the others. Before the rounds, the parts of a step are timed alone (U-Net forward
and backward in fp32 and bf16, the frozen encoders, each AdamW kernel). Also printed: achieved GFLOP/s (training FLOPs counted by
torch.utils.flop_counter on one step, over wall time) against this machine's matmul peak, measured
in the same run (2048^3 fp32 and bf16 matmuls).

The defaults (2 rounds of 1 + 2 steps, 256 images) took 97 s on this machine's 2 cores when idle
(AMD EPYC with AVX512-BF16: auto picked bf16, which ran 1.49x fp32 in the trainer), and 22 minutes
beside other work (load average 5-8: two threads on shared cores wait on each other, every step
~15x slower and the ratios noise; --threads 1 fares better there).

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

os.environ.setdefault("TQDM_DISABLE", "1")  # the trainer's and the data builder's progress bars (read when torch loads tqdm)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.run.config import load_config  # noqa: E402
from train.run.precision import probe_cpu_bf16_speedup, resolve_mixed_precision  # noqa: E402
from train.unet.cache import build_cache  # noqa: E402
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
    if not len(data):  # no split column or folders (the shapes set): all rows, as train.unet.cache.open_data does
        data = load_captioned_images(config.data.path, split=None, size=config.data.resolution, progress=False)
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
    """(wall, CPU) seconds per step of LDMTrainer, from its train.csv (checkpoints and validation excluded).
    The run stops one step short of max_steps: no final checkpoint, validation or bundle (~0.5 GB) is written."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from train.unet.trainer import build_trainer
    from train.run.log import read_csv

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(*((True,) if state is AcceleratorState else ()))
    cfg = load_config(LDMTrainConfig, CONFIG, [*BASE_OVERRIDES(config, out, warmup + steps + 1), *BASELINE, *overrides])
    trainer = build_trainer(cfg, autoencoder=ae, text_encoder=te)
    trainer.fit(stop_at_step=warmup + steps)
    rows = read_csv(Path(cfg.train.output_dir) / "logs" / "train.csv")
    shutil.rmtree(cfg.train.output_dir)
    return [(float(r["step_s"]), float(r["cpu_s"])) for r in rows][warmup:]


def BASE_OVERRIDES(config: LDMTrainConfig, out: Path, max_steps: int) -> list[str]:  # noqa: N802
    return [f"data.path={config.data.path}", f"cache.dir={config.cache.dir}", f"train.output_dir={tempfile.mkdtemp(dir=out)}",
            f"train.batch_size={config.train.batch_size}", f"train.max_steps={max_steps}", "train.log_every=1",
            "checkpoint.every=100000", "validation.every=0", "validation.prompts=[]", "validation.heldout_batches=1"]


# (b): the speed settings of (a); the variants add to these
BASELINE = ["optim.implementation=for-loop", "train.mixed_precision=fp32", "train.channels_last=false"]


def config_speed_settings(config: LDMTrainConfig, mixed_precision: str) -> list[str]:
    """The speed settings CONFIG ships with, as overrides of BASELINE, with this mixed precision."""
    fp32_attention = "null" if config.train.fp32_attention is None else str(config.train.fp32_attention).lower()
    return [f"optim.implementation={config.optim.implementation}", f"train.mixed_precision={mixed_precision}",
            f"train.channels_last={str(config.train.channels_last).lower()}", f"train.fp32_attention={fp32_attention}"]


# -- FLOPs and peak -----------------------------------------------------------------------------------


def matmul_peak(dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * n**3 / best / 1e9


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


def component_times(unet, ae, te, batch: int, bf16_batch: int, repeats: int = 2) -> dict[str, float]:
    """Median seconds of the parts of one training step, each timed alone on fixed inputs; the parts
    run in turn (once untimed, then ``repeats`` times), so that a slow spell hits all of them. The
    bf16 U-Net parts run on the first ``bf16_batch`` images (all where bf16 is not hopeless here),
    beside fp32 on the same images."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ldm.unet import FP32AttentionProcessor

    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(batch, 4, 16, 16, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    ctx, images = torch.randn(batch, te.max_length, te.context_dim, generator=g), torch.randn(batch, 3, 64, 64, generator=g)
    unet = copy.deepcopy(unet).train()
    params = list(unet.parameters())

    def fwd_bwd(dtype, processor, n=batch):
        def step():
            unet.set_attn_processor(processor)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = unet(z[:n], t[:n], encoder_hidden_states=ctx[:n]).sample.float().pow(2).mean()
            loss.backward()
        return step

    def encode():
        with torch.no_grad():
            ae.encode(images)
            te(["a koala bear, twemoji style"] * batch)

    def adamw(impl):
        kind = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
        return torch.optim.AdamW(params, lr=1e-6, **kind).step  # steps on the gradients of the U-Net calls

    on = "" if bf16_batch == batch else f" ({bf16_batch} of {batch} images)"
    parts = {
        "U-Net fwd+bwd, fp32": fwd_bwd(None, AttnProcessor2_0()),
        **({} if bf16_batch == batch else {f"U-Net fwd+bwd, fp32{on}": fwd_bwd(None, AttnProcessor2_0(), bf16_batch)}),
        f"U-Net fwd+bwd, bf16 autocast, attention product bf16{on}": fwd_bwd(torch.bfloat16, AttnProcessor2_0(), bf16_batch),
        f"U-Net fwd+bwd, bf16 autocast, attention product fp32{on}": fwd_bwd(torch.bfloat16, FP32AttentionProcessor(), bf16_batch),
        "frozen encoders fwd (VQ-VAE encoder + text encoder), fp32": encode,
        **{f"AdamW step, {impl}": adamw(impl) for impl in ("for-loop", "foreach", "fused")},
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for r in range(1 + repeats):
        for name, fn in parts.items():
            seconds = _timed(fn)
            if r >= 1:
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


# bf16 at under this many times fp32's speed (train.run.precision's probe) is hopeless here: its trainer
# variants are skipped, and the bf16 U-Net timing runs on a cut batch
HOPELESS_BF16 = 0.5
BF16_CALL_S = 3.0  # ... cut to take about this long a call at the probe's ratio
BF16 = "train.mixed_precision=bf16"


def main() -> None:
    started = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="a captioned image folder; default: --images procedural shapes "
                   "images built in a temporary folder")
    p.add_argument("--images", type=int, default=256, help="images of the built data set (without --data)")
    p.add_argument("--cache", default=None, help="the latent cache folder (default: runs/bench-cache with --data, "
                   "else in the temporary folder)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each variant's run")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all variants, in a shuffled order each")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled variant orders")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))  # the built data, its cache, the runs' folders
    try:
        bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbench wall time: {time.perf_counter() - started:.0f} s")


def bench(args, work: Path) -> None:
    speedup = probe_cpu_bf16_speedup()
    auto = resolve_mixed_precision("auto", torch.device("cpu"), log=print)  # one line: what auto picks, and why
    hopeless = speedup < HOPELESS_BF16

    if args.data is None:
        from train.data.shapes import build_shapes_dataset

        t0 = time.perf_counter()
        data, cache_dir = work / "shapes", args.cache or str(work / "cache")
        build_shapes_dataset(data, side=64, n=args.images, seed=0)
        print(f"data: {args.images} procedural 64 px images (ldm data shapes) built in {time.perf_counter() - t0:.1f} s")
    else:
        data, cache_dir = Path(args.data), args.cache or str(ROOT / "runs" / "bench-cache")
        print(f"data: {data}")
    config = load_config(LDMTrainConfig, CONFIG, [f"data.path={data}", f"cache.dir={cache_dir}",
                                                  f"train.batch_size={args.batch}"])
    ae, te, which = frozen_encoders()
    ae.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    print(f"torch {torch.__version__}, {args.threads} threads; frozen encoders: {which}")
    print(f"batch {args.batch}; each round runs every variant for {args.warmup} + {args.steps} steps, in a shuffled "
          f"order; {args.rounds} rounds")

    t0 = time.perf_counter()
    _, built = build_cache(config.cache, config.data, ae, te, progress=False)
    print(f"cache: {'built' if built else 'reused'} in {time.perf_counter() - t0:.1f} s (paid once per data set and encoders)")

    peak_n16 = 512 if hopeless else 2048  # a hopeless bf16 2048^3 matmul takes seconds a call
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, peak_n16)
    from train.unet.trainer import build_trainer

    out = work / "runs"  # the runs' folders, each removed when read
    out.mkdir()
    unet = build_trainer(load_config(LDMTrainConfig, CONFIG, BASE_OVERRIDES(config, out, 1)),
                         autoencoder=ae, text_encoder=te).unet
    n_params = sum(p.numel() for p in unet.parameters())
    unet_flops, encoder_flops = training_flops(unet, ae, te, args.batch, te.max_length)
    print(f"U-Net {n_params / 1e6:.1f}M parameters; one step: U-Net fwd+bwd {unet_flops / 1e9:.0f} GFLOP, "
          f"encoders fwd {encoder_flops / 1e9:.0f} GFLOP; matmul peak ({args.threads} threads) fp32 {peak32:.0f} GFLOP/s, "
          f"bf16 {peak16:.0f} GFLOP/s" + ("" if peak_n16 == 2048 else f" (at {peak_n16}^3: bf16 is hopeless here)"))

    bf16_batch = args.batch
    if hopeless:  # the fp32 U-Net at a third of the fp32 peak, bf16 at the probe's ratio of it
        fp32_s = unet_flops / (peak32 * 1e9 / 3)
        bf16_batch = max(1, min(args.batch, int(args.batch * BF16_CALL_S * speedup / fp32_s)))
    repeats = 2
    print(f"\nparts of a step, each timed alone, in turn (median of {repeats}; wall seconds; fp32 and bf16 side by side):")
    for name, seconds in component_times(unet, ae, te, args.batch, bf16_batch, repeats).items():
        print(f"  {name:<72} {seconds:7.3f} s")
    print()

    combo_precision = config.train.mixed_precision
    if combo_precision == "auto" or (combo_precision == "bf16" and hopeless):
        print(f"(d): {CONFIG.name}'s mixed_precision {combo_precision} -> {auto} (resolve_mixed_precision('auto'))")
        combo_precision = auto
    combo = config_speed_settings(config, combo_precision)
    D = f"(d) ours with {CONFIG.name}'s settings: " + ", ".join(x.split("=")[-1] for x in combo[:2])
    variants, skipped = {A: None, B: [], **OPTIONS, D: combo}, {}
    if hopeless:
        for name in [n for n, overrides in variants.items() if overrides and BF16 in overrides]:
            skipped[name] = f"skipped: bf16 is {speedup:.2f}x fp32 on this CPU (probe), a step would take minutes"
            print(f"{name}: {skipped[name]}")
            del variants[name]

    rng = random.Random(args.seed)
    rounds: dict[str, list[dict[str, tuple[float, float]]]] = {}  # variant -> per round: median (wall, CPU) s/step

    def run(name, overrides):
        if overrides is None:
            steps = diffusers_style_steps(config, copy.deepcopy(unet), ae, te, args.steps, args.warmup)
        else:
            steps = our_steps(config, ae, te, overrides, args.steps, args.warmup, out)
        return tuple(statistics.median(s[i] for s in steps) for i in (0, 1))

    for r in range(args.rounds):
        names = list(variants)
        rng.shuffle(names)
        medians = {name: run(name, variants[name]) for name in names}
        for name in names:
            rounds.setdefault(name, []).append(medians)
            print(f"  round {r + 1}: {name}: wall {medians[name][0]:.3f} s/step, CPU {medians[name][1]:.3f} s/step",
                  flush=True)

    print(f"\nPer variant: median step time over its rounds; speed-ups are the median over rounds of (a)'s time / the "
          f"variant's time in the same round (min-max in brackets); GFLOP/s from wall time ({args.threads} thread(s)).")
    print(f"{'variant':<52} {'wall s':>7} {'CPU s':>7} {'img/s':>6} {'vs (a), wall':>21} {'vs (a), CPU':>9} "
          f"{'GFLOP/s':>8} {'% fp32 pk':>9} {'% bf16 pk':>9}")
    for name in [A, B, *OPTIONS, D]:
        if name in skipped:
            print(f"{name:<52} {skipped[name]}")
            continue
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
    bf16_name = next(iter(OPTIONS))  # bf16 autocast with the attention product in fp32: what the trainer does on a CPU
    if bf16_name in rounds:
        ratios = [m[B][0] / m[bf16_name][0] for m in rounds[bf16_name]]
        print(f"mixed_precision auto picked {auto} (probe: bf16 {speedup:.2f}x fp32); in the trainer, bf16 ran at "
              f"{statistics.median(ratios):.2f}x fp32's speed ((b)'s wall time / the bf16 variant's, median over rounds)")
    else:
        print(f"mixed_precision auto picked {auto} (probe: bf16 {speedup:.2f}x fp32); bf16 not run in the trainer")


if __name__ == "__main__":
    main()
