"""Our backends against the machine's matmul rate, and our pipeline against diffusers', in one run.

Part 1, "share" (issue 17, point 3): the default model's U-Net (batch 1 with CFG, i.e. batch 2) and decoder
(batch 1), each way of running them this project tried, against the fp32 matmul rate (a 2048^3 torch
matmul) measured just before each, on the same threads. FLOPs are counted by torch.utils.flop_counter
(matmuls, convolutions and attention: 2 per multiply-add). In each round the variants run in a shuffled
order, and a variant's share of the matmul rate is its FLOP/s over the rate measured just before it, so a
slow spell of a shared machine hits both sides of the ratio; the table gives the median over rounds. Every
variant's outputs are compared with torch eager's, and its session start (graph optimisation,
compilation) is timed.

Part 2, "pipeline": a Stable Diffusion-layout folder (UNet2DConditionModel of
~18M parameters at 16x16x4 latents, AutoencoderKL f=4, CLIPTextModel, CLIP's real BPE tokenizer)
is built from configs with random weights and loaded by both pipelines. DDIM, the same steps and
guidance, the same per-image seeds. Prints images/s at batch 1 and 8 for diffusers, ours with the
torch backend and ours with the ONNX Runtime backend, the pixel differences against diffusers, and
the share of our time spent inside U-Net and decoder calls. "onnx, previous" is ONNX Runtime at the
graph optimisation level the backend used before (all, NCHWc layout); "onnx" is the backend's default now.

    python bench/bench_pipeline.py [--part share,pipeline] [--rounds 5] [--steps 25] [--repeats 3]
                                   [--threads N] [--folder /tmp/tiny-sd]
"""

from __future__ import annotations

import argparse
import copy
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "a koala wearing a red hat, twemoji style"


# -- part 1: the default model against the matmul rate -------------------------------------------------------


def matmul_rate(threads: int, n: int = 2048) -> float:
    """FLOP/s of an n^3 fp32 torch matmul on ``threads`` threads, best of 2 (after one warm-up)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(2))
    torch.set_num_threads(before)
    return 2 * n**3 / best


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def _torch_variant(unet, autoencoder, channels_last=False):
    """(unet(x, t, c), decode(z)) of torch modules, as numpy; ``channels_last``: NHWC weights and inputs."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    @torch.no_grad()
    def run_unet(x, t, c):
        return unet(torch.from_numpy(x).contiguous(memory_format=fmt), torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(c)).sample.contiguous().numpy()

    @torch.no_grad()
    def run_decoder(z):
        return autoencoder.decode(torch.from_numpy(z).contiguous(memory_format=fmt)).contiguous().numpy()

    return run_unet, run_decoder


def _graph_variant(open_session, unet_path, decoder_path):
    """(unet, decode) over two graphs opened by ``open_session(path)`` (ONNX Runtime's run(None, feeds)),
    and the seconds the two sessions took to start."""
    t0 = time.perf_counter()
    su, sd = open_session(unet_path), open_session(decoder_path)
    start = time.perf_counter() - t0
    return (lambda x, t, c: su.run(None, {"x": x, "t": t, "context": c})[0],
            lambda z: sd.run(None, {"z": z})[0]), start


def fused_attention_graph(unet, example, folder: Path) -> Path:
    """The U-Net exported with diffusers' unfused attention processor (the pattern onnxruntime.transformers
    recognises), its attention fused into ONNX Runtime's contrib MultiHeadAttention / Attention ops and its
    LayerNorms into (Skip)LayerNormalization; GroupNorm, NHWC convolutions and packed QKV are CUDA-only
    fusions there and stay off."""
    from diffusers.models.attention_processor import AttnProcessor
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from ldm.onnx_backend import _UNetGraph, export

    plain = copy.deepcopy(unet)
    plain.set_attn_processor(AttnProcessor())
    raw, fused = folder / "unet-unfused-attention.onnx", folder / "unet-fused-attention.onnx"
    export(_UNetGraph(plain), example, raw, ["x", "t", "context"])
    options = FusionOptions("unet")
    for name in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                 "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
        setattr(options, name, False)
    model = optimize_model(str(raw), model_type="unet", num_heads=0, hidden_size=0, optimization_options=options,
                           opt_level=0, use_gpu=False)
    print(f"  onnxruntime.transformers fusions: {model.get_fused_operator_statistics()}", flush=True)
    model.save_model_to_file(str(fused))
    return fused


