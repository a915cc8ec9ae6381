"""All the schedule maths of the diffusion process, in one file, in float64.

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models"
(DDPM) and Song et al. 2021, "Denoising Diffusion Implicit Models" (DDIM):

    beta_t                 variance added at step t            (DDPM eq. 2)
    alpha_t = 1 - beta_t
    abar_t  = prod_{i<=t} alpha_i                               (DDPM eq. 4)

Timesteps are 0-based, t in {0, ..., T-1}, as in diffusers: ``betas[0]`` is the
paper's beta_1. The clean data sits at "t = -1", where we define abar_{-1} = 1.
Every function that takes a timestep accepts -1 and means exactly that; this is
diffusers' ``set_alpha_to_one=True`` convention for DDIM's last step, and the
one its DDPM scheduler always uses.

Coefficients are gathered and combined in float64 and cast to the dtype of the
tensor they multiply only at the end, so float32 sampling loses nothing to the
schedule.

The derivations the samplers rely on (the "seeds"):

* q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                (DDPM eq. 4)
  follows from composing the Gaussian steps q(x_t | x_{t-1}) =
  N(sqrt(alpha_t) x_{t-1}, beta_t I): means multiply, variances add as
  alpha_t (1 - abar_{t-1}) + beta_t = 1 - abar_t.

* For any s < t, the same argument gives q(x_t | x_s) with
  abar_{t|s} = abar_t / abar_s, and Bayes' rule on two Gaussians gives the
  posterior q(x_s | x_t, x_0) = N(mu~, beta~ I) with            (DDPM eq. 6-7)
      mu~   = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x_0
            + sqrt(abar_{t|s}) (1 - abar_s) / (1 - abar_t) x_t
      beta~ = (1 - abar_s) / (1 - abar_t) beta_{t|s},   beta_{t|s} = 1 - abar_{t|s}.
  With s = t - 1 these are the paper's equations; with s < t - 1 they serve
  the strided ("respaced") DDPM sampler.

* DDIM (Song et al. eq. 12) keeps the marginals q(x_t | x_0) and writes
      x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
  where sigma = eta * sqrt(beta~) (DDIM eq. 16). eta = 1 recovers the DDPM
  posterior above, eta = 0 is deterministic.

* Noise levels (Karras et al. 2022, "Elucidating the Design Space of
  Diffusion-Based Generative Models", sec. 2; Song et al. 2021 eq. 14): dividing
  q(x_t | x_0) by sqrt(abar_t) gives x_t / sqrt(abar_t) = x_0 + sigma_t eps with
      sigma_t = sqrt((1 - abar_t) / abar_t),   abar_t = 1 / (1 + sigma_t^2),
  so a VP sample at abar and a "sigma space" sample at sigma are the same state,
  scaled by sqrt(1 + sigma^2). sigma_{-1} = 0 is the clean data. The Euler and
  DPM-Solver samplers step between noise levels that need not be integer
  timesteps (Karras sigmas); ``t_from_sigma`` gives the fractional timestep of a
  noise level by interpolating log sigma linearly between neighbouring integer
  timesteps (k-diffusion's ``sigma_to_t``, diffusers' ``_sigma_to_t``), and
  ``sigma_at`` is its inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "quadratic", "cosine")
PREDICTIONS = ("eps", "x0", "v")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SCHEDULES = ("karras",)
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5 and table 1

# diffusers' names for our prediction types and beta schedules, for bundles.
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
DIFFUSERS_BETA_SCHEDULE = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}


def _check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(allowed)}")


@dataclass
class SamplingConfig:
    """How the model was trained to be sampled (the bundle's scheduler config, beside the schedule)."""

    prediction: str = "eps"  # eps | x0 | v
    timestep_spacing: str = "leading"  # leading | trailing | linspace
    steps_offset: int = 0  # Stable Diffusion uses 1 with leading spacing
    clip_x0: Optional[float] = None  # clamp the predicted x0 to [-clip_x0, clip_x0]; None = off


# --------------------------------------------------------------------------------------
# Beta schedules
# --------------------------------------------------------------------------------------


def linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t linear in t from beta_start to beta_end (DDPM sec. 4: 1e-4 .. 0.02)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """sqrt(beta_t) linear in t, i.e. beta_t quadratic in t.

    This is the schedule of Rombach et al. 2022 (Stable Diffusion, where it is
    called "scaled_linear", beta 0.00085 .. 0.012) and of Song et al.'s DDIM
    code (called "quad" there; the "quadratic" schedule of the Hugging Face
    annotated-diffusion notes). Both names map to this one function.
    """
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2);
    beta_t = 1 - abar(t+1) / abar(t), capped at ``max_beta`` to avoid the singularity at t = T."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(name: str, T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The beta schedule called ``name`` (one of BETA_SCHEDULES), float64, length T."""
    _check_choice("beta_schedule", name, BETA_SCHEDULES)
    if name == "linear":
        return linear_betas(T, beta_start, beta_end)
    if name in ("scaled_linear", "quadratic"):
        return scaled_linear_betas(T, beta_start, beta_end)
    return cosine_betas(T)


