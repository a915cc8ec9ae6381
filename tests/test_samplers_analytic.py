"""Samplers driven by the exact noise predictor of Gaussian data reproduce that Gaussian.

For x0 ~ N(mu, s^2) (each dimension independent), x_t = sqrt(a) x0 + sqrt(1 - a) eps is Gaussian
jointly with eps, and the MMSE noise predictor is the linear regression of eps on x_t:

    eps*(x_t, t) = Cov(eps, x_t) / Var(x_t) (x_t - E x_t)
                 = sqrt(1 - a) / (a s^2 + 1 - a) * (x_t - sqrt(a) mu),     a = abar_t.

x_T is drawn from the exact marginal q(x_T) = N(sqrt(a_T) mu, a_T s^2 + 1 - a_T), so any error
left is the sampler's.
"""

import math

import pytest
import torch

from ldm.samplers import sample
from ldm.schedule import NoiseSchedule

MU, S = 1.5, 0.5
N = 50_000


def exact_eps(schedule):
    def denoise(x, t):
        a = schedule.abar(t).to(x.dtype).view(-1, 1)  # (B, 1)
        return (1 - a).sqrt() / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)

    return denoise


def marginal_x_T(schedule, standardize=False, seed=0):
    z = torch.randn(N, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # (N, 1)
    if standardize:  # sample mean 0, std 1 exactly: a deterministic affine sampler then has no MC error
        z = (z - z.mean()) / z.std(unbiased=False)
    a = schedule.alphas_cumprod[-1].item()
    return math.sqrt(a) * MU + math.sqrt(a * S**2 + 1 - a) * z


def moments(x):
    return x.mean().item(), x.std().item()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_deterministic_reproduces_gaussian_and_converges(name):
    schedule = NoiseSchedule(name, 1000)
    x_T = marginal_x_T(schedule, standardize=True)
    errors = []
    for steps in (10, 50, 200, 1000):
        x0 = sample(exact_eps(schedule), x_T, schedule, method="ddim", steps=steps, eta=0.0, timestep_spacing="trailing")
        mean, std = x0.mean().item(), x0.std(unbiased=False).item()
        assert abs(mean - MU) < 1e-9  # the mean is carried exactly by every step
        errors.append(abs(std - S))
    # linear map of standardized noise: no Monte-Carlo error, only discretisation error, which
    # shrinks roughly like 1/steps (measured: linear 0.13, 0.029, 0.0074, 0.0015)
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3
    assert errors[3] < 0.01 * S


def ddpm_moments_by_recursion(schedule, variance):
    """Mean and variance of DDPM's output, propagated exactly through T steps from q(x_T).

    With the exact predictor, x0_hat = mu + k_t (x_t - sqrt(a_t) mu), k_t = sqrt(a_t) s^2 / (a_t s^2 + 1 - a_t),
    and each step x_{t-1} = c0 x0_hat + ct x_t + sigma z is affine, so mean and variance follow
    m <- c0 (mu + k (m - sqrt(a_t) mu)) + ct m,  v <- (c0 k + ct)^2 v + sigma^2,
    with c0, ct and beta~ written out from DDPM eq. 7 using the betas alone."""
    betas = schedule.betas.tolist()
    abar = schedule.alphas_cumprod.tolist()
    T = len(betas)
    m = math.sqrt(abar[-1]) * MU
    v = abar[-1] * S**2 + 1 - abar[-1]
    for t in range(T - 1, -1, -1):
        a_t, a_prev = abar[t], (abar[t - 1] if t > 0 else 1.0)
        c0 = math.sqrt(a_prev) * betas[t] / (1 - a_t)
        ct = math.sqrt(1 - betas[t]) * (1 - a_prev) / (1 - a_t)
        var = 0.0 if t == 0 else (betas[t] if variance == "fixed_large" else (1 - a_prev) / (1 - a_t) * betas[t])
        k = math.sqrt(a_t) * S**2 / (a_t * S**2 + 1 - a_t)
        m = c0 * (MU + k * (m - math.sqrt(a_t) * MU)) + ct * m
        v = (c0 * k + ct) ** 2 * v + var
    return m, math.sqrt(v)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_all_steps_reproduces_gaussian(variance):
    schedule = NoiseSchedule("linear", 1000)
    x0 = sample(exact_eps(schedule), marginal_x_T(schedule), schedule, method="ddpm", steps=1000,
                variance=variance, generator=torch.Generator().manual_seed(1))
    mean, std = moments(x0)
    se_mean, se_std = S / math.sqrt(N), S / math.sqrt(2 * N)
    # 1) the sampler realises the exact recursion of its own Markov chain, within Monte-Carlo error
    m_exact, s_exact = ddpm_moments_by_recursion(schedule, variance)
    assert abs(mean - m_exact) < 4 * se_mean
    assert abs(std - s_exact) < 4 * se_std
    # 2) that chain reproduces the data: exactly for the mean; for the spread, fixed_large is within
    #    MC error, while fixed_small (beta~, exact only for a point mass x0) is 0.8% narrow for
    #    s = 0.5 (Ho et al. 2020, sec. 3.2: the two variances are the extremes).
    assert abs(mean - MU) < 4 * se_mean
    assert abs(m_exact - MU) < 1e-9
    if variance == "fixed_large":
        assert abs(std - S) < 4 * se_std
        assert abs(s_exact - S) < 0.002 * S
    else:
        assert abs(s_exact - S) < 0.01 * S


# -- DPM-Solver++ 2M, Euler, Euler ancestral (noise levels that need not be integer timesteps) -----------


def exact_eps_any_t(schedule):
    """``exact_eps`` at fractional timesteps too: the noise level of t is ``schedule.sigma_at(t)`` (log-sigma
    interpolation, the convention by which the samplers turn Karras sigmas into the t the model sees)."""

    def denoise(x, t):
        a = (1 / (1 + schedule.sigma_at(t) ** 2)).to(x.dtype).view(-1, 1)  # (B, 1)
        return (1 - a).sqrt() / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)

    return denoise


