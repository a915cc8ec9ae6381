"""Generation without torch: the bundle's exported ONNX graphs run by ONNX Runtime, the rest in numpy.

``ldm generate`` on the CPU takes this path when everything it needs is on disk, so a process imports
numpy, onnxruntime and PIL instead of torch, diffusers, transformers and open_clip (seconds of imports):

* the graphs (text encoder, U-Net, decoder) ``ldm.onnx_backend`` exported, stamped with the bundle's hash;
* ``runtime.json`` beside them: the tokenizer settings, the latent geometry, the sampling conventions;
* the sampler's per-step coefficient rows for the request (``sampler/<method>-...json``), computed by the
  library's own step functions (``ldm.web.coefficients.step_rows``) and applied by the one step function
  every backend uses (``ldm.runtime.steps.apply_step``).

A torch-path run with the ONNX backend writes what is missing (``prepare``), so the next run of the same
kind starts at once. Anything not on disk, or not supported here (LoRAs, a transformers tokenizer, another
size, a bad argument), raises ``Unsupported`` and the caller runs the torch pipeline, which gives the same
answer or the proper error.

What each image sees matches the pipeline: its prompts encoded alone, its own generator's noise
(``ldm.runtime.noise``: torch's, to a few ulp), one U-Net call per step on its [uncond, cond] pair, guidance
``out_u + w (out_c - out_u)`` in float32, decoding alone, rounding as ``ldm.pipeline.to_pil``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ldm.runtime.graphs import cache_dir, session, stamped
from ldm.runtime.noise import TorchCPUGenerator
from ldm.runtime.steps import apply_step
from ldm.runtime.tokenizer import CLEANS, simple_tokenizer, token_ids

RUNTIME_FILE = "runtime.json"
SAMPLER_DIR = "sampler"
# phase -> seconds of the last ``generate`` call (imports are the caller's to time)
TIMINGS: dict[str, float] = {}


class Unsupported(Exception):
    """The runner cannot make this request (the message says why); the torch pipeline should."""


def sampler_file(folder: Path, *, method: str, steps: int, eta: float, sigmas: Optional[str],
                 variance: str = "fixed_small") -> Path:
    """Where the coefficient rows of one sampler configuration are kept."""
    return folder / SAMPLER_DIR / f"{method}-{sigmas or 'grid'}-eta{float(eta)!r}-{variance}-{int(steps)}.json"


def prepare(pipe, *, method: str, steps: int, eta: float, sigmas: Optional[str], variance: str = "fixed_small") -> bool:
    """After a run of ``pipe`` (a ``Text2ImagePipeline`` with the ONNX backend, no LoRAs), write what the runner
    needs to make the same kind of request without torch: the text encoder's graph, ``runtime.json`` and this
    sampler configuration's rows. Returns whether the runner can now take such requests."""
    from ldm_io import write_text

    backend, encoder = pipe.backend, pipe.text_encoder
    graphs = getattr(backend, "graphs", None)
    if getattr(backend, "name", None) != "onnx" or graphs is None or pipe.loras or pipe.name_or_path is None:
        return False
    if graphs.dir != cache_dir(pipe.name_or_path, graphs.key):  # a variant's graphs (LoRAs merged)
        return False
    if getattr(encoder, "backend", None) != "open_clip" or getattr(encoder, "clean", None) not in CLEANS:
        return False
    tokenizer = simple_tokenizer(encoder.clean)
    for prompt in ("koala, twemoji style", ""):  # the runner's ids must be the encoder's own
        if token_ids(tokenizer, prompt, encoder.max_length, encoder.pad_token_id) != encoder.tokenize([prompt])[0].tolist():
            return False
    graphs.text_encoder_graph(encoder)
    info = {"bundle_hash": graphs.key, "clean": encoder.clean, "context_length": int(encoder.max_length),
            "pad_id": int(encoder.pad_token_id), "latent_channels": int(pipe.autoencoder.latent_channels),
            "factor": int(pipe.downsample_factor), "granularity": int(pipe.granularity),
            "sample_size": int(pipe.sample_size), "clip_x0": pipe.sampling.clip_x0}
    write_text(graphs.dir / RUNTIME_FILE, json.dumps(info, sort_keys=True))
    rows = pipe.step_rows(method=method, steps=steps, eta=eta, variance=variance, sigmas=sigmas)
    path = sampler_file(graphs.dir, method=method, steps=steps, eta=eta, sigmas=sigmas, variance=variance)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({"bundle_hash": graphs.key, "rows": rows}))
    return True


