"""The denoising objective: what one training step feeds the U-Net and how its output is scored.

For clean latents z0 (B, C, h, w) (DESIGN.md, "Data flow"):

    t ~ U{0, ..., T-1}                     uniform timesteps
    eps ~ N(0, I)  (+ noise_offset * N(0, 1) per sample and channel, Guttenberg 2023)
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps           ``NoiseSchedule.add_noise``
    target = eps or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0   ``NoiseSchedule.training_target``
    loss = mean_b w_b * mean_chw (prediction - target)^2

With min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy", eq. 9 and sec. 3.4) the per-sample weight caps the x0-space weight SNR(t) at gamma and
converts it to the parameterisation's own loss: w = min(SNR, gamma) / SNR for eps (whose loss is
SNR times the x0 loss), w = min(SNR, gamma) / (SNR + 1) for v (SNR + 1 times). Without it, w = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ldm.schedule import NoiseSchedule


@dataclass
class NoisedBatch:
    """One step's U-Net input and regression target."""

    z_t: torch.Tensor  # (B, C, h, w) noised latents
    t: torch.Tensor  # (B,) long timesteps
    target: torch.Tensor  # (B, C, h, w) eps or v
    weight: torch.Tensor  # (B,) float32 per-sample loss weights


def min_snr_weight(snr: torch.Tensor, gamma: Optional[float], prediction: str) -> torch.Tensor:
    """Per-sample loss weights (B,) float64 from SNR(t) (B,): min(SNR, gamma) / SNR (eps),
    min(SNR, gamma) / (SNR + 1) (v); all ones when gamma is None."""
    if gamma is None:
        return torch.ones_like(snr)
    if prediction == "eps":
        return torch.clamp(gamma / snr, max=1.0)  # = min(SNR, gamma) / SNR, and 1 at SNR = 0
    if prediction == "v":
        return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    raise ValueError(f"prediction={prediction!r}; min-SNR weighting is defined for: eps, v")


def noised_batch(z0: torch.Tensor, schedule: NoiseSchedule, *, prediction: str, min_snr_gamma: Optional[float],
                 noise_offset: float, generator: torch.Generator) -> NoisedBatch:
    """Draw t and the noise from ``generator`` (on z0's device) and build z_t, the target and the weights."""
    b, c = z0.shape[:2]
    t = torch.randint(0, schedule.T, (b,), generator=generator, device=generator.device).to(z0.device)  # (B,)
    noise = torch.randn(z0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(z0)  # (B, C, h, w)
    if noise_offset:
        offset = torch.randn((b, c, 1, 1), generator=generator, device=generator.device, dtype=torch.float32)
        noise = noise + noise_offset * offset.to(z0)  # (B, C, h, w)
    z_t = schedule.add_noise(z0, noise, t)  # (B, C, h, w)
    target = schedule.training_target(z0, noise, t, prediction)  # (B, C, h, w)
    weight = min_snr_weight(schedule.snr(t), min_snr_gamma, prediction).to(device=z0.device, dtype=torch.float32)  # (B,)
    return NoisedBatch(z_t, t, target, weight)


def weighted_mse(prediction: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
    """sum_b w_b * mean_chw (prediction - target)^2 / B, in float32 whatever the autocast dtype."""
    per_sample = (prediction.float() - batch.target.float()).pow(2).flatten(1).mean(1)  # (B,)
    return (batch.weight * per_sample).mean()
