"""One fine-tune step of the Stable Diffusion 1.5-size U-Net at 512 px on this CPU (issue 16, point 5).

    python bench/bench_finetune_full.py [--cases lora,full,full-no-ema] [--steps 2] [--warmup 1] [--json PATH]
    python bench/bench_finetune_full.py --quick          # a smoke run: 256 px, a U-Net 1/10 as wide

The U-Net is built from configs/ldm/sd-512.yaml with random weights (859.5M parameters; counted and
printed) for 64x64x4 latents (512x512 images at f = 8) and 77x768 text contexts, and trained the way
``ldm finetune`` trains it: ``train.unet.finetune.add_lora`` (no copy of the base weights since session 8: the
bundle's ``unet/`` is read from the adapted module, ``ldm.lora.AdapterBase``) or every weight trainable, then
``LDMTrainer.fit`` on a latent cache, at batch 1 (``FinetuneConfig`` defaults plus the case's overrides, below). The cache comes from four
procedural images (``ldm data shapes``, scaled up to 512 px) through a tiny f = 8 KL autoencoder and a
one-layer 768-wide open_clip text encoder, both random: what they compute does not change the cost of
a U-Net step, which reads only the cache.

Each case runs in its own process (so that its peak resident set, ``VmHWM`` of /proc/self/status, is
its own) and reports:

* s/step: the trainer's own ``step_s`` (train.csv, wall seconds per optimizer step, checkpoints and
  validation excluded), median of ``--steps`` steps after ``--warmup`` untimed ones, and its ``cpu_s``
  (this process's CPU seconds per step, all threads: on cores shared with other jobs the wall time
  grows with their load, the CPU time much less);
* peak RSS, and the RSS once the models are built (before the first step);
* FLOPs of one step, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward
  of the trainer's loss with the case's settings (so gradient checkpointing's recomputed forward is
  counted), and of one forward alone;
* the matmul rate of this machine in the same process (2048^3 fp32 and bf16 matmuls, best of 5,
  before the steps and after them) and the step's share of it (step FLOPs / s per step).

A guard thread stops a case whose resident set passes ``--max-rss-gib`` (it is reported as not
fitting), and before a full-size case the bench waits until ``--need-gib`` GiB are available (other
jobs share this machine). Mixed precision is ``auto``: bf16 autocast where train.run.precision's probe
finds it faster on this CPU (with the attention product in fp32, the trainer's CPU default), else fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the trainer's and the data builder's progress bars

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_train import matmul_peak as matmul_rate  # noqa: E402  (GFLOP/s of a 2048^3 matmul, best of 5; bench/ is sys.path[0])

CONFIG = ROOT / "configs" / "ldm" / "sd-512.yaml"
GIB = 1024**3

# Every case: batch 1, the precision train.run.precision picks on this CPU, the full learning rate from the
# first step (no warm-up: a step at lr 0 would cost the same, but would not be one), no checkpoints,
# validation or bundle during the timed steps (the run stops one step short of max_steps).
COMMON = ["train.batch_size=1", "train.mixed_precision=auto", "optim.warmup_steps=0", "train.log_every=1",
          "checkpoint.every=100000000",
          "validation.every=0", "validation.prompts=[]", "validation.heldout_batches=1"]
CKPT = "train.gradient_checkpointing=true"
# name -> (what it is, overrides of FinetuneConfig's defaults)
CASES = {
    "lora": ("LoRA (finetune default: rank 8 on to_q/k/v/out), gradient checkpointing", [CKPT]),
    "lora-no-ckpt": ("LoRA, no gradient checkpointing", []),
    "full": ("full fine-tune, AdamW (fused) + EMA (finetune defaults), gradient checkpointing",
             ["lora.method=full", CKPT]),
    "full-no-ema": ("full fine-tune, AdamW (fused), no EMA, gradient checkpointing",
                    ["lora.method=full", "ema.enabled=false", CKPT]),
}
DEFAULT_CASES = "lora,full,full-no-ema"


# -- memory ---------------------------------------------------------------------------------------------


def proc_status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


class RSSGuard:
    """Ends this process (exit status 3, ``result`` written with the error) when its resident set passes
    ``limit`` bytes, so that a case that does not fit stops before it starves the machine's other jobs."""

    def __init__(self, limit: int, result: Path, case: str):
        self.limit, self.result, self.case, self.phase = limit, result, case, "start"
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            rss = proc_status("VmRSS")
            if rss > self.limit:
                error = f"resident set passed the {self.limit / GIB:.1f} GiB guard ({rss / GIB:.1f} GiB) during {self.phase}"
                from ldm_io import write_text

                write_text(self.result, json.dumps({"case": self.case, "error": error}))
                print(f"{self.case}: {error}; stopped", flush=True)
                os._exit(3)
            time.sleep(0.05)


