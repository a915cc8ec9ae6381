"""open_clip CLIP models: configs, an explicit offline factory, and the folder format on disk.

A model is described by an open_clip model config (the dicts of open_clip's
``model_configs/*.json``: ``embed_dim``, ``vision_cfg``, ``text_cfg``, ...). It
comes from a built-in name, a JSON file or a dict, and for our small CLIP from
``ClipModelConfig``, a typed config that the YAML recipes in
``configs/clip/`` fill in. ``build_open_clip_model`` builds it with random
weights, never touching a hub; weights then come only from a local
safetensors file.

On disk (a bundle's ``text_encoder/``): ``open_clip_config.json`` =
``{"model_cfg", "preprocess_cfg", "backend": "open_clip", "layer"}`` and
``model.safetensors`` with the whole CLIP (image tower included: the same
model scores images against prompts). open_clip itself can read that folder
with ``open_clip.create_model("local-dir:PATH")``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

import torch

OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS = "model.safetensors"
CLIP_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer: 256 bytes x 2 + 48,894 merges + 2 special tokens
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN, per RGB channel
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_DATASET_STD


@dataclasses.dataclass
class VisionTowerConfig:
    """The image tower of a small CLIP."""

    # "vit" (open_clip VisionTransformer) or "resnet" (open_clip ModifiedResNet, attention pooling).
    kind: Literal["vit", "resnet"] = "vit"
    # Input resolution in pixels (square); ResNet needs a multiple of 32.
    image_size: int = 64
    # ViT: token width; ResNet: stem width (stages have 4x, 8x, 16x, 32x channels).
    width: int = 128
    # ViT: transformer blocks; ResNet: bottleneck blocks in each of its 4 stages.
    layers: int = 4
    # ViT only: patch side in pixels (64 px / 8 = 8x8 = 64 tokens).
    patch_size: int = 8
    # Width of one attention head (ViT blocks; ResNet's attention pool).
    head_width: int = 32
    # ViT only: MLP hidden width / token width.
    mlp_ratio: float = 4.0

    def __post_init__(self):
        for name in ("image_size", "width", "layers", "patch_size", "head_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"vision.{name}={getattr(self, name)} must be >= 1")
        if self.kind == "vit":
            if self.image_size % self.patch_size:
                raise ValueError(f"vision.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
            if self.width % self.head_width:
                raise ValueError(f"vision.width={self.width} must be a multiple of head_width={self.head_width}")
        elif self.image_size % 32 or (self.width * 32) % self.head_width:
            raise ValueError(f"vision.kind='resnet' needs image_size % 32 == 0 and width * 32 % head_width == 0; "
                             f"got image_size={self.image_size}, width={self.width}, head_width={self.head_width}")


@dataclasses.dataclass
class TextTowerConfig:
    """The text tower: a causal transformer over CLIP's BPE tokens, as in open_clip."""

    # Tokens per prompt (77, as every CLIP and Stable Diffusion).
    context_length: int = 77
    # Vocabulary size; must be 49408, open_clip's SimpleTokenizer.
    vocab_size: int = CLIP_VOCAB_SIZE
    # Token width, which is also the context dimension D the U-Net attends to.
    width: int = 256
    # Attention heads (width must be a multiple).
    heads: int = 4
    # Transformer blocks.
    layers: int = 4
    # MLP hidden width / token width.
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.vocab_size != CLIP_VOCAB_SIZE:
            raise ValueError(f"text.vocab_size={self.vocab_size}: open_clip's tokenizer needs {CLIP_VOCAB_SIZE}")
        if self.context_length < 3 or self.width < 1 or self.layers < 1 or self.heads < 1:
            raise ValueError("text.context_length must be >= 3 and text.width, layers, heads >= 1")
        if self.width % self.heads:
            raise ValueError(f"text.width={self.width} must be a multiple of text.heads={self.heads}")


