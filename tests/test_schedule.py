"""ldm.schedule: beta schedules and timesteps against diffusers, the posterior and the
parameterisations against their derivations, and the errors for bad input."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm.schedule import NoiseSchedule, inference_timesteps

T = 1000
DIFFUSERS_EQUIVALENT = {  # ours -> diffusers (beta_schedule, beta_start, beta_end)
    "linear": ("linear", 1e-4, 0.02),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "quadratic": ("scaled_linear", 1e-4, 0.02),
    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
}


def diffusers_scheduler(name):
    beta_schedule, b0, b1 = DIFFUSERS_EQUIVALENT[name]
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=b0, beta_end=b1)


def ours(name):
    return NoiseSchedule(name, T, *DIFFUSERS_EQUIVALENT[name][1:])


@pytest.mark.parametrize("name", list(DIFFUSERS_EQUIVALENT))
def test_betas_and_alphas_cumprod_match_diffusers(name):
    s, ref = ours(name), diffusers_scheduler(name)
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float64 and s.betas.shape == (T,)
    torch.testing.assert_close(s.betas.float(), ref.betas, rtol=2e-6, atol=0)
    # diffusers' cumprod runs in float32 and drifts; ours is float64 throughout
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=5e-5, atol=0)


def test_cosine_follows_nichol_dhariwal():
    s = NoiseSchedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    uncapped = s.betas < 0.999
    assert s.betas.max().item() == pytest.approx(0.999)  # the cap bites at the end only
    assert uncapped[: T - 1].all()
    torch.testing.assert_close(s.alphas_cumprod[uncapped], abar[uncapped], rtol=1e-12, atol=1e-15)


def test_quadratic_is_sqrt_linear_squared():
    s = NoiseSchedule("quadratic", 10, 1e-4, 0.02)
    expected = np.linspace(1e-2, math.sqrt(0.02), 10) ** 2
    np.testing.assert_allclose(s.betas.numpy(), expected, rtol=1e-14)


@pytest.mark.parametrize("name", list(DIFFUSERS_EQUIVALENT))
def test_add_noise_matches_closed_form_and_diffusers(name):
    s, ref = ours(name), diffusers_scheduler(name)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x_t = s.add_noise(x0, noise, t)
    assert x_t.dtype == torch.float32
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_t, ref.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5)


def test_posterior_is_gaussian_conditioning():
    """q(x_s | x_t, x_0) from the joint Gaussian of (x_s, x_t) given x_0, for s = t-1 and strided s."""
    sched = NoiseSchedule("scaled_linear", T, 0.00085, 0.012)
    for t, s in [(1, 0), (500, 499), (999, 998), (999, 899), (600, 17), (5, -1)]:
        a_t, a_s = sched.abar(t).item(), sched.abar(s).item()
        var_s, var_t = 1 - a_s, 1 - a_t  # Var(x_s | x0), Var(x_t | x0)
        cov = math.sqrt(a_t / a_s) * var_s  # Cov(x_s, x_t | x0)
        ct = cov / var_t  # regression of x_s on x_t
        c0 = math.sqrt(a_s) - ct * math.sqrt(a_t)  # E[x_s | x0] - ct E[x_t | x0], per unit x0
        var = var_s - cov**2 / var_t
        got = [v.item() for v in sched.posterior(t, s)]
        assert got == pytest.approx([c0, ct, var], rel=1e-10, abs=1e-15)


def test_posterior_one_step_is_ddpm_eq7():
    sched = NoiseSchedule("linear", T)
    t = torch.arange(1, T)
    beta, abar, abar_prev = sched.betas[t], sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1]
    c0, ct, var = sched.posterior(t)
    torch.testing.assert_close(c0, abar_prev.sqrt() * beta / (1 - abar))
    torch.testing.assert_close(ct, (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar))
    torch.testing.assert_close(var, (1 - abar_prev) / (1 - abar) * beta)
    # ...which is diffusers' DDPM variance ("fixed_small"), given the same (float64) abar
    ref = DDPMScheduler(num_train_timesteps=T)
    ref.alphas_cumprod = sched.alphas_cumprod
    torch.testing.assert_close(var, torch.stack([ref._get_variance(int(i)) for i in t]), rtol=1e-12, atol=0)


def test_ddim_sigma_eta1_is_posterior_std():
    sched = NoiseSchedule("linear", T)
    t, s = torch.tensor([999, 500, 20]), torch.tensor([899, 480, -1])
    torch.testing.assert_close(sched.ddim_sigma(t, s, 1.0), sched.posterior(t, s)[2].sqrt())
    torch.testing.assert_close(sched.ddim_sigma(t, s, 0.5), 0.5 * sched.posterior(t, s)[2].sqrt())
    assert (sched.ddim_sigma(t, s, 0.0) == 0).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_round_trip(prediction):
    sched = NoiseSchedule("cosine", T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 250, 700, 990])
    x_t = sched.add_noise(x0, noise, t)
    target = sched.training_target(x0, noise, t, prediction)
    x0_hat, eps_hat = sched.split_prediction(target, x_t, t, prediction)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-7, atol=1e-7)


def test_velocity_matches_diffusers():
    sched, ref = NoiseSchedule("linear", T), DDPMScheduler(num_train_timesteps=T)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0, 100, 600, 999])
    torch.testing.assert_close(sched.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-4, atol=1e-5)


def test_snr():
    sched, ref = NoiseSchedule("scaled_linear", T, 0.00085, 0.012), diffusers_scheduler("scaled_linear")
    t = torch.arange(T)
    snr = sched.snr(t)
    torch.testing.assert_close(snr, sched.alphas_cumprod / (1 - sched.alphas_cumprod))
    assert (snr[1:] < snr[:-1]).all()  # noise only grows
    torch.testing.assert_close(snr.float(), compute_snr(ref, t), rtol=1e-4, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 333, 999, 1000])
def test_timesteps_match_diffusers(spacing, steps):
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(num_train_timesteps=T, timestep_spacing=spacing)
        ref.set_timesteps(steps)
        assert inference_timesteps(T, steps, spacing) == ref.timesteps.tolist()


def test_timesteps_steps_offset_and_full_chain():
    ref = DDIMScheduler(num_train_timesteps=T, steps_offset=1)  # Stable Diffusion's scheduler config
    ref.set_timesteps(50)
    assert inference_timesteps(T, 50, "leading", offset=1) == ref.timesteps.tolist()
    full = list(range(T - 1, -1, -1))
    assert all(inference_timesteps(T, T, sp) == full for sp in ("leading", "trailing", "linspace"))


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: NoiseSchedule("sigmoid"), ["beta_schedule='sigmoid'", "linear", "scaled_linear", "cosine", "quadratic"]),
        (lambda: NoiseSchedule("linear", beta_start=0.02, beta_end=0.01), ["beta_start"]),
        (lambda: NoiseSchedule("linear", num_train_timesteps=0), ["num_train_timesteps"]),
        (lambda: inference_timesteps(T, 0, "leading"), ["steps=0", "1..1000"]),
        (lambda: inference_timesteps(T, 1001, "leading"), ["steps=1001", "1..1000"]),
        (lambda: inference_timesteps(T, 10, "uniform"), ["timestep_spacing='uniform'", "leading", "trailing", "linspace"]),
        (lambda: NoiseSchedule().ddim_sigma(10, 5, -0.1), ["eta"]),
        (lambda: NoiseSchedule().abar(1000), ["-1..999"]),
        (lambda: NoiseSchedule().split_prediction(torch.zeros(2, 3), torch.zeros(2, 3), 5, "score"), ["prediction='score'", "eps", "x0", "v"]),
        (lambda: NoiseSchedule().add_noise(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([1, 2])), ["shapes must match", "x0=(2, 3)", "noise=(2, 4)"]),
    ],
)
def test_bad_input_names_argument_and_allowed_values(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for w in words:
        assert w in str(info.value)