class Runner:
    """One bundle's graphs, opened lazily; raises ``Unsupported`` when something it needs is missing or stale."""

    def __init__(self, bundle: Path, bundle_hash: str, threads: int = 0):
        self.bundle, self.hash, self.threads = Path(bundle), bundle_hash, threads
        self.dir = cache_dir(str(bundle), bundle_hash)
        try:
            self.info = json.loads((self.dir / RUNTIME_FILE).read_text())
        except (OSError, ValueError):
            raise Unsupported(f"no {RUNTIME_FILE} beside the graphs in {self.dir}") from None
        if self.info.get("bundle_hash") != bundle_hash:
            raise Unsupported(f"{RUNTIME_FILE} in {self.dir} is for another version of the bundle")
        self.sessions: dict[str, object] = {}

    def _session(self, name: str):
        if name not in self.sessions:
            path = stamped(self.dir, name, self.hash)
            if path is None:
                raise Unsupported(f"no graph {name}.onnx exported from this bundle in {self.dir}")
            self.sessions[name] = session(path, self.threads)
        return self.sessions[name]

    def latent_shape(self, height: Optional[int], width: Optional[int]) -> tuple[int, int, int]:
        info = self.info
        f, g = info["factor"], info["granularity"]
        height = height if height is not None else info["sample_size"] * f
        width = width if width is not None else info["sample_size"] * f
        for side in (height, width):
            if isinstance(side, bool) or not isinstance(side, int) or side <= 0 or side % g:
                raise Unsupported(f"image side {side!r} is not a positive multiple of {g}")
        return info["latent_channels"], height // f, width // f

    def rows(self, **sampler) -> list[list]:
        try:
            saved = json.loads(sampler_file(self.dir, **sampler).read_text())
        except (OSError, ValueError):
            raise Unsupported(f"no sampler coefficients for {sampler} yet") from None
        if saved.get("bundle_hash") != self.hash:
            raise Unsupported("the sampler coefficients are for another version of the bundle")
        return saved["rows"]

    def encode(self, prompt: str) -> np.ndarray:
        """The context (1, L, D) of one prompt, encoded alone."""
        info = self.info
        ids = token_ids(simple_tokenizer(info["clean"]), prompt, info["context_length"], info["pad_id"])
        return self._session("text_encoder").run(None, {"tokens": np.asarray([ids], dtype=np.int64)})[0]

    def unet(self, x: np.ndarray, t: float, context: np.ndarray) -> np.ndarray:
        """The U-Net on a batch (B, C, h, w) at timestep t (float32 for every row) with contexts (B, L, D)."""
        _, h, w = x.shape[1:]
        return self._session(f"unet-{h}x{w}").run(None, {"x": x, "t": np.full(len(x), t, dtype=np.float32),
                                                          "context": context})[0]

    def decode(self, z: np.ndarray) -> np.ndarray:
        """One image's latents (1, C, h, w) -> uint8 pixels (H, W, 3), rounded as ``ldm.pipeline.to_pil``."""
        _, h, w = z.shape[1:]
        image = np.clip(self._session(f"decoder-{h}x{w}").run(None, {"z": z})[0], -1, 1)  # (1, 3, H, W)
        return np.round((image / np.float32(2) + np.float32(0.5)) * np.float32(255)).astype(np.uint8)[0].transpose(1, 2, 0)

    def generate(self, prompts: list[str], negatives: list[Optional[str]], seeds: list[int], *, steps: int,
                 method: str, eta: float, sigmas: Optional[str], guidance: float, height: Optional[int] = None,
                 width: Optional[int] = None, batch_size: int = 8,
                 progress: Optional[Callable[[int, int], None]] = None) -> list[np.ndarray]:
        """uint8 images (H, W, 3), one per row of prompts/negatives/seeds, as ``Text2ImagePipeline`` makes them."""
        TIMINGS.clear()
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            TIMINGS[phase] = TIMINGS.get(phase, 0.0) + now - clock
            clock = now

        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0:
            raise Unsupported(f"guidance {guidance!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise Unsupported(f"batch size {batch_size!r}")
        shape = self.latent_shape(height, width)
        rows = self.rows(method=method, steps=steps, eta=eta, sigmas=sigmas)
        for name in ("text_encoder", f"unet-{shape[1]}x{shape[2]}", f"decoder-{shape[1]}x{shape[2]}"):
            self._session(name)
        lap("loading")
        w = float(guidance)
        contexts: dict[str, np.ndarray] = {}

        def context(prompt: str) -> np.ndarray:
            if prompt not in contexts:
                contexts[prompt] = self.encode(prompt)
            return contexts[prompt]

        n, total, done = len(prompts), steps * -(-len(prompts) // batch_size), 0
        latents = []
        for start in range(0, n, batch_size):
            batch = range(start, min(start + batch_size, n))
            conds = [context(prompts[i]) for i in batch]  # (1, L, D) each
            unconds = [context(negatives[i] if negatives[i] is not None else "") for i in batch]
            lap("text encoding")
            generators = [TorchCPUGenerator(seeds[i]) for i in batch]
            x = np.concatenate([g.randn((1, *shape)) for g in generators])  # x_T (B, C, h, w)
            x0_prev = None
            for k, row in enumerate(rows):
                outs = []
                for j in range(len(generators)):
                    xj = x[j : j + 1]
                    if w == 1:
                        outs.append(self.unet(xj, row[0], conds[j]))
                    elif w == 0:
                        outs.append(self.unet(xj, row[0], unconds[j]))
                    else:  # ldm.guidance.ClassifierFreeGuidance: one call on [uncond, cond]
                        out = self.unet(np.concatenate([xj, xj]), row[0], np.concatenate([unconds[j], conds[j]]))
                        outs.append(out[:1] + w * (out[1:] - out[:1]))
                output = np.concatenate(outs)  # (B, C, h, w)
                noise = np.concatenate([g.randn((1, *shape)) for g in generators]) if row[1] else None
                x, x0_prev = apply_step(row, x, output, noise, x0_prev, self.info["clip_x0"], np.clip)
                if progress is not None:
                    progress(done + k + 1, total)
            latents.append(x)
            done += steps
            lap("sampling")
        images = [self.decode(z[None]) for batch_latents in latents for z in batch_latents]
        lap("decoding")
        return images
