"""Our pipeline against diffusers' StableDiffusionPipeline on the same tiny Stable Diffusion model.

One run, side by side, on this machine: a Stable Diffusion-layout folder (UNet2DConditionModel of
~18M parameters at 16x16x4 latents, AutoencoderKL f=4, CLIPTextModel, CLIP's real BPE tokenizer)
is built from configs with random weights and loaded by both pipelines. DDIM, the same steps and
guidance, the same per-image seeds. Prints images/s at batch 1 and 8 for diffusers, ours with the
torch backend and ours with the ONNX Runtime backend, the pixel differences against diffusers, and
the share of our time spent inside U-Net and decoder calls.

    python bench/bench_pipeline.py [--steps 25] [--repeats 3] [--threads N] [--folder /tmp/tiny-sd]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a koala wearing a red hat, twemoji style"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and ONNX Runtime threads (default: torch's); 1 gives steadier figures on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
    ours = Text2ImagePipeline.from_pretrained(folder, backend="torch")
    onnx = Text2ImagePipeline.from_pretrained(folder, backend="onnx")
    run_ours(onnx, 1, 2, args.guidance)  # export the graphs outside the timed runs

    rows = []
    for batch in (1, 8):
        timed = {name: TimedBackend(pipe.backend) for name, pipe in (("torch", ours), ("onnx", onnx))}
        runs = {name: pipe.with_backend(timed[name]) for name, pipe in (("torch", ours), ("onnx", onnx))}
        res = interleaved_best({
            "diffusers": lambda: run_diffusers(theirs, batch, args.steps, args.guidance),
            "torch": lambda: run_ours(runs["torch"], batch, args.steps, args.guidance),
            "onnx": lambda: run_ours(runs["onnx"], batch, args.steps, args.guidance),
        }, args.repeats)
        t_ref, _, ref = res["diffusers"]
        rows.append((batch, "diffusers (torch eager)", batch / t_ref, 1.0, 0.0, 0.0, None))
        for name in ("torch", "onnx"):
            t, total, imgs = res[name]
            share = timed[name].seconds / total
            diff = (imgs - ref).abs() * 255
            rows.append((batch, f"ours, {name}", batch / t, t_ref / t, diff.max().item(), diff.mean().item(), share))

    print(f"\n{'batch':>5}  {'pipeline':<24} {'images/s':>9} {'x diffusers':>12} {'max|diff| /255':>15} "
          f"{'mean|diff| /255':>16} {'in U-Net+decoder':>17}")
    for batch, name, ips, speedup, dmax, dmean, share in rows:
        share_s = f"{100 * share:.0f}%" if share is not None else "-"
        print(f"{batch:>5}  {name:<24} {ips:>9.2f} {speedup:>11.2f}x {dmax:>15.4f} {dmean:>16.5f} {share_s:>17}")


if __name__ == "__main__":
    main()