# --------------------------------------------------------------------------------------
# Inference timesteps
# --------------------------------------------------------------------------------------


def inference_timesteps(T: int, steps: int, spacing: str = "leading", offset: int = 0) -> list[int]:
    """The decreasing timesteps a sampler visits, as diffusers' ``set_timesteps`` defines them
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sampling Steps Are Flawed", table 2):

    * ``leading``:  t_i = i * (T // steps) + offset, i = steps-1 .. 0 (DDIM paper, Stable Diffusion);
    * ``trailing``: t_i = round(T - i * T / steps) - 1, i = 0 .. steps-1 (starts at T - 1);
    * ``linspace``: round(linspace(0, T - 1, steps)), reversed.

    The sampler steps from each t_i to the next one, and from the last to -1 (clean data).
    """
    _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps={steps!r} must be an integer in 1..{T} (num_train_timesteps)")
    if spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1] + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    else:
        ts = np.linspace(0, T - 1, steps).round()[::-1]
    ts = [int(t) for t in ts]
    if ts[0] >= T or ts[-1] < 0:
        raise ValueError(f"offset={offset} puts timesteps outside 0..{T - 1}")
    return ts


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5):
    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0 .. n-1;
    rho = 7 spends more steps at low noise. float64, shape (n,); n = 1 gives sigma_max alone (k-diffusion's
    ``get_sigmas_karras``, without the appended zero)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)  # (n,)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


# --------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------


def _as_timesteps(t) -> torch.Tensor:
    """t as a 1-D long tensor (an int becomes a length-1 tensor)."""
    if isinstance(t, torch.Tensor):
        t = t.to(device="cpu", dtype=torch.long)
        return t.reshape(-1) if t.dim() <= 1 else t
    return torch.tensor([int(t)], dtype=torch.long)


def _broadcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 per-sample coefficient (B,) as ``like``'s dtype and device, shaped (B, 1, ..., 1)."""
    coef = coef.to(device=like.device, dtype=like.dtype)
    return coef.reshape(coef.shape[0], *([1] * (like.dim() - 1))) if coef.numel() > 1 else coef.reshape(())


