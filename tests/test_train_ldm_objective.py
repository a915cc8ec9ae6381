"""The training objective: uniform t, targets consistent with z_t, min-SNR weights, noise offset."""

import pytest
import torch

from ldm.schedule import NoiseSchedule
from train.unet.objective import min_snr_weight, noised_batch, weighted_mse
from train_fakes import one_thread  # noqa: F401  (autouse fixture)

S = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)


def draw(prediction="eps", gamma=None, offset=0.0, b=64, hw=8, seed=0):
    z0 = torch.randn(b, 4, hw, hw, generator=torch.Generator().manual_seed(100 + seed))
    return z0, noised_batch(z0, S, prediction=prediction, min_snr_gamma=gamma, noise_offset=offset,
                            generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_oracle_denoiser_has_zero_loss(prediction):
    """A model that knows z0 and is handed only (z_t, t) predicts the target exactly: z_t, t and the
    target belong together (DDPM eq. 4; v = sqrt(abar) eps - sqrt(1 - abar) z0)."""
    z0, batch = draw(prediction)

    def oracle(z_t, t):
        eps = S.eps_from_x0(z0.double(), z_t.double(), t)
        return eps if prediction == "eps" else S.velocity(z0.double(), eps, t)

    pred = oracle(batch.z_t, batch.t)
    assert weighted_mse(pred, batch) < 1e-9
    assert weighted_mse(pred + 0.1, batch) > 1e-3  # and a wrong one does not


def test_timesteps_are_uniform_over_all_T():
    s = NoiseSchedule("linear", 10)
    z0 = torch.zeros(20000, 1, 1, 1)
    batch = noised_batch(z0, s, prediction="eps", min_snr_gamma=None, noise_offset=0.0, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(batch.t, minlength=10).double()
    assert batch.t.min() == 0 and batch.t.max() == 9
    assert ((counts - 2000).abs() < 5 * (2000 * 0.9) ** 0.5).all()  # 5 binomial sigmas


def test_min_snr_weights_match_the_paper():
    """Hang et al. 2023: w = min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v."""
    snr = torch.tensor([0.0, 0.01, 1.0, 4.9, 5.0, 20.0, 1e4], dtype=torch.float64)
    g = 5.0
    eps = min_snr_weight(snr, g, "eps")
    v = min_snr_weight(snr, g, "v")
    expected_eps = torch.tensor([1, 1, 1, 1, 1, 5 / 20, 5 / 1e4], dtype=torch.float64)
    expected_v = torch.tensor([0, 0.01 / 1.01, 1 / 2, 4.9 / 5.9, 5 / 6, 5 / 21, 5 / 10001], dtype=torch.float64)
    torch.testing.assert_close(eps, expected_eps)
    torch.testing.assert_close(v, expected_v)
    assert (min_snr_weight(snr, None, "eps") == 1).all()


def test_min_snr_weighting_reaches_the_loss():
    z0, plain = draw("eps", gamma=None, seed=3)
    _, weighted = draw("eps", gamma=1.0, seed=3)
    torch.testing.assert_close(plain.z_t, weighted.z_t)  # same draws, only weights differ
    pred = torch.zeros_like(plain.target)
    per_sample = plain.target.pow(2).flatten(1).mean(1)
    w = torch.clamp(1.0 / S.snr(weighted.t), max=1).float()
    torch.testing.assert_close(weighted_mse(pred, weighted), (w * per_sample).mean())


def test_noise_offset_shifts_each_channel_by_a_shared_draw():
    """With offset o, the noise's per-(sample, channel) mean has variance 1/(h w) + o^2."""
    _, base = draw("eps", offset=0.0, b=512, hw=16)
    _, shifted = draw("eps", offset=0.5, b=512, hw=16)
    var_base = base.target.mean((2, 3)).var().item()
    var_shifted = shifted.target.mean((2, 3)).var().item()
    assert abs(var_base - 1 / 256) < 0.3 / 256
    assert abs(var_shifted - (1 / 256 + 0.25)) < 0.03
