"""``ldm export-web``: a model bundle as a static site that samples in the browser.

    site/
      index.html, app.js, tokenizer.js   the page (plain JavaScript, no build step)
      ort/                               onnxruntime-web, vendored from npm (``vendor``)
      text_encoder.onnx                  tokens (B, L) -> context (B, L, D)
      unet.onnx                          (x (B, C, h, w), t (B,), context (B, L, D)) -> output
      decoder.onnx                       z (B, C, h, w) -> image (B, 3, H, W) in about [-1, 1]
      tokenizer.json                     vocabulary, merges and tables for tokenizer.js
      schedule.json                      per-step coefficients, DDIM (each eta), DDPM, DPM++ 2M (+ Karras), Euler,
                                         Euler a, 1..max_steps steps
      noise.bin                          float32: for each exported seed, x_T then one draw per step
      model.json                         shapes, files, seeds covered, the onnxruntime-web version

The graphs are the ONNX backend's (``ldm.onnx_backend``, cached beside the bundle). The noise of
seed s is what the Python pipeline draws for an image with seed s (``torch.Generator().manual_seed(s)``:
x_T first, then one draw per stochastic step), so the page reproduces Python's images for those seeds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

STATIC = Path(__file__).parent / "static"
PAGE_FILES = ("index.html", "app.js", "tokenizer.js")
COMMAND = "ldm export-web"
SITE_FILES = (*PAGE_FILES, "ort", "text_encoder.onnx", "unet.onnx", "decoder.onnx", "tokenizer.json", "schedule.json",
              "noise.bin", "model.json")


def claim_site(bundle: Path, out: Path, *, overwrite: bool = False) -> None:
    """``out`` may receive the site: new or empty, or with ``overwrite`` an earlier site (and nothing
    else); never the bundle, nor a folder inside it or around it (``ldm_io.claim_output_dir``)."""
    from ldm_io import claim_output_dir

    claim_output_dir(out, command=COMMAND, overwrite=overwrite, sealed=[bundle], known=SITE_FILES,
                     signature=("model.json", "index.html"))


def noise_draws(seeds: Sequence[int], latent_shape: tuple[int, int, int], draws: int) -> np.ndarray:
    """(len(seeds), draws, C, h, w) float32: row i is seed i's x_T followed by draws - 1 step noises,
    drawn as ``Text2ImagePipeline.generate_latents`` and ``sample`` draw them."""
    from ldm.samplers import randn

    out = np.empty((len(seeds), draws, *latent_shape), dtype=np.float32)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        for k in range(draws):
            out[i, k] = randn((1, *latent_shape), g, torch.float32)[0].numpy()  # (C, h, w)
    return out


def export_site(
    bundle: Path,
    out: Path,
    *,
    seeds: int = 4,
    max_steps: int = 50,
    etas: Sequence[float] = (0.0, 0.5, 1.0),
    height: Optional[int] = None,
    width: Optional[int] = None,
    default_prompt: str = "koala, twemoji style",
    overwrite: bool = False,
) -> Path:
    """Write the site for ``bundle`` to ``out`` (atomically: a sibling folder renamed into place).
    ``out`` must be new or empty; ``overwrite``: it may be an earlier site, replaced (``claim_site``)."""
    from ldm.bundle import bundle_hash
    from ldm.onnx_backend import OnnxGraphs
    from ldm.pipeline import Text2ImagePipeline
    from ldm.web.coefficients import sampler_table
    from ldm.web.tokenizer_spec import tokenizer_spec
    from ldm.web.vendor import vendor_ort_web
    from ldm_io import atomic_directory, write_marker

    if not isinstance(seeds, int) or seeds < 0:
        raise ValueError(f"seeds={seeds!r} must be an integer >= 0 (how many seeds, from 0, get Python's noise)")
    if any(not e >= 0 for e in etas):
        raise ValueError(f"etas={list(etas)} must all be >= 0")
    claim_site(bundle, out, overwrite=overwrite)  # before loading anything
    pipe = Text2ImagePipeline.from_pretrained(bundle, backend="torch")
    latent_shape = pipe.latent_shape(height, width)  # (C, h, w)
    tokens = pipe.text_encoder.tokenize([""])  # (1, L)
    context = pipe.text_encoder.empty_context(1)  # (1, L, D)
    spec = tokenizer_spec(pipe.text_encoder)
    table = sampler_table(pipe.schedule, pipe.sampling, max_steps=max_steps, etas=tuple(float(e) for e in etas))
    graphs = OnnxGraphs(pipe.unet, pipe.autoencoder, tuple(context.shape[1:]), str(bundle), bundle_hash(bundle))
    sources = {
        "text_encoder.onnx": graphs.text_encoder_graph(pipe.text_encoder),
        "unet.onnx": graphs.unet_graph(latent_shape),
        "decoder.onnx": graphs.decoder_graph(latent_shape),
    }

    with atomic_directory(out) as tmp:  # the folder's mode follows the umask, as mkdir's does
        for name in PAGE_FILES:
            shutil.copyfile(STATIC / name, tmp / name)
        ort_version = vendor_ort_web(tmp)
        for name, path in sources.items():
            shutil.copyfile(path, tmp / name)
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        (tmp / "schedule.json").write_text(json.dumps(table))
        noise_draws(range(seeds), latent_shape, max_steps).tofile(tmp / "noise.bin")  # little-endian float32
        f = pipe.downsample_factor
        model = {
            "bundle": str(bundle),
            "bundle_hash": bundle_hash(bundle),
            "latent_shape": list(latent_shape),
            "image_size": [latent_shape[1] * f, latent_shape[2] * f],
            "context_shape": list(context.shape[1:]),
            "token_length": int(tokens.shape[1]),
            "files": {"text_encoder": "text_encoder.onnx", "unet": "unet.onnx", "decoder": "decoder.onnx",
                      "tokenizer": "tokenizer.json", "schedule": "schedule.json", "noise": "noise.bin"},
            "noise": {"first_seed": 0, "seeds": seeds, "draws_per_seed": max_steps, "dtype": "float32"},
            "ort_web_version": ort_version,
            "default_prompt": default_prompt,
        }
        (tmp / "model.json").write_text(json.dumps(model, indent=2))
        write_marker(tmp, COMMAND)
        claim_site(bundle, out, overwrite=overwrite)  # again: nothing came into ``out`` meanwhile
    return out
