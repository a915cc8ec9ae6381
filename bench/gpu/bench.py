"""The GPU measurements of bench/gpu/run.sh, one stage per process (so each is time-boxed on its own), and the
table that gathers them.

    python bench/gpu/bench.py --stage matmul  --part DIR/matmul.json          # bf16 matmul rate, TFLOP/s
    python bench/gpu/bench.py --stage train   --part DIR/train.json           # training images/s and MFU
    python bench/gpu/bench.py --stage sample  --batch 8 [--compile] --part DIR/sample-b8-eager.json
    python bench/gpu/bench.py --stage table   --parts DIR [--out OUT]         # print; OUT/gpu-bench.{json,md}

Model: configs/ldm/sd-512.yaml's U-Net (859.5M parameters, SD 1.x) with random weights on 64x64x4 latents
(512 px at f = 8) and 77 x 768 contexts; the cached latents and contexts are synthetic (random tensors on the
device, as a latent cache would hand them over). The training step is the trainer's (train.unet.trainer):
noised_batch, caption dropout, the U-Net under bf16 autocast, weighted_mse, gradient clipping and the config's
AdamW, with the config's gradient checkpointing and channels_last. MFU = images/s x model FLOPs per image
(forward + backward as torch.utils.flop_counter counts them, without checkpointing's recompute) over the bf16
matmul rate measured in the same run. Sampling: DDIM with classifier-free guidance (one U-Net call on
[uncond, cond] per step) in fp16 through ldm.backends.TorchBackend, eager or torch.compile'd; it/s = sampler
steps per second.

--device cpu --tiny runs the same code on configs/ldm/tiny.yaml's U-Net (8x8 latents) in seconds: the CPU
check that tests/test_gpu.py runs so this script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ANCHORS = {
    "train": "MosaicML SD2 training: ~36 images/s per A100 at 512 px, ~23% MFU",
    "sample": "TensorRT SD 1.5: ~61 it/s on an A100 (512 px, batch 1, CFG)",
    "matmul": "H100 SXM datasheet: ~990 dense bf16 TFLOP/s (A100: 312)",
}
STAGES = ["matmul", "train", "train compiled", "train b16 no checkpointing", "train cudnn benchmark",
          "train b32 no checkpointing", "sample b1 eager", "sample b8 eager", "sample b1 compiled", "sample b8 compiled"]
ANCHORED = ("matmul", "train", "sample b1 eager", "sample b1 compiled")  # rows the anchors compare with


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def setup(args):
    """(config, device, latent side, context width, context length) for the chosen size."""
    from train.run.config import load_config
    from train.unet.config import LDMTrainConfig

    config = load_config(LDMTrainConfig, ROOT / "configs" / "ldm" / ("tiny.yaml" if args.tiny else "sd-512.yaml"), [])
    side = 8 if args.tiny else config.data.resolution // 8  # f = 8 (SD's AutoencoderKL); tiny: 8x8 latents
    width = config.model.cross_attention_dim or 32
    return config, torch.device(args.device), side, width, 77


def matmul(args) -> dict:
    device = torch.device(args.device)
    n = 256 if args.tiny else 8192
    g = torch.Generator(device).manual_seed(0)
    # random operands (zeros run faster than real data), several pairs so the timing is not of one cached pair
    pairs = [(torch.randn(n, n, device=device, generator=g, dtype=torch.bfloat16),
              torch.randn(n, n, device=device, generator=g, dtype=torch.bfloat16)) for _ in range(3)]
    for a, b in pairs:
        a @ b
    times = []
    for i in range(3 if args.tiny else 12):
        a, b = pairs[i % len(pairs)]
        times.append(timed(lambda: a @ b, device))
    seconds = sorted(times)[len(times) // 2]
    return {"stage": "matmul", "status": "ok", "tflops": 2 * n**3 / seconds / 1e12, "n": n, "dtype": "bf16",
            "device": device_name(device)}


def build(config, side: int, width: int, device: torch.device):
    from ldm.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet(config.model, latent_channels=4, sample_size=side, cross_attention_dim=width)
    return unet.to(device)


def train_flops_per_image(unet, side: int, width: int, length: int, device: torch.device) -> int:
    """Forward + backward FLOPs of one image (batch 1, bf16 autocast), as torch's flop counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn(1, 4, side, side, device=device)
    ctx = torch.randn(1, length, width, device=device)
    t = torch.tensor([500], device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = unet(z, t, encoder_hidden_states=ctx).sample
        out.float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def train(args) -> dict:
    import conditioning
    from ldm.schedule import NoiseSchedule
    from train.run.lr import build_optimizer
    from train.unet.objective import noised_batch, weighted_mse

    config, device, side, width, length = setup(args)
    run = config.train
    batch = args.batch or run.batch_size
    checkpointing = run.gradient_checkpointing if args.checkpointing is None else args.checkpointing
    unet = build(config, side, width, device)
    params = sum(p.numel() for p in unet.parameters())
    flops = train_flops_per_image(unet, side, width, length, device)  # before checkpointing: no recompute counted
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if run.channels_last:
        unet.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = run.allow_tf32
        torch.backends.cudnn.allow_tf32 = run.allow_tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    unet.train()
    if args.compile:  # as train.compile=true does it
        from ldm.backends import compile_in_place

        compile_in_place(unet, device)
    optimizer = build_optimizer([{"params": [p for p in unet.parameters() if p.requires_grad]}], config.optim)
    s = config.schedule
    schedule = NoiseSchedule(s.beta_schedule, s.num_train_timesteps, s.beta_start, s.beta_end)
    g = torch.Generator(device).manual_seed(0)
    # the synthetic cache: 4 batches of latents (float32) and contexts (stored float16, as sd-512.yaml's cache does)
    cache_z = torch.randn(4 * batch, 4, side, side, device=device, generator=g)
    cache_ctx = torch.randn(4 * batch, length, width, device=device, generator=g).half()
    empty = torch.randn(1, length, width, device=device, generator=g)
    step_no = [0]

    def step(mark=lambda phase: None):
        rows = slice((step_no[0] % 4) * batch, (step_no[0] % 4 + 1) * batch)
        step_no[0] += 1
        z0 = cache_z[rows]
        if run.channels_last:
            z0 = z0.contiguous(memory_format=torch.channels_last)
        ctx = conditioning.apply_caption_dropout(cache_ctx[rows].float(), empty, config.objective.p_uncond, g)
        nb = noised_batch(z0, schedule, prediction=config.objective.prediction,
                          min_snr_gamma=config.objective.min_snr_gamma, noise_offset=config.objective.noise_offset,
                          generator=g)
        mark("batch")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = unet(nb.z_t, nb.t, encoder_hidden_states=ctx).sample
        loss = weighted_mse(pred, nb)
        mark("forward")
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.optim.max_grad_norm or float("inf"))
        mark("clip")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        return loss

    warm = sum(timed(step, device) for _ in range(1 if args.tiny else 3))  # kernels, allocator, optimizer state, compile
    steps, spent = 0, 0.0
    while steps < (2 if args.tiny else 5) or spent < args.seconds:
        spent += timed(step, device)
        steps += 1
    images_per_s = steps * batch / spent
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"stage": "train", "status": "ok", "images_per_s": images_per_s, "train_flops_per_image": flops,
           "batch": batch, "gradient_checkpointing": checkpointing, "channels_last": run.channels_last,
           "parameters": params, "latents": [4, side, side], "steps_timed": steps, "seconds": spent,
           "peak_memory_gib": memory, "precision": "bf16 autocast", "compile": args.compile, "warmup_s": warm,
           "cudnn_benchmark": args.cudnn_benchmark, "device": device_name(device)}
    if args.profile:
        row["phases_ms"] = phases(step, device)
        row.update(profile(step, device))
    return row