class NoiseSchedule:
    """The forward process q(x_t | x_0) of a discrete-time diffusion model and its derived quantities.

    Args:
        beta_schedule: one of ``linear``, ``scaled_linear`` (alias ``quadratic``), ``cosine``.
        num_train_timesteps: T, the number of diffusion steps the model was trained with.
        beta_start, beta_end: first and last beta for ``linear`` and ``scaled_linear``/``quadratic``
            (ignored by ``cosine``).
    """

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be a positive integer")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)  # (T,)
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) abar_t
        # abar with abar_{-1} = 1 prepended, so abar(t) = _abar_ext[t + 1] for t in -1 .. T-1.
        self._abar_ext = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule({self.beta_schedule!r}, num_train_timesteps={self.num_train_timesteps}, "
            f"beta_start={self.beta_start}, beta_end={self.beta_end})"
        )

    @property
    def T(self) -> int:
        return self.num_train_timesteps

    def config(self) -> dict:
        """The arguments that rebuild this schedule."""
        return {
            "beta_schedule": self.beta_schedule,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    # -- gathering ---------------------------------------------------------------------

    def abar(self, t) -> torch.Tensor:
        """abar_t in float64 for t in -1 .. T-1 (abar_{-1} = 1), shape (B,)."""
        t = _as_timesteps(t)
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= self.T):
            raise ValueError(f"timesteps must lie in -1..{self.T - 1}, got {t.min().item()}..{t.max().item()}")
        return self._abar_ext[t + 1]

    # -- noise levels (sigma space) ----------------------------------------------------

    def sigma(self, t) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for integer t in -1 .. T-1 (sigma_{-1} = 0), float64 (B,)."""
        a = self.abar(t)
        return ((1 - a) / a).sqrt()

    def _log_sigmas(self) -> torch.Tensor:
        return self.sigma(torch.arange(self.T)).log()  # (T,), increasing in t

    def t_from_sigma(self, sigma) -> torch.Tensor:
        """The fractional timestep of noise level ``sigma``: log sigma interpolated linearly between the two
        integer timesteps around it, clamped to 0 .. T-1 (k-diffusion's ``sigma_to_t``). float64, sigma's shape."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigmas = self._log_sigmas()  # (T,)
        if self.T == 1:
            return torch.zeros_like(sigma)
        log_sigma = sigma.clamp(min=1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, self.T - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        return (low + w).reshape(sigma.shape)

    def sigma_at(self, t) -> torch.Tensor:
        """sigma at a fractional timestep t in 0 .. T-1, the inverse of ``t_from_sigma`` (at integer t, sigma_t).
        float64, t's shape."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool(((t < 0) | (t > self.T - 1)).any()):
            raise ValueError(f"fractional timesteps must lie in 0..{self.T - 1}")
        log_sigmas = self._log_sigmas()  # (T,)
        if self.T == 1:
            return log_sigmas.exp().expand(t.shape)
        low = t.floor().long().clamp(0, self.T - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    # -- the forward process -------------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) in closed form (DDPM eq. 4):
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.  x0, noise: (B, ...); t: (B,) long."""
        _check_same_shape(x0=x0, noise=noise)
        a = self.abar(t)
        return _broadcast(a.sqrt(), x0) * x0 + _broadcast((1 - a).sqrt(), x0) * noise

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, eq. 1), float64 (B,)."""
        a = self.abar(t)
        return a / (1 - a)

    # -- the posterior q(x_s | x_t, x_0) -----------------------------------------------

    def posterior(self, t, s=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coefficients of q(x_s | x_t, x_0) = N(c0 x_0 + ct x_t, var I) for s < t (DDPM eq. 6-7).

        With s = t - 1 (the default) these are the paper's mu~_t and beta~_t; with s < t - 1 they
        are those of the strided process, where beta_{t|s} = 1 - abar_t / abar_s replaces beta_t:
            c0  = sqrt(abar_s) beta_{t|s} / (1 - abar_t)
            ct  = sqrt(abar_t / abar_s) (1 - abar_s) / (1 - abar_t)
            var = (1 - abar_s) / (1 - abar_t) beta_{t|s}
        Returns (c0, ct, var), float64 tensors of shape (B,).
        """
        t = _as_timesteps(t)
        s = t - 1 if s is None else _as_timesteps(s)
        if bool((s >= t).any()):
            raise ValueError("posterior(t, s) needs s < t")
        a_t, a_s = self.abar(t), self.abar(s)
        beta_ts = 1 - a_t / a_s
        c0 = a_s.sqrt() * beta_ts / (1 - a_t)
        ct = (a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t)
        var = (1 - a_s) / (1 - a_t) * beta_ts
        return c0, ct, var

    def ddim_sigma(self, t, s, eta: float) -> torch.Tensor:
        """DDIM's noise scale for a step t -> s (Song et al. eq. 16):
        sigma = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s), float64 (B,).
        eta = 1 gives the DDPM posterior standard deviation sqrt(beta~)."""
        if eta < 0:
            raise ValueError(f"eta={eta} must be >= 0")
        return eta * self.posterior(t, s)[2].sqrt()

    # -- conversions between parameterisations -----------------------------------------

    def split_prediction(self, output: torch.Tensor, x_t: torch.Tensor, t, prediction: str):
        """From a model output in the parameterisation ``prediction`` at timestep t to (x0_hat, eps_hat)
        (``split_prediction_at`` with abar = abar_t)."""
        return split_prediction_at(output, x_t, self.abar(t), prediction)

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (DDPM eq. 4 solved for eps)."""
        return eps_from_x0_at(x0, x_t, self.abar(t))

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
        _check_same_shape(x0=x0, noise=noise)
        a = self.abar(t)
        return _broadcast(a.sqrt(), x0) * noise - _broadcast((1 - a).sqrt(), x0) * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t, prediction: str) -> torch.Tensor:
        """What a network trained with ``prediction`` should output for x_t = add_noise(x0, noise, t)."""
        _check_choice("prediction", prediction, PREDICTIONS)
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        return self.velocity(x0, noise, t)


def sigma_grid(schedule: NoiseSchedule, steps: int, sigmas: Optional[str] = None, spacing: str = "leading",
               offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise levels a sigma-space sampler (Euler, DPM-Solver) visits: (timesteps (n,), sigmas (n + 1,)),
    float64, decreasing, the last sigma 0 (the clean data; diffusers' ``final_sigmas_type="zero"``).

    * ``sigmas=None``: the timesteps of ``inference_timesteps`` (the grid DDIM visits), sigma_i = sigma_{t_i}.
    * ``sigmas="karras"``: n = steps levels from ``karras_sigmas(sigma_0, sigma_{T-1}, steps)``, the full
      range of the training schedule whatever the spacing (k-diffusion, A1111, diffusers' DPM-Solver),
      and their fractional timesteps ``t_from_sigma``; ``spacing`` and ``offset`` do not apply.
    """
    if sigmas is not None:
        _check_choice("sigmas", sigmas, SIGMA_SCHEDULES)
        inference_timesteps(schedule.T, steps)  # steps in 1..T
        levels = karras_sigmas(float(schedule.sigma(0)), float(schedule.sigma(schedule.T - 1)), steps)  # (n,)
        timesteps = schedule.t_from_sigma(levels)  # (n,)
    else:
        ts = inference_timesteps(schedule.T, steps, spacing, offset)
        timesteps = torch.tensor(ts, dtype=torch.float64)  # (n,)
        levels = schedule.sigma(torch.tensor(ts))  # (n,)
    return timesteps, torch.cat([levels, torch.zeros(1, dtype=torch.float64)])


def abar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """abar = 1 / (1 + sigma^2), the inverse of ``NoiseSchedule.sigma`` (float64 in, float64 out)."""
    return 1 / (1 + sigma**2)


def split_prediction_at(output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction: str):
    """From a model output in the parameterisation ``prediction`` to (x0_hat, eps_hat), for a sample x_t
    at noise level abar (float64, (B,) or a scalar; need not be an integer timestep's).

    Inverting x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (DDPM eq. 4, 11) and
    v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, sec. 4):
        eps: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        x0:  eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        v:   x0 = sqrt(abar) x_t - sqrt(1 - abar) v,   eps = sqrt(1 - abar) x_t + sqrt(abar) v
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    _check_same_shape(output=output, x_t=x_t)
    a = abar.reshape(-1)
    if prediction == "eps":
        x0 = _broadcast(1 / a.sqrt(), x_t) * x_t - _broadcast(((1 - a) / a).sqrt(), x_t) * output
        return x0, output
    if prediction == "x0":
        return output, eps_from_x0_at(output, x_t, a)
    x0 = _broadcast(a.sqrt(), x_t) * x_t - _broadcast((1 - a).sqrt(), x_t) * output
    eps = _broadcast((1 - a).sqrt(), x_t) * x_t + _broadcast(a.sqrt(), x_t) * output
    return x0, eps


def eps_from_x0_at(x0: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) (DDPM eq. 4 solved for eps), at noise level abar."""
    a = abar.reshape(-1)
    return _broadcast(1 / (1 - a).sqrt(), x_t) * x_t - _broadcast((a / (1 - a)).sqrt(), x_t) * x0


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes must match: " + ", ".join(f"{n}={s}" for n, s in shapes.items()))
