"""Reconstruction and codebook metrics: PSNR, SSIM, codebook usage and perplexity.

Images are compared in [0, 1] (data range 1); convert from the model's [-1, 1] with ``to_unit``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (what is saved as a PNG)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, 10 log10(range^2 / MSE), of (B, C, H, W) batches -> (B,)."""
    mse = (x.double() - y.double()).square().flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-20))


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    return g / g.sum()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, C, H, W) batches -> (B,): an 11x11 Gaussian window with
    sigma 1.5, C1 = (k1 L)^2, C2 = (k2 L)^2, sample covariances (N / (N - 1)), averaged over the 'valid'
    region and the channels. This is scikit-image's ``structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=True, data_range=L, channel_axis=...)``."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape; got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim needs images of at least {window}x{window}; got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    c = x.shape[1]
    g = _gaussian_window(window, sigma, x.dtype, x.device)
    kernel_h = g.view(1, 1, 1, window).repeat(c, 1, 1, 1)  # (C, 1, 1, win)
    kernel_v = g.view(1, 1, window, 1).repeat(c, 1, 1, 1)  # (C, 1, win, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kernel_h, groups=c), kernel_v, groups=c)  # (B, C, H-win+1, W-win+1)

    n = window * window
    cov_norm = n / (n - 1)
    mu_x, mu_y = blur(x), blur(y)
    var_x = cov_norm * (blur(x * x) - mu_x * mu_x)
    var_y = cov_norm * (blur(y * y) - mu_y * mu_y)
    cov_xy = cov_norm * (blur(x * y) - mu_x * mu_y)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)  # (B,)


def code_histogram(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Counts of each code among ``indices`` (any shape) -> (K,) float."""
    return torch.bincount(indices.flatten().long(), minlength=num_codes).float()


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of codes used at least once, from a (K,) histogram."""
    return float((counts > 0).float().mean())


def perplexity(counts: torch.Tensor) -> float:
    """exp of the entropy of code use, from a (K,) histogram: K for uniform use, 1 for one code."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(math.exp(float(entropy)))