@dataclasses.dataclass
class ClipModelConfig:
    """A small CLIP in open_clip's architecture (``open_clip.CLIP``)."""

    # Dimension of the joint image-text embedding (the pooled output and the CLIP score space).
    embed_dim: int = 256
    vision: VisionTowerConfig = dataclasses.field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = dataclasses.field(default_factory=TextTowerConfig)
    # QuickGELU (OpenAI's CLIP) instead of GELU.
    quick_gelu: bool = False

    def __post_init__(self):
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim={self.embed_dim} must be >= 1")

    def to_open_clip(self) -> dict[str, Any]:
        """The equivalent open_clip model config dict."""
        v, t = self.vision, self.text
        if v.kind == "vit":
            vision_cfg = {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                          "patch_size": v.patch_size, "head_width": v.head_width, "mlp_ratio": v.mlp_ratio}
        else:
            vision_cfg = {"image_size": v.image_size, "layers": [v.layers] * 4, "width": v.width,
                          "head_width": v.head_width, "patch_size": None}
        text_cfg = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                    "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}
        return {"embed_dim": self.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg, "quick_gelu": self.quick_gelu}


def resolve_model_cfg(model: Optional[str] = None, model_cfg: Optional[dict] = None) -> dict[str, Any]:
    """An open_clip model config dict from a built-in name, a JSON file, or a dict (copied)."""
    if (model is None) == (model_cfg is None):
        raise ValueError("give exactly one of model (a built-in open_clip name or a JSON file) and model_cfg (a dict)")
    if model_cfg is not None:
        if not isinstance(model_cfg, dict):
            raise ValueError(f"model_cfg must be a dict, got {type(model_cfg).__name__}")
        return copy.deepcopy(model_cfg)
    path = Path(model)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config file {path} does not exist")
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["model_cfg"] if "model_cfg" in data else data
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"model={model!r} is neither a JSON file nor a built-in open_clip model config; "
                         f"open_clip.list_models() lists the built-in names")
    return cfg


def build_open_clip_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """``open_clip.CLIP`` with random weights from a model config dict; nothing is downloaded.

    Supported: open_clip's own image towers (ViT, ModifiedResNet) and its own text transformer.
    Configs whose towers come from timm or Hugging Face (pretrained weights fetched by name) or
    that need a non-CLIP class (``custom_text``, CoCa) are refused.
    """
    import open_clip

    cfg = copy.deepcopy(model_cfg)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"open_clip model config lacks {key!r}; it needs embed_dim, vision_cfg, text_cfg")
    text_cfg, vision_cfg = cfg["text_cfg"], cfg["vision_cfg"]
    if cfg.get("custom_text") or "multimodal_cfg" in cfg:
        raise ValueError("open_clip configs with custom_text or multimodal_cfg (CoCa) are not supported; "
                         "supported: open_clip.CLIP with its built-in text transformer")
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"text_cfg.hf_model_name/hf_tokenizer_name={text_cfg.get('hf_model_name') or text_cfg.get('hf_tokenizer_name')!r}: "
                         "Hugging Face text towers and tokenizers are fetched by name; only open_clip's own "
                         "text transformer and tokenizer are supported (offline)")
    if vision_cfg.get("timm_model_name"):
        raise ValueError(f"vision_cfg.timm_model_name={vision_cfg['timm_model_name']!r}: timm towers are not "
                         "supported; use open_clip's ViT (layers: int) or ModifiedResNet (layers: list)")
    cfg.pop("custom_text", None)
    try:
        return open_clip.CLIP(**cfg)
    except TypeError as exc:
        raise ValueError(f"open_clip model config does not fit open_clip.CLIP: {exc}") from None


TOKEN_TABLE = "token_embedding.weight"
KEPT_IDS = "token_embedding.kept_ids"  # int64 (K,): the vocabulary ids whose rows a compact table keeps
FALLBACK = "token_embedding.fallback"  # (D,): the one row every other id gets


