"""PSNR and codebook statistics against analytic cases; SSIM against scikit-image."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from vae.metrics import code_histogram, codebook_usage, perplexity, psnr, ssim, to_unit


def test_psnr_of_a_constant_error_is_analytic():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for d in (0.1, 0.01):
        assert psnr(x + d, x).tolist() == pytest.approx([10 * math.log10(1 / d ** 2)] * 2, rel=1e-9)
    assert psnr(x, x)[0] > 150  # identical images: no division by zero


def test_ssim_matches_scikit_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 40, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    y[1] = x[1] * 0.5 + 0.25  # contrast change, a case SSIM and PSNR disagree on
    ours = ssim(y, x)
    for i in range(3):
        ref = structural_similarity(x[i].permute(1, 2, 0).numpy().astype(np.float64),
                                    y[i].permute(1, 2, 0).numpy().astype(np.float64), data_range=1.0,
                                    channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=True)
        assert ours[i].item() == pytest.approx(ref, abs=1e-10)
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 3)


def test_ssim_rejects_small_or_mismatched_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 15))


def test_codebook_usage_and_perplexity():
    counts = code_histogram(torch.tensor([[0, 1], [2, 3]]).repeat(5, 1), num_codes=8)  # 4 of 8 codes, uniform
    assert counts.tolist() == [5, 5, 5, 5, 0, 0, 0, 0]
    assert codebook_usage(counts) == 0.5
    assert perplexity(counts) == pytest.approx(4.0)
    assert perplexity(torch.tensor([7.0, 0, 0])) == pytest.approx(1.0)  # one code
    p = torch.tensor([0.5, 0.25, 0.25])
    assert perplexity(p * 100) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert perplexity(torch.zeros(4)) == 0.0


def test_to_unit_maps_model_range_to_pixels():
    assert to_unit(torch.tensor([-1.0, 0.0, 1.0, 3.0])).tolist() == [0.0, 0.5, 1.0, 1.0]