def std_errors(schedule, method, sigmas, steps_list, x_T, mean_tol=None):
    errors = []
    for steps in steps_list:
        x0 = sample(exact_eps_any_t(schedule), x_T, schedule, method=method, sigmas=sigmas, steps=steps,
                    timestep_spacing="trailing")
        if mean_tol is not None:
            assert abs(x0.mean().item() - MU) < mean_tol
        errors.append(abs(x0.std(unbiased=False).item() - S))
    return errors


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("method, sigmas", [("dpmpp-2m", None), ("euler", None), ("euler", "karras")])
def test_deterministic_sigma_samplers_reproduce_gaussian_and_converge(name, method, sigmas):
    schedule = NoiseSchedule(name, 1000)
    # every step is affine in x with the exact predictor, so the mean is carried exactly: to float64 rounding
    # on the timestep grid; with Karras sigmas the model sees t in float32 (1e-7 relative), measured 4e-8
    errors = std_errors(schedule, method, sigmas, (10, 50, 200, 1000), marginal_x_T(schedule, standardize=True),
                        mean_tol=1e-6)
    # measured |std - s| at 10, 50, 200, 1000 steps (trailing):
    #   dpmpp-2m  linear 0.095, 5.4e-4, 2.1e-4, 3.7e-5    cosine 0.025, 7.0e-4, 8.3e-6, 2.2e-5
    #   euler     linear 0.13, 0.029, 0.0074, 0.0015    cosine 0.073, 0.016, 0.0040, 8.1e-4  (= DDIM: same maths)
    #   euler-K   linear 0.14, 0.030, 0.0076, 0.0016    cosine 0.23, 0.067, 0.018, 0.0036
    assert errors[0] > errors[1] > errors[2]
    assert errors[3] < 0.01 * S


def test_dpmpp_2m_karras_rounded_timesteps_converge_to_a_small_floor():
    """DPM-Solver++ with Karras sigmas gives the model round(t) (diffusers' convention) while the sample sits at the
    Karras sigma, so even the exact predictor is off by half a timestep: the error shrinks with the steps down to
    a floor (measured |mean - mu| / |std - s|, linear: 3e-4/0.053 at 10 steps, 3e-4/3.5e-3 at 50, 1.3e-4/6.3e-5 at
    200, 3e-5/1.4e-4 at 1000; cosine 2.5e-2/2.2e-2, 1.1e-3/2.2e-2, 1.2e-3/1.0e-3, 9.8e-4/6.5e-5)."""
    for name in ("linear", "cosine"):
        schedule = NoiseSchedule(name, 1000)
        x_T = marginal_x_T(schedule, standardize=True)
        errors = std_errors(schedule, "dpmpp-2m", "karras", (10, 200, 1000), x_T, mean_tol=0.005 * S if name == "linear" else 0.1 * S)
        assert errors[1] < errors[0] / 10 and errors[2] < 0.001 * S


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_dpmpp_2m_at_10_steps_beats_ddim_at_10_steps(name):
    schedule = NoiseSchedule(name, 1000)
    x_T = marginal_x_T(schedule, standardize=True)
    ddim = std_errors(schedule, "ddim", None, (10,), x_T)[0]
    dpm = std_errors(schedule, "dpmpp-2m", None, (10,), x_T)[0]
    dpm_karras = std_errors(schedule, "dpmpp-2m", "karras", (10,), x_T)[0]
    # measured |std - s| at 10 steps: linear DDIM 0.13, DPM++ 2M 0.095, DPM++ 2M Karras 0.053;
    #                                 cosine DDIM 0.073, DPM++ 2M 0.025, DPM++ 2M Karras 0.022
    assert dpm < 0.8 * ddim and dpm_karras < 0.8 * ddim


