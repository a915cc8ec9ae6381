"""The trained module of ``ldm train-clip``: open_clip's CLIP wrapped as (images, tokens) -> features,
a text pass trimmed to the batch's captions, and open_clip's weight-decay groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conditioning.clip_model import CLIP_MEAN, CLIP_STD


def encode_text_trimmed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (B, E), computed on the columns up to the batch's last end token.

    The text transformer is causal, so the states at and before each prompt's end token do not
    depend on the padding after it: cutting the padding is exact and saves most of the work
    (captions are ~10 tokens of 77).
    """
    from open_clip.transformer import text_global_pool

    n = int(tokens.argmax(dim=1).max()) + 1  # the end token has the highest id
    t = tokens[:, :n]  # (B, n)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)  # (B, n, D)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])  # (B, n, D)
    x = model.ln_final(x)  # (B, n, D)
    x = text_global_pool(x, t, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))  # (B, D)
    return model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection


class ContrastivePair(nn.Module):
    """The trained module: (images, tokens) -> (image features, text features, temperature).

    Wrapping the CLIP gives accelerate (DDP, autocast) one forward to wrap.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std  # (B, 3, S, S), images in [0, 1]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        image_features = F.normalize(self.clip.encode_image(self.normalize(images)), dim=-1)  # (B, E)
        text_features = F.normalize(encode_text_trimmed(self.clip, tokens), dim=-1)  # (B, E)
        return image_features, text_features, self.clip.logit_scale.exp()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and convolutions only, as open_clip's trainer does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "embedding" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