def phases(step, device: torch.device, steps: int = 3) -> dict:
    """Milliseconds per step in each phase (batch, forward, backward, clip, optimizer), the device synchronised at
    each phase's end, median over ``steps`` steps: where a slow step's time goes."""
    spans: dict[str, list[float]] = {}
    for _ in range(steps):
        sync(device)
        last = [time.perf_counter()]

        def mark(phase: str) -> None:
            sync(device)
            now = time.perf_counter()
            spans.setdefault(phase, []).append(1e3 * (now - last[0]))
            last[0] = now

        step(mark)
    return {phase: round(sorted(v)[len(v) // 2], 2) for phase, v in spans.items()}


def profile(step, device: torch.device, steps: int = 2) -> dict:
    """torch.profiler over ``steps`` more steps: how busy the device was (its kernels' time over the wall time:
    far under 1 means the step waits on the host) and the 30 costliest operators, as a text table."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        wall = sum(timed(step, device) for _ in range(steps))
    events = prof.key_averages()
    if device.type == "cuda":
        key = "device_time_total" if hasattr(events[0], "self_device_time_total") else "cuda_time_total"
        # the kernels alone (the rows of the device's own events): an operator's row holds its kernels' time again,
        # and summing both counted it twice (the 2026-11-27 H200 run printed 140-185% busy)
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        busy = sum(getattr(e, "self_" + key) for e in kernels) / 1e6 / wall  # microseconds of kernels / wall seconds
    else:
        key, busy = "cpu_time_total", None
    # sorted by the operators' own time (not counting the operators they call): the kernels the step pays for
    return {"device_busy": busy, "profile": events.table(sort_by="self_" + key, row_limit=30)}


def sample(args) -> dict:
    from ldm.backends import TorchBackend
    from ldm.guidance import ClassifierFreeGuidance
    from ldm.samplers import sample as run_sampler
    from ldm.schedule import NoiseSchedule

    config, device, side, width, length = setup(args)
    name = f"sample b{args.batch} {'compiled' if args.compile else 'eager'}"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = build(config, side, width, device).to(dtype).eval()
    backend = TorchBackend(unet, None, compile=args.compile)
    g = torch.Generator(device).manual_seed(0)
    cond = torch.randn(args.batch, length, width, device=device, generator=g, dtype=dtype)
    uncond = torch.randn(args.batch, length, width, device=device, generator=g, dtype=dtype)
    s = config.schedule
    schedule = NoiseSchedule(s.beta_schedule, s.num_train_timesteps, s.beta_start, s.beta_end)

    def model(x, t, c):
        return backend.unet(x.to(dtype), t, c.to(dtype)).float()

    denoise = ClassifierFreeGuidance(model, cond, uncond, 7.5)
    x_T = torch.randn(args.batch, 4, side, side, device=device, generator=g)

    def loop(steps: int):
        with torch.no_grad():
            return run_sampler(denoise, x_T, schedule, method="ddim", steps=steps)

    warm = timed(lambda: loop(3), device)  # compiles here (when compiling), then kernel selection
    steps = 3 if args.tiny else 10
    spent = timed(lambda: loop(steps), device)
    while not args.tiny and spent < args.seconds and steps < 400:  # long enough to time, within the stage's box
        steps = min(400, max(steps * 2, int(steps * args.seconds / max(spent, 1e-3))))
        spent = timed(lambda: loop(steps), device)
    out = loop(3)
    return {"stage": name, "status": "ok" if torch.isfinite(out).all() else "non-finite output",
            "it_per_s": steps / spent, "batch": args.batch, "unet_batch": 2 * args.batch, "steps_timed": steps,
            "warmup_s": warm, "dtype": str(dtype).replace("torch.", ""), "compile": args.compile,
            "device": device_name(device)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from train.run.precision import cpu_model

    return cpu_model()


# -- the table ----------------------------------------------------------------------------------------


def render(r: dict) -> tuple[str, str]:
    """(result, settings) cells of a row."""
    if r.get("status") != "ok":
        return r.get("summary") or r.get("status", "?"), r.get("settings", "")
    if "tflops" in r:
        tflops = f"{r['tflops']:.0f}" if r["tflops"] >= 10 else f"{r['tflops']:.3g}"
        return f"{tflops} TFLOP/s", f"{r['n']}^3 bf16, median"
    if "images_per_s" in r:
        mfu = f", MFU {r['mfu']:.1%}" if "mfu" in r else ""
        settings = (f"batch {r['batch']}, bf16, {r['train_flops_per_image'] / 1e12:.3g} TFLOP/image (fwd+bwd), "
                    f"checkpointing {'on' if r['gradient_checkpointing'] else 'off'}")
        if r.get("peak_memory_gib"):
            settings += f", peak {r['peak_memory_gib']:.0f} GiB"
        if r.get("compile"):
            settings += f", compile + warm-up {r['warmup_s']:.0f} s"
        if r.get("cudnn_benchmark"):
            settings += ", cudnn.benchmark"
        if r.get("phases_ms"):
            settings += ", ms per phase: " + " ".join(f"{k} {v:.0f}" for k, v in r["phases_ms"].items())
        if r.get("device_busy") is not None:
            settings += f", GPU busy {r['device_busy']:.0%} of the step (profile in gpu-bench.json)"
        return f"{r['images_per_s']:.3g} images/s{mfu}", settings
    if "it_per_s" in r:
        speed = f" ({r['speedup_vs_eager']:.2f}x eager)" if "speedup_vs_eager" in r else ""
        settings = f"DDIM + CFG, U-Net batch {r['unet_batch']}, {r['dtype']}"
        if r.get("compile"):
            settings += f", compile + warm-up {r['warmup_s']:.0f} s"
        return f"{r['it_per_s']:.3g} it/s{speed}", settings
    return r.get("summary", "ok"), r.get("settings", "")


def table(parts: Path, out: str | None) -> str:
    """The rows of every part in ``parts`` (STAGES first, then any others), MFU and compile speed-ups filled in."""
    rows = []
    for stage in STAGES:
        path = parts / (stage.replace(" ", "-") + ".json")
        rows.append(json.loads(path.read_text()) if path.is_file() else {"stage": stage, "status": "not run"})
    known = {stage.replace(" ", "-") for stage in STAGES}
    rows += [json.loads(path.read_text()) for path in sorted(parts.glob("*.json")) if path.stem not in known]
    by = {r["stage"]: r for r in rows}
    rate = by["matmul"].get("tflops") if by["matmul"].get("status") == "ok" else None
    for r in rows:
        if r.get("status") == "ok" and "images_per_s" in r and rate:
            r["mfu"] = r["images_per_s"] * r["train_flops_per_image"] / (rate * 1e12)
    for b in (1, 8):
        eager, compiled = by[f"sample b{b} eager"], by[f"sample b{b} compiled"]
        if eager.get("status") == "ok" and compiled.get("status") == "ok":
            compiled["speedup_vs_eager"] = compiled["it_per_s"] / eager["it_per_s"]
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    lines = [f"GPU bench on {device} (bench/gpu/run.sh)", "",
             "| stage | result | settings | anchor |", "| --- | --- | --- | --- |"]
    for r in rows:
        result, settings = render(r)
        anchor = ANCHORS.get(r["stage"].split()[0], "") if r["stage"] in ANCHORED else ""
        lines.append(f"| {r['stage']} | {result} | {settings} | {anchor} |")
    text = "\n".join(lines)
    if out:
        from ldm_io import write_text

        Path(out).mkdir(parents=True, exist_ok=True)
        write_text(Path(out) / "gpu-bench.json", json.dumps({"device": device, "rows": rows}, indent=2))
        write_text(Path(out) / "gpu-bench.md", text + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["matmul", "train", "sample", "table"], required=True)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the CPU check)")
    p.add_argument("--tiny", action="store_true", help="configs/ldm/tiny.yaml's U-Net at 8x8 latents: seconds on a CPU")
    p.add_argument("--batch", type=int, default=None, help="train: images per step (default the config's); sample: prompts")
    p.add_argument("--checkpointing", type=lambda v: v == "on", default=None, metavar="on|off",
                   help="train: gradient checkpointing (default the config's)")
    p.add_argument("--compile", action="store_true",
                   help="sample: the U-Net through torch.compile; train: compiled in place, as train.compile=true")
    p.add_argument("--profile", action="store_true",
                   help="train: also profile two steps (the row gets device_busy and a table of the costliest operators)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="train: torch.backends.cudnn.benchmark on (cuDNN times its convolution algorithms at start)")
    p.add_argument("--seconds", type=float, default=10.0, help="time each measurement for about this long")
    p.add_argument("--part", type=Path, help="write this stage's row here (JSON)")
    p.add_argument("--name", default=None, help="the row's name (default: the stage's), e.g. for a second train row")
    p.add_argument("--parts", type=Path, help="table: the folder of parts")
    p.add_argument("--out", default=None, help="table: also write gpu-bench.json and gpu-bench.md here")
    args = p.parse_args(argv)
    if args.stage == "table":
        print(table(args.parts, args.out))
        return 0
    if args.stage == "sample" and args.batch is None:
        args.batch = 1
    stage = {"matmul": matmul, "train": train, "sample": sample}[args.stage]
    try:
        row = stage(args)
    except torch.cuda.OutOfMemoryError as exc:
        row = {"status": f"out of memory ({str(exc).splitlines()[0][:80]})"}
    row["stage"] = args.name or row.get("stage") or (
        "sample b%d %s" % (args.batch, "compiled" if args.compile else "eager") if args.stage == "sample" else args.stage)
    print(json.dumps(row))
    if args.part:
        from ldm_io import write_text

        args.part.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.part, json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
