"""Validation during training: the loss on the held-out split and images for fixed prompts and seeds.

The held-out loss uses the same t and noise at every evaluation (a generator seeded afresh each
time) and no caption dropout, so its curve moves only with the weights. Images come from the
pipeline the bundle will load (``Text2ImagePipeline``), drawn with DDIM from fixed seeds, and are
tiled into a labelled grid (``ldm.sweep_report.labelled_grid``: a column per prompt and seed). With a CLIP
(``conditioning.ClipScorer``) the images are also scored: ``clip_score`` for the validation prompts and,
in fine-tuning, ``base_clip_score`` for the base model's own prompts, whose fall from step 0 measures
what the fine-tune made the model forget.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.pipeline import Text2ImagePipeline
from ldm.schedule import NoiseSchedule
from ldm.sweep import SweepResult, clip_metrics, run_sweep
from ldm.sweep_report import labelled_grid
from train.unet.cache import LatentCache
from train.unet.objective import noised_batch, weighted_mse

HELDOUT_SEED = 1234  # the held-out loss's own fixed t and noise


@torch.no_grad()
def heldout_loss(model: Callable, cache: LatentCache, indices: np.ndarray, schedule: NoiseSchedule, *,
                 prediction: str, batch_size: int, max_batches: int, device, autocast,
                 contexts: Optional[Callable[[np.ndarray], torch.Tensor]] = None) -> float:
    """Mean (unweighted) loss of ``model(z_t, t, context)`` over held-out images, fixed t and noise.
    ``contexts(rows)``: the rows' contexts from a text encoder in training (default: the cached ones)."""
    if len(indices) == 0:
        return float("nan")
    generator = torch.Generator(device).manual_seed(HELDOUT_SEED)
    batches = cache.batches(indices, batch_size)  # each from one bucket
    if max_batches:
        batches = batches[:max_batches]
    total, count = 0.0, 0
    for idx in batches:
        z0 = cache.latents(idx).to(device)  # (B, C, h, w)
        ctx = (cache.contexts(idx) if contexts is None else contexts(idx)).to(device)  # (B, L, D)
        batch = noised_batch(z0, schedule, prediction=prediction, min_snr_gamma=None, noise_offset=0.0, generator=generator)
        with autocast():
            pred = model(batch.z_t, batch.t, ctx)
        total += float(weighted_mse(pred, batch)) * len(idx)
        count += len(idx)
    return total / count


def sample_images(pipe: Text2ImagePipeline, prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
                  guidance: float, batch_size: int) -> SweepResult:
    """Every (prompt, seed), DDIM with eta 0 from each seed's noise."""
    return run_sweep(pipe, prompts, [guidance], seeds, steps=steps, method="ddim", eta=0.0, batch_size=batch_size)


def sample_grid(pipe: Text2ImagePipeline, prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
                guidance: float, batch_size: int) -> Image.Image:
    """A labelled grid: one column per (prompt, seed), DDIM with eta 0 from each seed's noise."""
    return labelled_grid(sample_images(pipe, prompts, seeds, steps=steps, guidance=guidance, batch_size=batch_size))


def clip_score(result: SweepResult, scorer) -> float:
    """Mean CLIP score (``ldm.sweep.clip_metrics``: 100 x cosine) of a one-weight ``sample_images`` result."""
    clip_metrics(result, scorer)
    return result.metrics[result.cells[0]]["clip_score"]


def draw_prompts(captions: Sequence[str], base_prompts: Sequence[str], *, n_data: int = 4, n_base: int = 2) -> list[str]:
    """Validation prompts of a fine-tune: the first ``n_data`` distinct of ``captions`` (the held-out ones, in
    data order) and the first ``n_base`` base prompts (forgetting shows there)."""
    out: list[str] = []
    for c in captions:
        if c not in out and len(out) < n_data:
            out.append(c)
    return out + [p for p in base_prompts if p not in out][:n_base]
