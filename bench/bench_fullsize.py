"""The mission's full size on this CPU: one CFG sampling step at 512x512, ours vs diffusers (issue 17, point 4).

A Stable Diffusion 1.5-size folder in diffusers' layout is built once with random weights: the U-Net from
configs/ldm/sd-512.yaml (859.5M parameters, 64x64x4 latents), SD's AutoencoderKL (f = 8, 83.7M), a CLIP
ViT-L/14 text encoder (CLIPTextModel, 123M, 77x768 contexts) and CLIP's BPE tokenizer. Then each case runs in
its own process (so that its peak resident set, VmHWM, is its own), with the same prompt, seed and DDIM steps:

    diffusers   StableDiffusionPipeline (fp32, its default SDPA attention)
    torch       ours, Text2ImagePipeline(backend="torch")
    onnx        ours, backend="onnx" (ONNX Runtime; the graph, 3.4 GB, has its weights in external data)
    openvino    ours, backend="openvino" (f32), when the openvino package is installed

Each case runs ``--steps`` steps (the ONNX Runtime / OpenVINO session is made before them, timed apart); a
step's time is the time from the previous step's callback (the first: from the call, so it includes the
prompt's encoding, well under 1% of a step here) to its own: one batched U-Net call on [uncond, cond] +
CFG + the DDIM update. ``--threads`` sets torch's, ONNX Runtime's and OpenVINO's threads alike. The matmul
rate (a 2048^3 fp32 matmul, best of 5) is measured in the same process just before and after, and a step's
share of it is (U-Net FLOPs / step time) / (the mean of the two rates): on a machine shared with other jobs that share moves
less than the seconds do. The ONNX graphs are exported (and ONNX Runtime's optimised graph saved) in a
process of their own first ("export"), timed apart. Every case's final latents are compared with
diffusers'. Prints a table and writes runs/bench-fullsize.json.

    python bench/bench_fullsize.py [--steps 2] [--cases diffusers,torch,onnx,openvino] [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_finetune_full import GIB, RSSGuard, proc_status, wait_for_memory  # noqa: E402  (bench/ is sys.path[0])
from bench_train import matmul_peak as matmul_rate  # noqa: E402

CONFIG = ROOT / "configs" / "ldm" / "sd-512.yaml"
PROMPT = "a photograph of an astronaut riding a horse"
CASES = ("diffusers", "torch", "onnx", "openvino")
GUIDANCE = 7.5
SIZE = 512


def build_folder(folder: Path, quick: bool = False) -> None:
    """The SD 1.5-size diffusers folder (random weights, seed 0), written atomically; ``quick``: a smoke-test
    model (U-Net 1/10 as wide, a small autoencoder, a one-layer text encoder) with the same structure."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.testing import write_sd_folder_rest
    from ldm.unet import build_unet
    from ldm_io import atomic_directory
    from train.run.config import load_config
    from train.unet.config import LDMTrainConfig

    with atomic_directory(folder) as tmp:
        torch.manual_seed(0)
        model = load_config(LDMTrainConfig, CONFIG).model
        if quick:
            model.block_out_channels = tuple(c // 10 for c in model.block_out_channels)
        unet = build_unet(model, latent_channels=4, sample_size=SIZE // 8, cross_attention_dim=768)
        unet.save_pretrained(tmp / "unet")
        del unet
        AutoencoderKL(  # Stable Diffusion's (runwayml/stable-diffusion-v1-5 vae/config.json)
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,) * 4 if quick else (128, 256, 512, 512),
            layers_per_block=1 if quick else 2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32, sample_size=SIZE, scaling_factor=0.18215,
        ).save_pretrained(tmp / "vae")
        CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower, as in SD 1.x
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=1 if quick else 12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        )).save_pretrained(tmp / "text_encoder")
        write_sd_folder_rest(tmp)