def share_of_matmul(args) -> None:
    """Part 1: the default model's U-Net and decoder per variant, against the matmul rate (see the docstring)."""
    from diffusers.models.attention_processor import AttnProcessor

    import ldm
    from ldm.onnx_backend import OnnxBackend, optimized_path, session
    from ldm.pipeline import Text2ImagePipeline

    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp())
    bundle = work / "default_model"
    shutil.copytree(Path(ldm.__file__).parent / "default_model", bundle, ignore=shutil.ignore_patterns("onnx"))
    pipe = Text2ImagePipeline.from_pretrained(bundle, backend="torch")
    unet, autoencoder = pipe.unet, pipe.autoencoder
    c, h, w = pipe.latent_shape(None, None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, h, w, generator=g).numpy()  # (2, C, h, w): [uncond, cond] rows of one image
    t = np.array([500.0, 500.0], dtype=np.float32)
    context = torch.cat([pipe.text_encoder.empty_context(1), pipe.text_encoder([PROMPT])[0]]).numpy()  # (2, L, D)
    z = torch.randn(1, c, h, w, generator=g).numpy()  # (1, C, h, w)
    unet_flops = count_flops(lambda: unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context)))
    decoder_flops = count_flops(lambda: autoencoder.decode(torch.from_numpy(z)))
    graphs = OnnxBackend.for_modules(unet, autoencoder, pipe.text_encoder, str(bundle)).graphs
    unet_path, decoder_path = graphs.unet_graph((c, h, w)), graphs.decoder_graph((c, h, w))
    print(f"default model: U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, "
          f"{unet_flops / 1e9:.2f} GFLOP per CFG call (batch 2, {c}x{h}x{w}); decoder {decoder_flops / 1e9:.2f} GFLOP "
          f"(batch 1); {threads} threads", flush=True)

    variants, starts, notes = {}, {}, {}
    variants["torch eager (SDPA attention)"] = (*_torch_variant(unet, autoencoder), threads)
    unfused = copy.deepcopy(unet)
    unfused.set_attn_processor(AttnProcessor())
    variants["torch eager, unfused attention"] = (*_torch_variant(unfused, autoencoder), threads)
    variants["torch eager, channels_last (NHWC)"] = (*_torch_variant(
        copy.deepcopy(unet).to(memory_format=torch.channels_last),
        copy.deepcopy(autoencoder).to(memory_format=torch.channels_last), channels_last=True), threads)
    for level in ("disable", "basic", "extended", "all"):
        name = f"ORT {level}" + (" (previous default, NCHWc layout)" if level == "all" else "")
        fns, starts[name] = _graph_variant(lambda p, lv=level: session(p, level=lv, threads=threads, save_optimized=False), unet_path, decoder_path)
        variants[name] = (*fns, threads)
    # the saved optimised graph: the first session writes it, later ones start from it
    _graph_variant(lambda p: session(p, level="extended", threads=threads), unet_path, decoder_path)
    assert optimized_path(unet_path).is_file()
    for name, level in (("ORT extended, from the saved graph", "extended"),
                        ("ORT all over the saved extended graph (the default now)", "all")):
        fns, starts[name] = _graph_variant(lambda p, lv=level: session(p, level=lv, threads=threads), unet_path, decoder_path)
        variants[name] = (*fns, threads)
    if threads > 1:
        fns, starts["ORT extended, 1 thread"] = _graph_variant(lambda p: session(p, level="extended", threads=1, save_optimized=False),
                                                               unet_path, decoder_path)
        variants["ORT extended, 1 thread"] = (*fns, 1)
    try:
        fused = fused_attention_graph(unet, (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)), work)
        (fused_unet, _), starts["ORT extended + fused MultiHeadAttention"] = _graph_variant(
            lambda p: session(p, level="extended", threads=threads, save_optimized=False), fused, decoder_path)
        variants["ORT extended + fused MultiHeadAttention"] = (fused_unet, variants["ORT extended"][1], threads)
        notes["ORT extended + fused MultiHeadAttention"] = "decoder: ORT extended's"
    except Exception as e:  # recorded, not fatal: the fusion scripts follow diffusers' graphs loosely
        print(f"  fused attention: {type(e).__name__}: {e}", flush=True)
    try:
        from ldm.openvino_backend import OpenVinoSession

        for name, precision in (("OpenVINO f32", "f32"), ("OpenVINO default precision (bf16 here: not exact)", None)):
            fns, starts[name] = _graph_variant(lambda p, pr=precision: OpenVinoSession(p, precision=pr), unet_path, decoder_path)
            variants[name] = (*fns, threads)
    except ImportError:
        print("  openvino is not installed: its rows are left out", flush=True)

    ref_u, ref_d = variants["torch eager (SDPA attention)"][0](x, t, context), variants["torch eager (SDPA attention)"][1](z)
    diffs = {}
    for name, (run_unet, run_decoder, _) in variants.items():
        diffs[name] = (float(np.abs(run_unet(x, t, context) - ref_u).max()), float(np.abs(run_decoder(z) - ref_d).max()))
    shares = {name: ([], [], [], []) for name in variants}  # unet s, decoder s, unet share, decoder share
    rng = random.Random(0)
    for r in range(args.rounds):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            run_unet, run_decoder, n = variants[name]
            rate = matmul_rate(n)
            tu = min(_seconds(lambda: run_unet(x, t, context)) for _ in range(3))
            td = min(_seconds(lambda: run_decoder(z)) for _ in range(3))
            for lst, v in zip(shares[name], (tu, td, unet_flops / tu / rate, decoder_flops / td / rate)):
                lst.append(v)
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    med = statistics.median
    print(f"\n{'variant':<62} {'U-Net ms':>9} {'% matmul':>9} {'decoder ms':>11} {'% matmul':>9} "
          f"{'max|diff| U-Net, decoder':>25} {'start s':>8}")
    for name in variants:
        tu, td, su, sd = shares[name]
        du, dd = diffs[name]
        start = f"{starts[name]:.2f}" if name in starts else "-"
        print(f"{name:<62} {1e3 * med(tu):>9.1f} {100 * med(su):>8.0f}% {1e3 * med(td):>11.1f} {100 * med(sd):>8.0f}% "
              f"{du:>12.1e}, {dd:>10.1e} {start:>8}" + (f"  ({notes[name]})" if name in notes else ""))
    print(f"outputs' scale: max|U-Net| {np.abs(ref_u).max():.2f}, max|decoder| {np.abs(ref_d).max():.2f}; "
          f"matmul rate (median over rounds) {med([matmul_rate(threads) for _ in range(3)]) / 1e9:.0f} GFLOP/s at the end")
    shutil.rmtree(work, ignore_errors=True)


