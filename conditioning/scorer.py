"""CLIP score: how well images match prompts, measured with an open_clip CLIP (our bundle's small one).

    scorer = load_clip_scorer("path/to/bundle")
    s = scorer.score(images, ["koala, twemoji style"] * 4)    # (4,)

``encode_text`` and ``encode_image`` give L2-normalised embeddings in CLIP's
joint space. ``score`` follows the CLIP-score convention of torchmetrics'
``CLIPScore`` (Hessel et al. 2021 with w = 100): ``100 * max(cos(image, text), 0)``,
so it lies in [0, 100]; ``cosine`` is the raw cosine in [-1, 1]. Scores are
comparable only between runs that use the same CLIP.

Images are float tensors (B, 3, H, W) in [-1, 1] (the pipeline's range; values
outside are clamped) or a list of PIL images. They are resized (shorter side
to the tower's input size, bicubic with antialiasing), centre-cropped and
normalised with CLIP's mean and std, as open_clip's preprocessing does.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conditioning.clip_model import OPEN_CLIP_CONFIG, preprocess_cfg
from conditioning.encoders import check_prompts, detect_backend, resolve_bundle
from conditioning.open_clip_backend import load_open_clip_encoder

CLIP_SCORE_SCALE = 100.0


class ClipScorer(nn.Module):
    """Image and text embeddings and the CLIP score of an ``OpenCLIPTextEncoder``'s whole CLIP model."""

    def __init__(self, encoder, preprocess: dict):
        super().__init__()
        self.encoder = encoder.frozen()
        self.size = int(preprocess["size"] if isinstance(preprocess["size"], int) else preprocess["size"][0])
        self.register_buffer("mean", torch.tensor(preprocess["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def model(self) -> nn.Module:
        return self.encoder.model

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (B, E)."""
        _, pooled = self.encoder(prompts)  # (B, E), open_clip's encode_text
        return F.normalize(pooled.float(), dim=-1)

    def preprocess(self, images) -> torch.Tensor:
        """Images -> the image tower's input (B, 3, S, S), normalised, on the model's device."""
        x = _as_tensor(images).to(self.device, torch.float32)  # (B, 3, H, W) in [-1, 1]
        x = (x.clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        if (h, w) != (self.size, self.size):
            new = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
            x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            top, left = (new[0] - self.size) // 2, (new[1] - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]  # (B, 3, S, S)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        """L2-normalised image embeddings (B, E) of a (B, 3, H, W) tensor in [-1, 1] or a list of PIL images."""
        x = self.preprocess(images).to(self.encoder.dtype)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def cosine(self, images, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity (B,) of image i with prompt i (one prompt is shared by all images)."""
        prompts = check_prompts(prompts)
        img = self.encode_image(images)  # (B, E)
        if len(prompts) not in (1, img.shape[0]):
            raise ValueError(f"got {img.shape[0]} images and {len(prompts)} prompts; give one prompt per image, or one for all")
        txt = self.encode_text(prompts)  # (B or 1, E)
        return (img * txt).sum(dim=-1)

    def score(self, images, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP score (B,) = 100 * max(cosine, 0), torchmetrics' ``CLIPScore`` convention."""
        return CLIP_SCORE_SCALE * self.cosine(images, prompts).clamp(min=0)


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1, 1]; got dtype {images.dtype}")
        return images
    if isinstance(images, (list, tuple)) and images and all(hasattr(im, "convert") for im in images):
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images]  # (H, W, 3) each
        if len({a.shape for a in arrays}) != 1:
            raise ValueError("PIL images in one call must share one size; score them in groups of equal size")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    raise ValueError(f"images must be a float tensor (B, 3, H, W) in [-1, 1] or a non-empty list of PIL images, "
                     f"got {type(images).__name__}")


def load_clip_scorer(path: str | os.PathLike) -> ClipScorer:
    """A ``ClipScorer`` from a bundle root (or its ``text_encoder/``) holding an open_clip CLIP."""
    text_dir, tok_dir = resolve_bundle(path)
    backend = detect_backend(text_dir)
    if backend != "open_clip":
        raise ValueError(f"{text_dir} holds a {backend} text model without an image tower; the CLIP score needs "
                         f"an open_clip CLIP ({OPEN_CLIP_CONFIG}) with its image tower")
    encoder = load_open_clip_encoder(text_dir, tok_dir)
    config = json.loads((text_dir / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
    return ClipScorer(encoder, config.get("preprocess_cfg") or preprocess_cfg(config["model_cfg"]))
