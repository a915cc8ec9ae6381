"""The open_clip backend: any open_clip CLIP (built-in name, config file or dict), its own tokenizer.

The context is computed as Stable Diffusion 2's ``FrozenOpenCLIPEmbedder``
(Stability-AI/stablediffusion, ``ldm/modules/encoders/modules.py``) does:
token embedding + positional embedding, the residual blocks (all of them for
``layer="final"``, all but the last for ``"penultimate"``), then ``ln_final``.
With ``"final"`` that is exactly the token sequence inside
``CLIP.encode_text``; the pooled output is ``CLIP.encode_text`` itself
(end-of-text token of the final layer, projected), from the same pass.

The tokenizer is open_clip's ``SimpleTokenizer``: its BPE vocabulary ships
inside the open_clip package, so it works offline. ``tokenizer/`` in a bundle
holds ``open_clip_tokenizer.json`` saying which one, with its settings.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from conditioning.clip_model import (
    build_open_clip_model,
    load_weights,
    read_open_clip_folder,
    resolve_model_cfg,
    save_open_clip_folder,
)
from conditioning.encoders import TextEncoder, TextEncoderConfig
from ldm_io import atomic_directory

TOKENIZER_CONFIG = "open_clip_tokenizer.json"
TOKENIZER_CLEANS = ("lower", "whitespace", "canonicalize")


@functools.lru_cache(maxsize=4)
def _simple_tokenizer(clean: str):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(clean=clean)


class OpenCLIPTextEncoder(TextEncoder):
    """A text encoder over a whole ``open_clip.CLIP`` model (``self.model``, image tower included)."""

    backend = "open_clip"

    def __init__(self, model: torch.nn.Module, model_cfg: dict[str, Any], layer: str = "final", clean: str = "lower"):
        super().__init__(layer)
        import open_clip

        if not isinstance(model, open_clip.CLIP):
            raise ValueError(f"the open_clip backend needs an open_clip.CLIP model, got {type(model).__name__}")
        if clean not in TOKENIZER_CLEANS:
            raise ValueError(f"tokenizer clean={clean!r} is not supported; allowed values: {', '.join(TOKENIZER_CLEANS)}")
        if layer == "penultimate" and len(model.transformer.resblocks) < 2:
            raise ValueError("layer='penultimate' needs a text transformer with at least 2 layers")
        self.model = model
        self.model_cfg = model_cfg
        self.clean = clean
        self.tokenizer = _simple_tokenizer(clean)
        self.max_length = int(model.context_length)
        self.context_dim = int(model.ln_final.normalized_shape[0])
        self.pooled_dim = int(model_cfg["embed_dim"]) if model.text_projection is not None else self.context_dim
        self.bos_token_id = self.tokenizer.sot_token_id
        self.eos_token_id = self.tokenizer.eot_token_id
        self.pad_token_id = 0  # open_clip pads with zeros after the end token
        if model.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"text_cfg.vocab_size={model.vocab_size} does not match open_clip's tokenizer "
                             f"({self.tokenizer.vocab_size} tokens)")

    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        return [[self.bos_token_id] + self.tokenizer.encode(p) + [self.eos_token_id] for p in prompts]

    def _tokenizer_fingerprint(self) -> str:
        return f"open_clip.SimpleTokenizer/{self.clean}/{self.tokenizer.vocab_size}"

    def _encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from open_clip.transformer import text_global_pool

        m = self.model
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype)  # (B, L, D)
        x = x + m.positional_embedding.to(cast_dtype)  # (B, L, D)
        batch_first = getattr(m.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)  # (L, B, D)
        blocks = m.transformer.resblocks
        penultimate = None
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x
            x = block(x, attn_mask=m.attn_mask)
        if not batch_first:
            x, penultimate = x.transpose(0, 1), penultimate.transpose(0, 1)  # (B, L, D)
        final = m.ln_final(x)  # (B, L, D)
        context = final if self.layer == "final" else m.ln_final(penultimate)  # (B, L, D)
        pooled = text_global_pool(final, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))  # (B, D)
        if m.text_projection is not None:
            pooled = m.text_projection(pooled) if isinstance(m.text_projection, torch.nn.Linear) else pooled @ m.text_projection
        return context, pooled  # (B, L, D), (B, E)

    def save_pretrained(self, root: str | os.PathLike) -> Path:
        root = Path(root)
        with atomic_directory(root / "text_encoder") as tmp:
            save_open_clip_folder(self.model, self.model_cfg, tmp, layer=self.layer)
        with atomic_directory(root / "tokenizer") as tmp:
            config = {"backend": "open_clip", "tokenizer": "SimpleTokenizer", "clean": self.clean,
                      "context_length": self.max_length}
            (tmp / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
        return root


def build_open_clip_encoder(config: TextEncoderConfig) -> OpenCLIPTextEncoder:
    model_cfg = resolve_model_cfg(config.model, config.model_cfg)
    model = build_open_clip_model(model_cfg)
    if config.weights is not None:
        load_weights(model, config.weights)
    return OpenCLIPTextEncoder(model, model_cfg, layer=config.layer)


def load_open_clip_encoder(text_dir: Path, tok_dir: Path, layer: Optional[str] = None) -> OpenCLIPTextEncoder:
    model, config = read_open_clip_folder(text_dir)
    tok_path = tok_dir / TOKENIZER_CONFIG
    if not tok_path.is_file():
        raise ValueError(f"{tok_dir} has no {TOKENIZER_CONFIG}; an open_clip text encoder needs it to pick its tokenizer")
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    if tok.get("tokenizer") != "SimpleTokenizer":
        raise ValueError(f"{tok_path}: tokenizer={tok.get('tokenizer')!r} is not supported; allowed: 'SimpleTokenizer'")
    if tok.get("context_length", model.context_length) != model.context_length:
        raise ValueError(f"{tok_path}: context_length={tok['context_length']} differs from the model's {model.context_length}")
    return OpenCLIPTextEncoder(model, config["model_cfg"], layer=layer or config.get("layer", "final"),
                               clean=tok.get("clean", "lower"))
