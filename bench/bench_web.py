"""The model in headless Chromium (onnxruntime-web, wasm) against Python's ONNX Runtime, same machine.

Exports the bundle with `ldm export-web` (the default model if it is installed, else --model),
serves the site with the cross-origin isolation headers, generates one image in headless
Chromium per thread count (the page's ?threads=N; 1 is what a page gets without those headers)
and the same image with the Python pipeline's ONNX backend (intra-op threads = N). Prints seconds
per sampler step (one batched U-Net call on [uncond, cond] plus the update) and per image (text
encoder + steps + decode; the page's per-step previews are off) side by side, with the ratio.
Each figure is the faster of --repeats runs after one warm-up. The browser runs twice: with the
graphs in onnxruntime-web's worker (the page's default) and on the page's main thread (?proxy=0);
"longest freeze" is the longest the page's main thread went without running a 4 ms timer.

    PYTHONPATH=. python bench/bench_web.py [--model BUNDLE] [--steps 20] [--threads 1,2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "koala, twemoji style"


def browser_times(site: Path, steps: int, threads: int, repeats: int, proxy: bool = True) -> tuple[float, float, float, str]:
    """(seconds per step, seconds per image, longest main-thread block in seconds, provider) in
    headless Chromium; ``proxy``: onnxruntime-web runs the graphs in its worker (the page's default)."""
    from ldm.web.browser import Chromium
    from ldm.web.serve import make_server

    server = make_server(site, 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/?ep=wasm&preview=0&threads={threads}&proxy={int(proxy)}"
    best_step, best_image, longest_block = float("inf"), float("inf"), 0.0
    try:
        with Chromium(timeout=120) as b:
            b.open(url)
            status = b.wait_for("window.ldm && window.ldm.status !== 'loading' && window.ldm.status", timeout=300)
            if status != "ready":
                raise RuntimeError(b.evaluate("document.getElementById('message').textContent"))
            for k in range(repeats + 1):
                for name, value in (("prompt", PROMPT), ("steps", steps), ("guidance", 4), ("seed", 0), ("sampler", 0)):
                    b.evaluate(f"document.getElementById({name!r}).value = {str(value)!r}")
                b.evaluate("window.ldm.status = 'clicked'; document.getElementById('generate').click()")
                status = b.wait_for("['done', 'error'].includes(window.ldm.status) && window.ldm.status", timeout=3600)
                if status != "done":
                    raise RuntimeError(b.evaluate("document.getElementById('message').textContent"))
                t = b.evaluate("window.ldm.timings")
                if k > 0:  # the first run warms up
                    best_step = min(best_step, sum(t["step_ms"]) / len(t["step_ms"]) / 1000)
                    best_image = min(best_image, t["total_ms"] / 1000)
                    longest_block = max(longest_block, t["longest_block_ms"] / 1000)
            provider = (f"{b.evaluate('window.ldm.provider')}, {b.evaluate('window.ldm.threads')} thread(s), "
                        + ("in onnxruntime-web's worker" if b.evaluate("window.ldm.proxy") else "on the main thread"))
    finally:
        server.shutdown()
        server.server_close()
    return best_step, best_image, longest_block, provider


def python_times(bundle: Path, steps: int, threads: int, repeats: int) -> tuple[float, float]:
    """(seconds per step, seconds per image) with the pipeline's ONNX Runtime backend."""
    from types import SimpleNamespace

    import torch

    from ldm.pipeline import Text2ImagePipeline

    torch.set_num_threads(threads)
    onnx_pipe = Text2ImagePipeline.from_pretrained(bundle, backend="onnx")
    onnx = onnx_pipe.backend
    spent = {"unet": 0.0}

    def timed_unet(*args):
        t0 = time.perf_counter()
        out = onnx.unet(*args)
        spent["unet"] += time.perf_counter() - t0
        return out

    pipe = onnx_pipe.with_backend(SimpleNamespace(name="onnx", unet=timed_unet, decode=onnx.decode))
    best_step, best_image = float("inf"), float("inf")
    for k in range(repeats + 1):
        spent["unet"] = 0.0
        step_marks = []
        t0 = time.perf_counter()
        pipe(PROMPT, steps=steps, method="ddim", guidance=4.0, seed=0, output="tensor",
             progress=lambda done, total: step_marks.append(time.perf_counter()))
        image = time.perf_counter() - t0
        if k > 0:
            per_step = (step_marks[-1] - step_marks[0]) / (len(step_marks) - 1) if len(step_marks) > 1 else spent["unet"]
            best_step, best_image = min(best_step, per_step), min(best_image, image)
    onnx.sessions.clear()
    return best_step, best_image


def main() -> None:
    from ldm.bundle import DEFAULT_BUNDLE, check_bundle
    from ldm.web.export import export_site

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: the installed default model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", default="1", help="comma-separated thread counts for both sides (default 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--site", type=Path, default=None, help="where to export the site (default: a temporary folder)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        if not DEFAULT_BUNDLE.is_dir():
            ap.error(f"no default model is installed ({DEFAULT_BUNDLE}); give --model BUNDLE")
        model = DEFAULT_BUNDLE
    model = check_bundle(model)
    with tempfile.TemporaryDirectory() as tmp:
        site = export_site(model, args.site or Path(tmp) / "site", seeds=1, max_steps=args.steps)
        print(f"model {model}, {args.steps} DDIM steps, guidance 4 (batch 2 U-Net calls), one image")
        print(f"{'threads':>7}  {'browser s/step':>14}  {'python s/step':>13}  {'ratio':>6}  "
              f"{'browser s/image':>15}  {'python s/image':>14}  {'ratio':>6}  {'longest freeze s':>16}  browser provider")
        for threads in (int(t) for t in args.threads.split(",")):
            p_step, p_image = python_times(model, args.steps, threads, args.repeats)
            for proxy in (True, False):
                b_step, b_image, block, provider = browser_times(site, args.steps, threads, args.repeats, proxy)
                print(f"{threads:>7}  {b_step:>14.4f}  {p_step:>13.4f}  {b_step / p_step:>5.2f}x  "
                      f"{b_image:>15.3f}  {p_image:>14.3f}  {b_image / p_image:>5.2f}x  {block:>16.3f}  {provider}",
                      flush=True)


if __name__ == "__main__":
    main()
