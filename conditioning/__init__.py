"""Text conditioning: CLIP text encoders, tokenizers, the empty prompt, embedding cache, CLIP score.

    from conditioning import load_text_encoder, EMPTY_PROMPT, apply_caption_dropout
    encoder = load_text_encoder("path/to/bundle")       # text_encoder/ + tokenizer/
    context, pooled = encoder(["koala, twemoji style"]) # (B, 77, D), (B, D_pooled)
    uncond = encoder.empty_context(4)                   # (4, 77, D), the output for ""

Backends: open_clip (``open_clip_backend``) and transformers CLIPTextModel
(``hf_clip_backend``). ``empty`` defines the empty prompt for training and
sampling, ``cache`` stores caption contexts on disk, ``scorer`` gives the CLIP
score, ``clip_model`` builds and saves open_clip models offline.
"""

from conditioning.cache import CachedEmbeddings, EmbeddingCache
from conditioning.clip_model import ClipModelConfig, TextTowerConfig, VisionTowerConfig
from conditioning.empty import EMPTY_PROMPT, apply_caption_dropout, unconditional_context
from conditioning.encoders import TextEncoder, TextEncoderConfig
from conditioning.loading import build_text_encoder, load_text_encoder
from conditioning.scorer import ClipScorer, load_clip_scorer

__all__ = [
    "EMPTY_PROMPT",
    "CachedEmbeddings",
    "ClipModelConfig",
    "ClipScorer",
    "EmbeddingCache",
    "TextEncoder",
    "TextEncoderConfig",
    "TextTowerConfig",
    "VisionTowerConfig",
    "apply_caption_dropout",
    "build_text_encoder",
    "load_clip_scorer",
    "load_text_encoder",
    "unconditional_context",
]