def compact_token_table(state: dict[str, torch.Tensor], keep_ids) -> dict[str, torch.Tensor]:
    """Keep only the token-embedding rows of ``keep_ids``; every other id shares their mean row.

    A small CLIP trained on one data set only ever moves the rows of the tokens in its captions;
    the other ~49k rows stay at their random initialisation, carry nothing learned, and make up
    most of the file (49,408 x 256 of ~16M parameters for the emoji CLIP). Prompts made only of
    kept tokens encode exactly as before. ``expand_token_table`` undoes the layout on load.
    """
    table = state[TOKEN_TABLE]  # (V, D)
    kept = torch.as_tensor(sorted(set(int(i) for i in keep_ids)), dtype=torch.int64)  # (K,)
    if len(kept) == 0 or kept[0] < 0 or kept[-1] >= table.shape[0]:
        raise ValueError(f"keep_ids must be non-empty ids in [0, {table.shape[0]}); got {len(kept)} ids")
    dropped = torch.ones(table.shape[0], dtype=torch.bool)
    dropped[kept] = False
    fallback = table[dropped].mean(0) if dropped.any() else torch.zeros_like(table[0])  # (D,)
    return {**{k: v for k, v in state.items() if k != TOKEN_TABLE},
            TOKEN_TABLE: table[kept].contiguous(), KEPT_IDS: kept, FALLBACK: fallback}


def compact_losslessly(state: dict[str, torch.Tensor], fallback_id: int) -> dict[str, torch.Tensor]:
    """The compact layout of ``state`` keeping every row that differs from row ``fallback_id``, which all the
    others share; ``expand_token_table`` gives ``state`` back exactly. For a packed table after fine-tuning:
    the rows a run learned are kept beside the packed ones, the shared row stays one row."""
    table = state[TOKEN_TABLE]  # (V, D)
    row = table[fallback_id]
    kept = (table != row).any(1).nonzero().flatten()  # (K,)
    return {**{k: v for k, v in state.items() if k != TOKEN_TABLE},
            TOKEN_TABLE: table[kept].contiguous(), KEPT_IDS: kept, FALLBACK: row.clone()}


def expand_token_table(state: dict[str, torch.Tensor], vocab_size: int = CLIP_VOCAB_SIZE) -> dict[str, torch.Tensor]:
    """The full (vocab_size, D) token table from a compact one (see ``compact_token_table``); other states pass."""
    if KEPT_IDS not in state:
        return state
    state = dict(state)
    kept, fallback, rows = state.pop(KEPT_IDS), state.pop(FALLBACK), state[TOKEN_TABLE]
    table = fallback.to(rows.dtype).expand(vocab_size, -1).clone()  # (V, D)
    table[kept] = rows
    state[TOKEN_TABLE] = table
    return state


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a local safetensors state dict into ``model`` (all keys must match)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"weights file {path} must be .safetensors (pickled checkpoints are not loaded)")
    table = model.state_dict().get(TOKEN_TABLE)
    state = expand_token_table(load_file(str(path)), table.shape[0] if table is not None else CLIP_VOCAB_SIZE)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not match the model config: missing keys {result.missing_keys[:5]}, "
                         f"unexpected keys {result.unexpected_keys[:5]}")


def preprocess_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """How images are prepared for the image tower: size, mean, std (open_clip's defaults)."""
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return {"size": size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def save_open_clip_folder(model: torch.nn.Module, model_cfg: dict, folder: Path, **extra: Any) -> None:
    """Write ``open_clip_config.json`` and ``model.safetensors`` into an existing folder."""
    from safetensors.torch import save_file

    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model_cfg), "backend": "open_clip", **extra}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def read_open_clip_folder(folder: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model with its weights, the folder's open_clip_config.json) from a saved folder."""
    path = folder / OPEN_CLIP_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    if "model_cfg" not in config:
        raise ValueError(f"{path} has no 'model_cfg'; expected {{'model_cfg': {{...}}, 'backend': 'open_clip', ...}}")
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has {OPEN_CLIP_CONFIG} but no {WEIGHTS}")
    model = build_open_clip_model(config["model_cfg"])
    load_weights(model, folder / WEIGHTS)
    return model, config
