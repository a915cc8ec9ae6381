"""Building and loading text encoders: the one place that picks a backend.

    encoder = load_text_encoder("path/to/bundle")         # a saved encoder (bundle root or text_encoder/)
    encoder = build_text_encoder(TextEncoderConfig(...))  # a new one from a config

The backends (``open_clip_backend``, ``hf_clip_backend``) import ``conditioning.encoders`` for the
interface they implement; this module imports them, so there is no cycle between the two.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from conditioning.encoders import TextEncoder, TextEncoderConfig, check_layer, detect_backend, resolve_bundle


def build_text_encoder(config: TextEncoderConfig | dict) -> TextEncoder:
    """A frozen text encoder from a ``TextEncoderConfig`` (or a dict of its fields)."""
    if isinstance(config, dict):
        known = {f.name for f in dataclasses.fields(TextEncoderConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown text encoder config key {unknown[0]!r}; allowed keys: {', '.join(sorted(known))}")
        config = TextEncoderConfig(**config)
    if not isinstance(config, TextEncoderConfig):
        raise ValueError(f"config must be a TextEncoderConfig or a dict, got {type(config).__name__}")
    if config.backend == "open_clip":
        from conditioning.open_clip_backend import build_open_clip_encoder

        return build_open_clip_encoder(config).frozen()
    from conditioning.hf_clip_backend import build_hf_encoder

    return build_hf_encoder(config).frozen()


def load_text_encoder(
    path: str | os.PathLike,
    layer: Optional[str] = None,
    device: Optional[str | torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> TextEncoder:
    """A frozen text encoder from a bundle root (``text_encoder/`` + ``tokenizer/``) or its ``text_encoder/``.

    ``layer`` overrides the saved choice ("final" or "penultimate"; transformers folders default to
    "final", as Stable Diffusion's diffusers folders expect).
    """
    from ldm_io.weights import check_safetensors

    text_dir, tok_dir = resolve_bundle(path)
    if layer is not None:
        check_layer(layer)
    if detect_backend(text_dir) == "open_clip":
        from conditioning.open_clip_backend import load_open_clip_encoder

        if (text_dir / "model.safetensors").is_file():
            check_safetensors(text_dir / "model.safetensors")  # truncated or corrupt: one line, not a traceback
        encoder = load_open_clip_encoder(text_dir, tok_dir, layer)
    else:
        from conditioning.hf_clip_backend import load_hf_encoder

        encoder = load_hf_encoder(text_dir, tok_dir, layer)  # model.safetensors, model.fp16.safetensors or .bin
    encoder.frozen()
    if device is not None or dtype is not None:
        encoder.to(device=device, dtype=dtype)
    return encoder