# -- part 2: the pipeline against diffusers' -----------------------------------------------------------------


class TimedBackend:
    """A pipeline backend (``ldm.backends``) whose U-Net and decoder calls add up their seconds."""

    def __init__(self, backend):
        self.inner, self.name, self.seconds = backend, backend.name, 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - t0
        return out

    def unet(self, x_t, t, context):
        return self._timed(self.inner.unet, x_t, t, context)

    def decode(self, z):
        return self._timed(self.inner.decode, z)


def interleaved_best(fns: dict, repeats: int) -> dict:
    """name -> (fastest run's seconds, total seconds, last output), the callables run in turn in each
    repeat so that a slow spell on a shared machine hits all of them alike."""
    times = {name: [] for name in fns}
    outs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(t), sum(t), outs[name]) for name, t in times.items()}


def run_diffusers(pipe, batch, steps, guidance):
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    out = pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
               output_type="np", height=64, width=64)
    return torch.from_numpy(out.images).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]


def run_ours(pipe, batch, steps, guidance):
    images = pipe(PROMPT, steps=steps, guidance=guidance, seed=0, num_images=batch, batch_size=batch, output="tensor")
    return images / 2 + 0.5  # (B, 3, H, W) in [0, 1]


class PreviousOnnxBackend:
    """The ONNX backend as it was before issue 17: ONNX Runtime at optimisation level "all" (NCHWc layout),
    the graph optimised at every start."""

    @staticmethod
    def over(backend):
        from ldm.onnx_backend import OnnxBackend, session

        class Previous(OnnxBackend):
            name = "onnx, previous"

            def open_session(self, path):
                return session(path, level="all", threads=torch.get_num_threads(), save_optimized=False)

        return Previous(backend.graphs)


