"""Text encoders: prompts -> (context, pooled), one interface over open_clip and transformers CLIP.

    encoder = load_text_encoder("path/to/bundle")          # or build_text_encoder(TextEncoderConfig(...))
    context, pooled = encoder(["koala, twemoji style"])     # (B, L, D), (B, D_pooled)
    uncond = encoder.empty_context(4)                       # (4, L, D): the encoder's output for ""

``context`` is the sequence the U-Net's cross-attention reads: the hidden
states of the final transformer layer or of the penultimate one (Stable
Diffusion 2), in both cases with the text tower's final layer norm applied.
``pooled`` is one vector per prompt taken at the end-of-text token (open_clip:
projected into the joint image-text space; transformers: ``pooler_output``, or
``text_embeds`` for ``CLIPTextModelWithProjection``), always from the final
layer.

A bundle folder holds ``text_encoder/`` and ``tokenizer/`` (diffusers' Stable
Diffusion layout). ``text_encoder/open_clip_config.json`` marks an open_clip
model, ``text_encoder/config.json`` a transformers ``CLIPTextModel``.

This module holds the interface the backends (``open_clip_backend``, ``hf_clip_backend``)
implement and how a saved encoder is found; it imports no backend. ``conditioning.loading``
(``load_text_encoder``, ``build_text_encoder``) picks the backend and imports it.

Prompts longer than the context length (77 for CLIP) are cut to it, keeping the
end-of-text token, with a warning that says how many tokens were dropped.
Encoders come out of ``build_text_encoder`` / ``load_text_encoder`` frozen
(eval mode, no gradients): they condition a model, they are not trained here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from torch import nn

from conditioning.empty import EMPTY_PROMPT

LAYERS = ("final", "penultimate")
BACKENDS = ("open_clip", "transformers")
OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_CONFIG = "config.json"


def check_layer(layer: str) -> str:
    if layer not in LAYERS:
        raise ValueError(f"layer={layer!r} is not supported; allowed values: {', '.join(LAYERS)}")
    return layer


def check_prompts(prompts: Any) -> list[str]:
    """``prompts`` as a list of strings, or a ``ValueError`` saying what is wrong with it."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string; wrap it in a list: [prompt]")
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is an empty list; give at least one prompt (\"\" is the empty prompt)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] is {type(p).__name__} {p!r}; every prompt must be a string")
    return list(prompts)


def _shorten(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class TextEncoder(nn.Module):
    """Base class: tokenizing, truncation warnings, the empty context and the weights hash.

    A backend sets ``max_length`` (L), ``context_dim`` (D), ``pooled_dim``, ``bos/eos/pad_token_id``
    and implements ``_token_ids`` (untruncated ids with start and end tokens), ``_encode_tokens``
    (tokens -> context, pooled), ``_tokenizer_fingerprint`` and ``save_pretrained``.
    """

    backend: str
    max_length: int
    context_dim: int
    pooled_dim: int
    eos_token_id: int
    pad_token_id: int

    def __init__(self, layer: str = "final"):
        super().__init__()
        self._empty: Optional[torch.Tensor] = None
        self.layer = layer

    @property
    def layer(self) -> str:
        """Which hidden states form the context: "final" or "penultimate"."""
        return self._layer

    @layer.setter
    def layer(self, value: str) -> None:
        self._layer = check_layer(value)
        self.clear_cache()

    # --- backend hooks -------------------------------------------------------------------------
    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _tokenizer_fingerprint(self) -> str:
        raise NotImplementedError

    def save_pretrained(self, root: str | os.PathLike) -> Path:
        """Write ``root/text_encoder/`` and ``root/tokenizer/`` (each atomically); returns ``root``."""
        raise NotImplementedError

    # --- the interface -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, L) on the CPU, cut to L with the end token kept, padded with the pad token."""
        prompts = check_prompts(prompts)
        L = self.max_length
        tokens = torch.full((len(prompts), L), self.pad_token_id, dtype=torch.long)  # (B, L)
        for i, (prompt, ids) in enumerate(zip(prompts, self._token_ids(prompts))):
            if len(ids) > L:
                warnings.warn(
                    f"prompt {_shorten(prompt)!r} is {len(ids)} tokens long; the text encoder takes {L}, "
                    f"so the last {len(ids) - L} tokens were dropped",
                    stacklevel=3,
                )
                ids = ids[: L - 1] + [self.eos_token_id]
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, D), pooled (B, D_pooled)) for a list of prompts."""
        tokens = self.tokenize(prompts).to(self.device)  # (B, L)
        return self._encode_tokens(tokens)

    def empty_context(self, batch_size: int = 1) -> torch.Tensor:
        """The encoder's context for the empty prompt ``""``, (batch_size, L, D).

        Computed once and cached (dropped when the encoder moves, changes dtype or loads weights);
        the rows are a broadcast view of one tensor: clone before writing into it.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        if self._empty is None:
            with torch.no_grad():
                self._empty = self([EMPTY_PROMPT])[0]  # (1, L, D)
        return self._empty.expand(batch_size, -1, -1)

    def weights_hash(self) -> str:
        """A 16-hex-digit hash of everything that decides the context: weights (with their dtypes),
        layer, context length and tokenizer. Caches of contexts are keyed by it. Computed afresh
        on each call (it reads every weight), so it always reflects the current weights."""
        h = hashlib.sha256()
        h.update(f"{self.backend}|{self.layer}|{self.max_length}|{self._tokenizer_fingerprint()}".encode())
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"|{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def clear_cache(self) -> None:
        """Forget the cached empty context (call it after changing the weights in place)."""
        self._empty = None

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), .cuda(), ... change the outputs
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.clear_cache()
        return super().load_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"backend={self.backend}, layer={self.layer}, max_length={self.max_length}, "
                f"context_dim={self.context_dim}, pooled_dim={self.pooled_dim}")

    def frozen(self) -> "TextEncoder":
        """Eval mode and no gradients; returns self."""
        self.eval()
        self.requires_grad_(False)
        return self