def unet_flops(folder: Path) -> tuple[int, float]:
    """(parameters, FLOPs of one batch-2 U-Net call at 64x64x4 with 77x768 contexts), counted by
    torch.utils.flop_counter on a copy of the U-Net on the meta device (no weights, no compute)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(folder / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).eval()
        x, t, c = torch.zeros(2, 4, SIZE // 8, SIZE // 8), torch.zeros(2), torch.zeros(2, 77, 768)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, t, encoder_hidden_states=c)
    return sum(p.numel() for p in unet.parameters()), counter.get_total_flops()


def run_case(case: str, folder: Path, steps: int, out: Path) -> dict:
    """One case in this process: load, warm up, time ``steps`` steps; the final latents go to ``out``.npy."""
    import numpy as np

    record = {"case": case, "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    rates = [matmul_rate(torch.float32)]
    t0 = time.perf_counter()
    if case == "diffusers":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)

        def run(n, stamps):
            def done(p, i, t, kwargs):
                stamps.append(time.perf_counter())
                return kwargs

            return pipe(PROMPT, num_inference_steps=n, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0),
                        output_type="latent", height=SIZE, width=SIZE, callback_on_step_end=done).images  # (1, 4, 64, 64)
    else:
        from ldm.pipeline import Text2ImagePipeline

        pipe = Text2ImagePipeline.from_pretrained(folder, backend="torch" if case == "export" else case)
        if case == "export":  # the graph (external data), then ONNX Runtime's optimised copy of it
            from ldm.onnx_backend import OnnxBackend, session

            backend = OnnxBackend.for_modules(pipe.unet, pipe.autoencoder, pipe.text_encoder, str(folder))
            path = backend.graphs.unet_graph((4, SIZE // 8, SIZE // 8))
            record["export_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            session(path)
            record["optimise_s"] = time.perf_counter() - t1
            record["peak_rss"] = proc_status("VmHWM")
            return record
        req = pipe.request(PROMPT, None, 0, 1)
        if case in ("onnx", "openvino"):  # the session (graph loading, optimisation or compilation) before the steps
            t1 = time.perf_counter()
            pipe.backend._session(pipe.backend.graphs.unet_graph, (4, SIZE // 8, SIZE // 8))
            record["session_s"] = time.perf_counter() - t1

        def run(n, stamps):
            return pipe.generate_latents(req, steps=n, guidance=GUIDANCE, height=SIZE, width=SIZE, batch_size=1,
                                         progress=lambda i, total: stamps.append(time.perf_counter()))
    record["load_s"] = time.perf_counter() - t0
    stamps = [time.perf_counter()]
    latents = run(steps, stamps)
    record["step_s"] = [b - a for a, b in zip(stamps, stamps[1:])]
    rates.append(matmul_rate(torch.float32))
    record["matmul_gflops"] = rates
    record["peak_rss"] = proc_status("VmHWM")
    record["loadavg_end"] = os.getloadavg()
    np.save(out.with_suffix(".npy"), latents.float().numpy())
    return record


def child(args) -> None:
    from ldm_io import write_text

    guard = RSSGuard(int(args.max_rss_gib * GIB), args.result, args.child)
    try:  # should memory run out all the same, the kernel ends this process first, not another job
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    guard.phase = args.child
    try:
        record = run_case(args.child, args.folder, args.steps, args.result)
    except Exception as e:  # recorded for the table, then raised
        write_text(args.result, json.dumps({"case": args.child, "error": f"{type(e).__name__}: {e}"}))
        raise
    write_text(args.result, json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=ROOT / "runs" / "bench-fullsize" / "sd15-random",
                        help="the SD 1.5-size folder; built there when missing (4.3 GB, plus 3.4 GB of ONNX graph)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per case (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="threads of every case (default: torch's)")
    parser.add_argument("--max-rss-gib", type=float, default=14.0, help="a case passing this resident set is stopped")
    parser.add_argument("--need-gib", type=float, default=14.0, help="wait for this much available memory before each case")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-fullsize.json")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run on a small model of the same structure (U-Net 1/10 as wide), in its own folder")
    parser.add_argument("--child", choices=("export", *CASES), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    import numpy as np

    from ldm_io import write_text

    if args.quick:
        args.folder = args.folder.with_name(args.folder.name + "-quick")
        args.out = args.out.with_name(args.out.stem + "-quick.json")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        raise SystemExit(f"--cases: {bad[0]!r} is not a case; allowed: {', '.join(CASES)}")
    if "openvino" in cases:
        import importlib.util

        if importlib.util.find_spec("openvino") is None:
            print("openvino is not installed: that case is left out", flush=True)
            cases.remove("openvino")
    if not (args.folder / "model_index.json").is_file():
        print(f"building the SD 1.5-size folder in {args.folder} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                        f"from bench_fullsize import build_folder; from pathlib import Path; build_folder(Path({str(args.folder)!r}), {args.quick})"],
                       check=True)
        print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    parameters, flops = unet_flops(args.folder)
    print(f"U-Net {parameters / 1e6:.1f}M parameters, {flops / 1e9:.0f} GFLOP per CFG step (batch 2, 64x64x4); "
          f"{torch.get_num_threads()} threads; DDIM, guidance {GUIDANCE}, {SIZE}x{SIZE}", flush=True)

    records = {}
    work = args.out.parent / args.out.stem
    work.mkdir(parents=True, exist_ok=True)
    order = (["export"] if {"onnx", "openvino"} & set(cases) else []) + cases
    for case in order:
        wait_for_memory(args.need_gib, 1800)
        result = work / f"{case}.json"
        result.unlink(missing_ok=True)
        print(f"{case} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", case, "--result", str(result), "--folder",
                               str(args.folder), "--steps", str(args.steps), "--max-rss-gib", str(args.max_rss_gib),
                               "--threads", str(torch.get_num_threads())],
                              capture_output=True, text=True)
        record = json.loads(result.read_text()) if result.is_file() else {"case": case, "error": proc.stderr[-2000:]}
        record["wall_s"] = time.perf_counter() - t0
        if proc.returncode and "error" not in record:
            record["error"] = proc.stderr[-2000:]
        records[case] = record
        print("  " + (record.get("error") or json.dumps({k: v for k, v in record.items() if k != "case"})), flush=True)

    ref = records.get("diffusers", {})
    ref_latents = np.load(work / "diffusers.npy") if "step_s" in ref else None
    print(f"\n{'case':<10} {'s/step':>8} {'x diffusers':>12} {'% of matmul':>12} {'peak RSS GiB':>13} "
          f"{'max|diff| vs diffusers':>23} {'load s':>7} {'session s':>10}")
    for case in cases:
        r = records[case]
        if "step_s" not in r:
            print(f"{case:<10} failed: {r.get('error', '')[-300:]}")
            continue
        s = min(r["step_s"])
        r["share_of_matmul"] = flops / s / (sum(r["matmul_gflops"]) / len(r["matmul_gflops"]) * 1e9)  # the mean of before and after
        if ref_latents is not None:
            lat = np.load(work / f"{case}.npy")
            r["max_abs_diff_vs_diffusers"] = float(np.abs(lat - ref_latents).max())
            r["max_abs_latent"] = float(np.abs(ref_latents).max())
            r["speedup_vs_diffusers"] = min(ref["step_s"]) / s
        print(f"{case:<10} {s:>8.2f} {r.get('speedup_vs_diffusers', float('nan')):>11.2f}x "
              f"{100 * r['share_of_matmul']:>11.0f}% {r['peak_rss'] / GIB:>13.2f} "
              f"{r.get('max_abs_diff_vs_diffusers', float('nan')):>23.2e} {r['load_s']:>7.1f} {r.get('session_s', 0):>10.1f}")
    if "export" in records and "export_s" in records["export"]:
        e = records["export"]
        print(f"ONNX export of the U-Net {e['export_s']:.0f} s, ONNX Runtime's optimisation (saved) {e['optimise_s']:.0f} s, "
              f"peak RSS {e['peak_rss'] / GIB:.2f} GiB")
    print("matmul rate (GFLOP/s, before/after, per case): "
          + "; ".join(f"{c} {r['matmul_gflops'][0]:.0f}/{r['matmul_gflops'][1]:.0f}" for c, r in records.items() if "matmul_gflops" in r)
          + f"; load average at the start: {os.getloadavg()[0]:.1f}")
    write_text(args.out, json.dumps({"parameters": parameters, "flops_per_step": flops, "size": SIZE,
                                     "guidance": GUIDANCE, "prompt": PROMPT, "records": records}, indent=2))


if __name__ == "__main__":
    main()