def pipeline_vs_diffusers(args) -> None:
    """Part 2: images/s of diffusers' pipeline and ours on each backend (see the docstring)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    from ldm.pipeline import Text2ImagePipeline
    from ldm.testing import build_sd_folder

    dlogging.disable_progress_bar()
    folder = args.folder or Path(tempfile.mkdtemp()) / "tiny-sd"
    if not (folder / "model_index.json").is_file():
        build_sd_folder(folder, "bench")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; DDIM {args.steps} steps, guidance {args.guidance}, 64x64 images")
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    pipes = {"torch": Text2ImagePipeline.from_pretrained(folder, backend="torch"),
             "onnx": Text2ImagePipeline.from_pretrained(folder, backend="onnx")}
    pipes["onnx, previous"] = pipes["onnx"].with_backend(PreviousOnnxBackend.over(pipes["onnx"].backend))
    try:
        pipes["openvino"] = Text2ImagePipeline.from_pretrained(folder, backend="openvino")
    except ValueError as e:  # openvino not installed
        print(f"  {e}")
    for pipe in pipes.values():
        run_ours(pipe, 1, 2, args.guidance)  # export the graphs and start the sessions outside the timed runs

    rows = []
    for batch in (1, 8):
        timed = {name: TimedBackend(pipe.backend) for name, pipe in pipes.items()}
        runs = {name: pipe.with_backend(timed[name]) for name, pipe in pipes.items()}
        fns = {"diffusers": lambda: run_diffusers(theirs, batch, args.steps, args.guidance)}
        fns.update({name: (lambda r=run: run_ours(r, batch, args.steps, args.guidance)) for name, run in runs.items()})
        res = interleaved_best(fns, args.repeats)
        t_ref, _, ref = res["diffusers"]
        rows.append((batch, "diffusers (torch eager)", batch / t_ref, 1.0, 0.0, 0.0, None))
        for name in pipes:
            t, total, imgs = res[name]
            share = timed[name].seconds / total
            diff = (imgs - ref).abs() * 255
            rows.append((batch, f"ours, {name}", batch / t, t_ref / t, diff.max().item(), diff.mean().item(), share))

    print(f"\n{'batch':>5}  {'pipeline':<24} {'images/s':>9} {'x diffusers':>12} {'max|diff| /255':>15} "
          f"{'mean|diff| /255':>16} {'in U-Net+decoder':>17}")
    for batch, name, ips, speedup, dmax, dmean, share in rows:
        share_s = f"{100 * share:.0f}%" if share is not None else "-"
        print(f"{batch:>5}  {name:<24} {ips:>9.2f} {speedup:>11.2f}x {dmax:>15.4f} {dmean:>16.5f} {share_s:>17}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="share,pipeline", help="share, pipeline or both (default both)")
    parser.add_argument("--rounds", type=int, default=5, help="share: rounds over the variants (default 5)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and ONNX Runtime threads (default: torch's); 1 gives steadier figures on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {p.strip() for p in args.part.split(",")}
    if not parts or parts - {"share", "pipeline"}:
        raise SystemExit(f"--part {args.part!r}: give share, pipeline or share,pipeline")
    if "share" in parts:
        share_of_matmul(args)
    if "pipeline" in parts:
        print()
        pipeline_vs_diffusers(args)


if __name__ == "__main__":
    main()
