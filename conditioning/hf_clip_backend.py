"""The transformers backend: ``CLIPTextModel`` (or ``...WithProjection``) + ``CLIPTokenizer`` from local folders.

This is how Stable Diffusion's diffusers folders hold their text encoder
(``text_encoder/config.json`` + weights, ``tokenizer/vocab.json`` +
``merges.txt``). The context is what diffusers' ``encode_prompt`` gives:
``last_hidden_state`` (final layer, after ``final_layer_norm``) or, for
``layer="penultimate"``, ``hidden_states[-2]`` followed by ``final_layer_norm``
(diffusers' ``clip_skip=1``). Tokens are padded to ``max_length`` with the
tokenizer's pad token and no attention mask is passed, as in diffusers, unless
the model config sets ``use_attention_mask``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Optional

import torch

from conditioning.clip_model import load_weights
from conditioning.encoders import HF_CONFIG, TextEncoder, TextEncoderConfig
from ldm_io import atomic_directory

CONTEXT_LAYER_KEY = "context_layer"  # our extra key in config.json when the saved choice is not "final"


class HFCLIPTextEncoder(TextEncoder):
    """A text encoder over a transformers ``CLIPTextModel`` and ``CLIPTokenizer``."""

    backend = "transformers"

    def __init__(self, model: torch.nn.Module, tokenizer, layer: str = "final"):
        super().__init__(layer)
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        if not isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):
            raise ValueError(f"the transformers backend needs a CLIPTextModel, got {type(model).__name__}")
        config = model.config
        if layer == "penultimate" and config.num_hidden_layers < 2:
            raise ValueError("layer='penultimate' needs a text model with at least 2 layers")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(min(tokenizer.model_max_length, config.max_position_embeddings))
        self.context_dim = int(config.hidden_size)
        self.with_projection = isinstance(model, CLIPTextModelWithProjection)
        self.pooled_dim = int(config.projection_dim if self.with_projection else config.hidden_size)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text model only {config.vocab_size}")

    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]

    def _tokenizer_fingerprint(self) -> str:
        vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()), ensure_ascii=False)
        digest = hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]
        return f"{type(self.tokenizer).__name__}/{digest}/{self.pad_token_id}"

    def _encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = None
        if getattr(self.model.config, "use_attention_mask", False):
            first_eos = (tokens == self.eos_token_id).int().argmax(dim=1, keepdim=True)  # (B, 1)
            mask = (torch.arange(tokens.shape[1], device=tokens.device) <= first_eos).long()  # (B, L)
        out = self.model(input_ids=tokens, attention_mask=mask, output_hidden_states=self.layer == "penultimate")
        if self.layer == "final":
            context = out.last_hidden_state  # (B, L, D)
        else:
            text_model = getattr(self.model, "text_model", self.model)
            context = text_model.final_layer_norm(out.hidden_states[-2])  # (B, L, D)
        pooled = out.text_embeds if self.with_projection else out.pooler_output  # (B, D_pooled)
        return context, pooled

    def save_pretrained(self, root: str | os.PathLike) -> Path:
        root = Path(root)
        with atomic_directory(root / "text_encoder") as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            if self.layer != "final":
                path = tmp / HF_CONFIG
                config = json.loads(path.read_text(encoding="utf-8"))
                config[CONTEXT_LAYER_KEY] = self.layer
                path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        with atomic_directory(root / "tokenizer") as tmp:
            self.tokenizer.save_pretrained(tmp)
        return root


def _model_class(config):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    archs = getattr(config, "architectures", None) or []
    return CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in archs else CLIPTextModel


def _load_tokenizer(tok_dir: str | os.PathLike):
    from transformers import CLIPTokenizer

    tok_dir = Path(tok_dir)
    if not tok_dir.is_dir() or not ((tok_dir / "vocab.json").is_file() or (tok_dir / "tokenizer.json").is_file()):
        raise ValueError(f"{tok_dir} is not a CLIPTokenizer folder: expected vocab.json + merges.txt (or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def load_hf_encoder(text_dir: Path, tok_dir: Path, layer: Optional[str] = None) -> HFCLIPTextEncoder:
    """The weights as ``ldm_io.weights.find_weights`` finds and checks them: model.safetensors, or only
    model.fp16.safetensors (loaded into float32), or pytorch_model.bin (read with ``weights_only=True``)."""
    from transformers import CLIPTextConfig

    from ldm_io.weights import find_weights, refused_pickle

    config = CLIPTextConfig.from_pretrained(str(text_dir), local_files_only=True)
    weights = find_weights(text_dir, "model", "pytorch_model")
    try:
        model = _model_class(config).from_pretrained(str(text_dir), local_files_only=True, dtype=torch.float32,
                                                     use_safetensors=weights.safetensors, variant=weights.variant)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        if weights.safetensors:
            raise
        raise refused_pickle(weights.files[0], exc) from None
    saved_layer = getattr(config, CONTEXT_LAYER_KEY, "final")
    return HFCLIPTextEncoder(model, _load_tokenizer(tok_dir), layer=layer or saved_layer)


def build_hf_encoder(config: TextEncoderConfig) -> HFCLIPTextEncoder:
    from transformers import CLIPTextConfig

    if config.tokenizer is None:
        raise ValueError("backend='transformers' needs tokenizer: a folder with CLIPTokenizer files")
    tokenizer = _load_tokenizer(config.tokenizer)
    if config.model_cfg is not None:
        hf_config = CLIPTextConfig(**config.model_cfg)
        model = _model_class(hf_config)(hf_config)
        if config.weights is not None:
            load_weights(model, config.weights)
    else:
        folder = Path(config.model)
        if not (folder / HF_CONFIG).is_file():
            raise ValueError(f"model={config.model!r} must be a folder with a CLIPTextModel {HF_CONFIG}")
        hf_config = CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
        if config.weights is not None:
            model = _model_class(hf_config)(hf_config)
            load_weights(model, config.weights)
        else:
            model = _model_class(hf_config).from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    return HFCLIPTextEncoder(model, tokenizer, layer=config.layer)