# -- one case, in this process --------------------------------------------------------------------------------


def frozen_parts(resolution: int):
    """A tiny random f = 8 KL autoencoder (4 latent channels) and a one-layer 768-wide open_clip text encoder
    (77 x 768 contexts, SD 1.x's shape)."""
    import vae
    from conditioning import build_text_encoder
    from ldm.testing import kl_autoencoder

    autoencoder = vae.Autoencoder(kl_autoencoder(seed=0, channels=(8, 16, 16, 16), sample_size=resolution))
    torch.manual_seed(0)
    text_encoder = build_text_encoder({"backend": "open_clip", "model_cfg": {
        "embed_dim": 768, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 1}}})
    return autoencoder, text_encoder


def run_case(args, case: str, work: Path, result: Path) -> dict:
    """Build the U-Net and the trainer as ``ldm finetune`` does, time the steps, count the FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.pipeline import SamplingConfig
    from ldm.schedule import NoiseSchedule
    from ldm.unet import build_unet
    from train.data.shapes import build_shapes_dataset
    from train.run.config import load_config
    from train.run.log import read_csv
    from train.unet.config import FinetuneConfig, LDMTrainConfig
    from train.unet.finetune import add_lora
    from train.unet.trainer import LDMTrainer

    guard = RSSGuard(int(args.max_rss_gib * GIB), result, case)
    try:  # should the machine run out of memory all the same, the kernel ends this process first, not another job
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    described, overrides = CASES[case]
    resolution = 256 if args.quick else 512
    record = {"case": case, "description": described, "resolution": resolution, "batch_size": 1,
              "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}

    guard.phase = "the matmul rate"
    rates = {"fp32": [matmul_rate(torch.float32)], "bf16": [matmul_rate(torch.bfloat16)]} if args.count else {}

    guard.phase = "the build"
    build_shapes_dataset(work / "data", side=64, n=4, seed=0)
    autoencoder, text_encoder = frozen_parts(resolution)
    model = load_config(LDMTrainConfig, CONFIG).model
    if args.quick:  # a U-Net 1/10 as wide (same blocks, depth and heads)
        model.block_out_channels = tuple(c // 10 for c in model.block_out_channels)
    torch.manual_seed(0)
    unet = build_unet(model, latent_channels=autoencoder.latent_channels, sample_size=resolution // 8,
                      cross_attention_dim=text_encoder.context_dim)
    record["parameters"] = sum(p.numel() for p in unet.parameters())
    print(f"{case}: U-Net {record['parameters'] / 1e6:.1f}M parameters ({CONFIG.name}"
          f"{', 1/10 width' if args.quick else ''}), latents 4x{resolution // 8}x{resolution // 8}, "
          f"contexts 77x{text_encoder.context_dim}", flush=True)
    steps = args.warmup + args.steps
    config = load_config(FinetuneConfig, None, [
        f"data.path={work / 'data'}", f"data.resolution={resolution}", f"cache.dir={work / 'cache'}",
        f"train.output_dir={work / 'run'}", f"train.max_steps={steps + 1}", *COMMON, *overrides, *args.set])
    record["overrides"] = [*COMMON, *overrides, *args.set]

    # as train.unet.finetune.finetune builds it
    if config.lora.method == "lora":
        add_lora(unet, config.lora, config.train.seed)
    else:
        unet.requires_grad_(True)
    record["trainable_parameters"] = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    schedule = NoiseSchedule("scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    trainer = LDMTrainer(config, unet=unet, autoencoder=autoencoder, text_encoder=text_encoder, schedule=schedule,
                         sampling=SamplingConfig(prediction="eps"), output_dir=config.train.output_dir,
                         lora=config.lora.method == "lora")
    record["rss_built"] = proc_status("VmRSS")

    guard.phase = "the training steps"
    t0 = time.perf_counter()
    trainer.fit(stop_at_step=steps)
    record["fit_s"] = time.perf_counter() - t0
    record["precision"] = trainer.accelerator.precision
    rows = read_csv(Path(config.train.output_dir) / "logs" / "train.csv")
    record["step_s_all"] = [float(r["step_s"]) for r in rows]
    record["step_s"] = statistics.median(record["step_s_all"][args.warmup:])
    # CPU seconds of this process per step, all its threads: what the step costs whatever else runs beside it
    record["cpu_s_all"] = [float(r["cpu_s"]) for r in rows]
    record["cpu_s"] = statistics.median(record["cpu_s_all"][args.warmup:])
    record["losses"] = [float(r["loss"]) for r in rows]
    record["skipped_steps"] = int(rows[-1]["skipped_steps"])
    # what the optimizer keeps (AdamW: two moments per trained weight), so that the peak includes it
    record["optimizer_state_numel"] = sum(t.numel() for state in trainer.optimizer.state.values()
                                          for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    record["peak_rss"] = proc_status("VmHWM")  # the steps' peak (the build's is lower)
    if not args.count:
        return record

    guard.phase = "the FLOP count"
    batch = trainer.order.batch(0, 0)
    with FlopCounterMode(display=False) as counter:
        trainer.accelerator.backward(trainer._loss(batch, 0))
    trainer.optimizer.zero_grad(set_to_none=True)
    record["flops_step"] = counter.get_total_flops()  # forward + backward as executed (recompute included)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        trainer._loss(batch, 0)
    record["flops_forward"] = counter.get_total_flops()

    guard.phase = "the matmul rate"
    rates["fp32"].append(matmul_rate(torch.float32))
    rates["bf16"].append(matmul_rate(torch.bfloat16))
    record["matmul_gflops"] = rates  # [before the steps, after them]
    record["loadavg_end"] = os.getloadavg()
    record["peak_rss_final"] = proc_status("VmHWM")
    return record


# -- the parent: one process per case ------------------------------------------------------------------------


def wait_for_memory(need_gib: float, wait_max_s: float) -> None:
    start = time.perf_counter()
    while available_bytes() < need_gib * GIB:
        if time.perf_counter() - start > wait_max_s:
            raise SystemExit(f"waited {wait_max_s:.0f} s for {need_gib} GiB of available memory; "
                             f"{available_bytes() / GIB:.1f} GiB are; give --need-gib 0 to run anyway")
        print(f"  {available_bytes() / GIB:.1f} GiB available, waiting for {need_gib} GiB (other jobs share this "
              "machine) ...", flush=True)
        time.sleep(60)


def summarise(r: dict) -> dict:
    """Derived figures of one case: achieved GFLOP/s and its share of the measured matmul rates."""
    rates = {k: statistics.mean(v) for k, v in r["matmul_gflops"].items()}
    achieved = r["flops_step"] / r["step_s"] / 1e9
    return {"achieved_gflops": achieved, "share_fp32_matmul": achieved / rates["fp32"],
            "share_bf16_matmul": achieved / rates["bf16"], "matmul_gflops_mean": rates}


# published dense bf16 peaks (TFLOP/s) and the utilisation range assumed for the computed GPU times
GPUS = {"H100 SXM": 989.0, "A100": 312.0}
UTILISATION = (0.35, 0.50)


def gpu_estimates(r: dict) -> dict:
    """COMPUTED (not measured) milliseconds per image (at the case's resolution) of this case's step on GPUs: FLOPs per image /
    (peak x utilisation), with and without gradient checkpointing (without it, one forward fewer: the
    recompute; FlopCounterMode counted the step as executed here)."""
    ckpt = CKPT in r["overrides"]
    flops = {"checkpointing": r["flops_step"] if ckpt else r["flops_step"] + r["flops_forward"],
             "no checkpointing": r["flops_step"] - r["flops_forward"] if ckpt else r["flops_step"]}
    return {"tflop_per_image": {k: v / 1e12 for k, v in flops.items()},
            "ms_per_image": {f"{gpu}, {k}": [1e3 * v / (peak * 1e12 * u) for u in UTILISATION]
                             for gpu, peak in GPUS.items() for k, v in flops.items()}}


def print_gpu_estimates(records: list[dict]) -> None:
    rows = [r for r in records if "flops_step" in r]
    if not rows:
        return
    lo, hi = (f"{100 * u:.0f}%" for u in UTILISATION)
    print(f"\nCOMPUTED, not measured: ms per {rows[0]['resolution']} px image on GPUs = counted FLOPs / (published dense bf16 peak x "
          f"{lo}-{hi} utilisation; {', '.join(f'{g} {p:.0f} TFLOP/s' for g, p in GPUS.items())}); a step of batch B "
          "takes B times as long")
    for r in rows:
        e = r["gpu_estimates"] = gpu_estimates(r)
        flops = ", ".join(f"{k} {v:.2f}" for k, v in e["tflop_per_image"].items())
        print(f"  {r['case']}: TFLOP per image: {flops}")
        for name, (slow, fast) in e["ms_per_image"].items():
            print(f"    {name:<34} {fast:6.1f}-{slow:.1f} ms per image")


def print_table(records: list[dict]) -> None:
    print(f"\n{'case':<14} {'params':>7} {'trained':>9} {'prec':>5} {'s/step':>8} {'steps (s)':>22} {'CPU s':>6} {'built GiB':>9} "
          f"{'peak GiB':>8} {'TFLOP/step':>10} {'GFLOP/s':>8} {'fp32 mm':>8} {'bf16 mm':>8} {'% fp32':>6} {'% bf16':>6}")
    for r in records:
        if "error" in r:
            print(f"{r['case']:<14} did not fit: {r['error']}")
            continue
        each = ", ".join(f"{x:.1f}" for x in r["step_s_all"])
        line = (f"{r['case']:<14} {r['parameters'] / 1e6:>6.1f}M {r['trainable_parameters'] / 1e6:>8.2f}M "
                f"{r['precision']:>5} {r['step_s']:>8.1f} {each:>22} {r['cpu_s']:>6.1f} {r['rss_built'] / GIB:>9.2f} "
                f"{r['peak_rss'] / GIB:>8.2f}")
        if "flops_step" in r:
            s = r["summary"] = summarise(r)
            mm = s["matmul_gflops_mean"]
            line += (f" {r['flops_step'] / 1e12:>10.2f} {s['achieved_gflops']:>8.1f} {mm['fp32']:>8.0f} {mm['bf16']:>8.0f} "
                     f"{100 * s['share_fp32_matmul']:>5.0f}% {100 * s['share_bf16_matmul']:>5.0f}%")
        print(line)
    print("\ns/step: wall, median of the steps after the warm-up (all steps listed, warm-up first); CPU s: the "
          "process's CPU seconds per step (median, all threads); peak: VmHWM of the "
          "case's process; TFLOP/step: one forward + backward as executed (FlopCounterMode); GFLOP/s: TFLOP/step / "
          "s/step; fp32 mm, bf16 mm: 2048^3 matmul GFLOP/s in the same process (mean of before and after the "
          "steps); %: the step's share of them.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, from: {', '.join(CASES)} "
                   f"(default {DEFAULT_CASES})")
    p.add_argument("--quick", action="store_true", help="smoke run: 256 px (32x32x4 latents), U-Net 1/10 as wide")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a FinetuneConfig override added to every case (repeatable), e.g. --set optim.implementation=for-loop")
    p.add_argument("--max-rss-gib", type=float, default=20.0,
                   help="stop a case whose resident set passes this (reported as not fitting); default 20")
    p.add_argument("--need-gib", type=float, default=None,
                   help="before each case wait until this much memory is available (default 21 at full size, 0 with --quick)")
    p.add_argument("--wait-max-s", type=float, default=1800, help="give up waiting for memory after this long")
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "bench-finetune-full.json", help="where the figures go")
    p.add_argument("--no-count", dest="count", action="store_false",
                   help="time and measure memory only: no FLOP count, no matmul rates (tests/test_full_size.py)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run this case here
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")

    if args.child is not None:
        from ldm_io import write_text

        work = Path(tempfile.mkdtemp(prefix=f"bench-ft-{args.child}-"))
        try:
            record = run_case(args, args.child, work, args.result)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_text(args.result, json.dumps(record))
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise SystemExit(f"--cases {args.cases}: unknown {', '.join(unknown) or '(none given)'}; allowed: {', '.join(CASES)}")
    need = args.need_gib if args.need_gib is not None else (0.0 if args.quick else 21.0)
    from ldm_io import write_text
    from train.run.precision import cpu_model, resolve_mixed_precision

    started = time.perf_counter()
    precision = resolve_mixed_precision("auto", torch.device("cpu"), log=print)
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} (other jobs share this machine); {'QUICK (smoke) run' if args.quick else 'full size'}")
    records = []
    for case in cases:
        wait_for_memory(need, args.wait_max_s)
        print(f"\n== {case}: {CASES[case][0]}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--result", str(result),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--max-rss-gib", str(args.max_rss_gib),
                   *(["--quick"] if args.quick else []), *([] if args.count else ["--no-count"]),
                   *[f"--set={s}" for s in args.set]]
            t0 = time.perf_counter()
            rc = subprocess.run(cmd).returncode
            if result.is_file():
                record = json.loads(result.read_text())
            else:
                record = {"case": case, "error": f"the case's process ended with status {rc} and no result"}
        record["wall_s"] = time.perf_counter() - t0
        if "error" not in record:
            print(f"{case}: {record['step_s']:.1f} s/step, peak RSS {record['peak_rss'] / GIB:.2f} GiB "
                  f"({record['wall_s']:.0f} s)", flush=True)
        records.append(record)
    print_table(records)
    print_gpu_estimates(records)
    out = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "mixed_precision_auto": precision, "note": "measured under load from other jobs"},
           "quick": args.quick, "cases": records}
    write_text(args.json, json.dumps(out, indent=1))
    print(f"\nfigures written to {args.json}; bench wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