def test_euler_ancestral_on_the_timestep_grid_is_ddim_eta_1():
    """Euler a's sigma_up^2 is the DDPM posterior variance in sigma space, so on integer timesteps it is DDIM with
    eta = 1 (Song et al. eq. 16), drawing the same noise at the same steps; only float32 rounding differs."""
    schedule = NoiseSchedule("linear", 1000)
    x_T = marginal_x_T(schedule).float()
    runs = [sample(exact_eps_any_t(schedule), x_T, schedule, steps=20, generator=torch.Generator().manual_seed(3), **kw)
            for kw in (dict(method="euler-a"), dict(method="ddim", eta=1.0))]
    assert ((runs[0] - runs[1]).norm() / runs[1].norm()).item() < 1e-5


def euler_ancestral_moments_by_recursion(levels):
    """Mean and std of Euler a's output from q(x_T), propagated exactly through the steps between noise levels
    ``levels`` (sigma space, ending in 0). With the exact predictor x0_hat = mu + k (x' - mu), k = s^2 / (s^2 + sigma^2)
    (x' = x0 + sigma eps, the regression of x0 on x'), and x'_next = x0_hat + sigma_down (x' - x0_hat) / sigma +
    sigma_up z is affine, so m <- mu + (k + (1 - k) sigma_down / sigma) (m - mu), v <- (...)^2 v + sigma_up^2."""
    sig = levels.tolist()
    m, v = MU, S**2 + sig[0] ** 2  # sigma space: x' = x0 + sigma eps
    for s0, s1 in zip(sig, sig[1:]):
        up = math.sqrt(s1**2 * (s0**2 - s1**2) / s0**2)
        down = s1**2 / s0
        g = S**2 / (S**2 + s0**2) + (1 - S**2 / (S**2 + s0**2)) * down / s0
        m, v = MU + g * (m - MU), g**2 * v + up**2
    return m, math.sqrt(v)


def test_euler_ancestral_karras_follows_its_exact_chain_which_converges_to_the_gaussian():
    from ldm.schedule import sigma_grid

    schedule = NoiseSchedule("linear", 1000)
    # 1) the chain of Euler a on Karras sigmas, propagated exactly, approaches N(mu, s^2) as steps grow
    #    (measured |std - s|: 10 steps 0.21, 100 steps 0.031, 1000 steps 0.0033, 10000 steps 4.2e-4)
    errs = [abs(euler_ancestral_moments_by_recursion(sigma_grid(schedule, n, "karras")[1])[1] - S)
            for n in (10, 100, 1000)]
    assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5 and errs[2] < 0.01 * S
    # 2) the sampler realises that chain within Monte-Carlo error (x_T from q(x_T) at the first Karras level)
    steps = 50
    levels = sigma_grid(schedule, steps, "karras")[1]
    z = torch.randn(N, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = (MU + math.sqrt(S**2 + levels[0].item() ** 2) * z) / math.sqrt(1 + levels[0].item() ** 2)  # VP sample
    x0 = sample(exact_eps_any_t(schedule), x_T, schedule, method="euler-a", sigmas="karras", steps=steps,
                generator=torch.Generator().manual_seed(1))
    m_exact, s_exact = euler_ancestral_moments_by_recursion(levels)
    mean, std = moments(x0)
    assert abs(mean - m_exact) < 4 * S / math.sqrt(N)
    assert abs(std - s_exact) < 4 * S / math.sqrt(2 * N)