@dataclasses.dataclass
class TextEncoderConfig:
    """How to build a text encoder (``build_text_encoder``); ``load_text_encoder`` reads a saved one."""

    # "open_clip" or "transformers" (CLIPTextModel + CLIPTokenizer).
    backend: Literal["open_clip", "transformers"] = "open_clip"
    # open_clip: a built-in model config name (e.g. "ViT-H-14") or a JSON file holding a model config
    # (or an open_clip_config.json with "model_cfg"); transformers: a folder with a CLIPTextModel
    # config.json (and weights, which are loaded). Give this or model_cfg.
    model: Optional[str] = None
    # The model config inline: an open_clip model config dict, or CLIPTextConfig keyword arguments.
    model_cfg: Optional[dict[str, Any]] = None
    # A local .safetensors file of weights (open_clip: the whole CLIP model, image tower included).
    # None: random initialisation (tests, training from scratch). Nothing is ever downloaded.
    weights: Optional[str] = None
    # transformers: a folder with CLIPTokenizer files (vocab.json, merges.txt). open_clip: unused
    # (open_clip's SimpleTokenizer, whose BPE vocabulary ships with open_clip).
    tokenizer: Optional[str] = None
    # Which hidden states form the context: "final" (SD 1.x) or "penultimate" (SD 2.x), both
    # followed by the final layer norm.
    layer: Literal["final", "penultimate"] = "final"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not supported; allowed values: {', '.join(BACKENDS)}")
        check_layer(self.layer)
        if (self.model is None) == (self.model_cfg is None):
            raise ValueError("give exactly one of model (a name, file or folder) and model_cfg (a dict)")


def resolve_bundle(path: str | os.PathLike) -> tuple[Path, Path]:
    """(text_encoder dir, tokenizer dir) for a bundle root or for its ``text_encoder/`` folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text encoder path {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"text encoder path {path} must be a folder (a bundle root or its text_encoder/)")
    if (path / "text_encoder").is_dir():
        text_dir, tok_dir = path / "text_encoder", path / "tokenizer"
    elif (path / OPEN_CLIP_CONFIG).is_file() or (path / HF_CONFIG).is_file():
        text_dir, tok_dir = path, path.parent / "tokenizer"
    else:
        raise ValueError(
            f"{path} holds no known text encoder: expected a bundle root with text_encoder/ and tokenizer/, "
            f"or a text_encoder/ folder with {OPEN_CLIP_CONFIG} (open_clip) or {HF_CONFIG} (transformers "
            f"CLIPTextModel); found {sorted(p.name for p in path.iterdir())[:10]}"
        )
    if not tok_dir.is_dir():
        raise ValueError(f"{text_dir} has no tokenizer folder beside it: expected {tok_dir}")
    return text_dir, tok_dir


def detect_backend(text_dir: Path) -> str:
    if (text_dir / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    if (text_dir / HF_CONFIG).is_file():
        cfg = json.loads((text_dir / HF_CONFIG).read_text(encoding="utf-8"))
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") == "clip_text_model" or any(a.startswith("CLIPTextModel") for a in archs):
            return "transformers"
        raise ValueError(
            f"{text_dir / HF_CONFIG} is a {cfg.get('model_type') or archs} config; supported: a CLIPTextModel "
            f"(model_type 'clip_text_model') or an open_clip model ({OPEN_CLIP_CONFIG})"
        )
    raise ValueError(f"{text_dir} holds no known text encoder: expected {OPEN_CLIP_CONFIG} (open_clip) "
                     f"or {HF_CONFIG} (transformers CLIPTextModel)")
