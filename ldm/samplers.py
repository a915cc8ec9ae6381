"""Samplers: DDPM (ancestral), DDIM, DPM-Solver++ 2M, Euler and Euler ancestral; one function, one signature.

A sampler sees the model only through ``denoise(x_t, t) -> output``, where x_t is the VP sample
(x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, what the network was trained on), t a (B,) tensor of
timesteps and the output is in the parameterisation ``prediction`` (eps, x0 or v). t is a long
tensor, except for ``euler`` and ``euler-a`` with ``sigmas="karras"`` (below), where it is float32.
Guidance, conditioning and the network itself live in that closure (see ``ldm.guidance``); the
schedule maths lives in ``ldm.schedule``.

Methods (names as A1111 and ComfyUI users know them; ``ldm.infotext`` maps them to A1111's):

* ``ddim`` (default; Song et al. 2021, eta >= 0) and ``ddpm`` (Ho et al. 2020, ancestral) step between
  integer timesteps.
* ``dpmpp-2m``: DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Alg. 2), multistep, second order, data
  prediction; the first step and the step to sigma = 0 are first order (= DDIM). k-diffusion's
  ``sample_dpmpp_2m``; diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
  solver_order=2, solver_type="midpoint", final_sigmas_type="zero"), where ``lower_order_final`` then
  changes nothing (the last step is first order either way).
* ``euler``: Karras et al. 2022, Alg. 1 with no churn (k-diffusion ``sample_euler``, diffusers'
  EulerDiscreteScheduler). On the same noise levels it is DDIM with eta = 0, written in sigma space.
* ``euler-a``: Euler ancestral (k-diffusion ``sample_euler_ancestral`` with eta = 1, diffusers'
  EulerAncestralDiscreteScheduler): a deterministic Euler step down to sigma_down, then fresh noise of
  std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2. It takes no ``eta``.

These three step between noise levels sigma (``ldm.schedule``: x_t / sqrt(abar) = x_0 + sigma eps);
the sampler keeps its state as the VP sample x_t, which is what ``denoise`` and ``callback`` see, and
each step converts to sigma space and back with float64 coefficients. The levels (``sigma_grid``):

* ``sigmas=None``: the integer timesteps DDIM visits (``inference_timesteps``, the model's spacing and
  offset), then sigma = 0. The model sees those integer t. (diffusers' Euler schedulers with
  ``linspace`` spacing use unrounded timesteps t = k (T - 1) / (steps - 1); we use the rounded grid
  DDIM uses, and diffusers' DPM-Solver spaces its own grid over steps + 1 points; we use DDIM's.)
* ``sigmas="karras"``: Karras et al. 2022 eq. 5 with rho = 7 between sigma_0 and sigma_{T-1}, then 0,
  whatever the spacing (k-diffusion, A1111, diffusers' DPM-Solver; diffusers' Euler spans the spaced
  timesteps' sigmas instead, the same range with its default ``linspace`` spacing). These levels are
  not integer timesteps: with ``euler``/``euler-a`` the model sees the fractional t of log-sigma
  interpolation (``t_from_sigma``) as float32, as diffusers' Euler schedulers pass it; with
  ``dpmpp-2m`` it sees that t rounded to an integer, as diffusers' DPM-Solver does (diffusers skips
  the rounding for the cosine schedule; we round for every schedule), while the update uses the
  Karras sigma itself. ``ddim`` and ``ddpm`` take no ``sigmas``.

Conventions (the ones diffusers' schedulers are tested against in tests/):

* Timesteps come from ``ldm.schedule.inference_timesteps``. The sampler steps
  from each visited timestep to the *next visited one*, and from the last to
  t = -1 where abar = 1 (DDIM: diffusers' ``set_alpha_to_one=True``). For
  ``leading`` spacing, and ``trailing`` when steps divide T, this is exactly
  diffusers' DDIMScheduler; for ``linspace`` diffusers' DDIM steps to
  t - T // steps, which is off the visited grid, so the next step starts from a
  noise level it never reached. We do not copy that.
* DDPM adds no noise on its final step (the DDPM paper's z = 0 at t = 1). With
  ``fixed_small`` that step's variance is zero anyway; with ``fixed_large`` and
  ``trailing`` spacing diffusers' DDPMScheduler adds noise of variance
  1 - abar_t there, which leaves noise in the final image.
* Clipping (``clip_x0``) clamps the predicted x0 and, for DDIM, re-derives eps
  from the clipped x0 so the two stay consistent (improved-diffusion's
  ``ddim_sample``; diffusers' ``use_clipped_model_output=True``).
* Noise for stochastic steps is drawn as ``torch.randn(x.shape, generator=...)``
  on the generator's device, one draw per stochastic step, in step order (``euler-a`` draws none
  for its last step, to sigma = 0, where diffusers draws one and multiplies it by 0).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ldm.schedule import (
    PREDICTIONS,
    SIGMA_SCHEDULES,
    NoiseSchedule,
    _broadcast,
    _check_choice,
    abar_from_sigma,
    eps_from_x0_at,
    inference_timesteps,
    sigma_grid,
    split_prediction_at,
)

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step_index, t, x_s, x0_hat): called after each step with the new sample and the x0 estimate;
# t is the timestep the model saw (an int, or a float for euler/euler-a with Karras sigmas).
StepCallback = Callable[[int, Union[int, float], torch.Tensor, torch.Tensor], None]

METHODS = ("ddim", "ddpm", "dpmpp-2m", "euler", "euler-a")
SIGMA_METHODS = ("dpmpp-2m", "euler", "euler-a")  # step between noise levels; take sigmas="karras"
VARIANCES = ("fixed_small", "fixed_large")


def ddpm_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    t: int,
    s: int,
    variance: str = "fixed_small",
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One ancestral step x_t -> x_s, s < t, of the (strided) DDPM reverse process (DDPM eq. 6-7, Alg. 2):
    x_s = mu~(x_t, x0_hat) + sigma z, with sigma^2 = beta~ (``fixed_small``) or beta_{t|s} (``fixed_large``),
    and no noise when s = -1."""
    _check_choice("variance", variance, VARIANCES)
    c0, ct, var = schedule.posterior(t, s)
    x_s = _broadcast(c0, x_t) * x0_hat + _broadcast(ct, x_t) * x_t
    if s < 0:
        return x_s
    if noise is None:
        raise ValueError("ddpm_step needs noise for a step that does not end at t = -1")
    if variance == "fixed_large":
        var = 1 - schedule.abar(t) / schedule.abar(s)
    return x_s + _broadcast(var.sqrt(), x_t) * noise


def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    t: int,
    s: int,
    eta: float = 0.0,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One DDIM step x_t -> x_s (Song et al. eq. 12):
    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z, sigma from eq. 16."""
    sigma = schedule.ddim_sigma(t, s, eta)
    a_s = schedule.abar(s)
    direction = (1 - a_s - sigma**2).clamp(min=0).sqrt()
    x_s = _broadcast(a_s.sqrt(), x_t) * x0_hat + _broadcast(direction, x_t) * eps_hat
    if eta == 0 or s < 0:
        return x_s
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    return x_s + _broadcast(sigma, x_t) * noise


def _vp_scale(sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(1 + sigma^2) = 1 / sqrt(abar): a VP sample times this is the sigma-space sample x_0 + sigma eps."""
    return (1 + sigma**2).sqrt()


def euler_step(x0_hat: torch.Tensor, eps_hat: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE in sigma space (Karras et al. 2022, Alg. 1 without churn):
        x'_next = x' + (sigma_next - sigma) d,   d = (x' - x0_hat) / sigma = eps_hat,   x' = sqrt(1 + sigma^2) x_t.
    Since x' = x0_hat + sigma eps_hat, this is x'_next = x0_hat + sigma_next eps_hat, computed in that form:
    at the top of a schedule (sigma ~ 2e4 for cosine) x' is large and x' - sigma d cancels in float32.
    Returns the VP sample x'_next / sqrt(1 + sigma_next^2) (= DDIM eq. 12 with eta = 0). sigma_next: float64."""
    scale = 1 / _vp_scale(sigma_next)
    return _broadcast(scale, x0_hat) * x0_hat + _broadcast(sigma_next * scale, x0_hat) * eps_hat


def ancestral_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of an ancestral step sigma -> sigma_next (k-diffusion ``get_ancestral_step``,
    eta = 1): sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2, so that the step is the DDPM posterior
    q(x_next | x, x0_hat) in sigma space, and sigma_down^2 = sigma_next^2 - sigma_up^2 = sigma_next^4 / sigma^2.
    sigma_down is computed as sigma_next^2 / sigma: the difference form cancels when sigma >> sigma_next."""
    up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
    return sigma_next**2 / sigma, up


def euler_ancestral_step(
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One Euler ancestral step: Euler down to sigma_down, then add sigma_up z (``ancestral_sigmas``):
        x'_next = x' + (sigma_down - sigma) eps_hat + sigma_up z = x0_hat + sigma_down eps_hat + sigma_up z
    (the second form, as in ``euler_step``), returned as the VP sample x'_next / sqrt(1 + sigma_next^2).
    No noise on the step to sigma_next = 0 (sigma_up = 0 there)."""
    down, up = ancestral_sigmas(sigma, sigma_next)
    scale = 1 / _vp_scale(sigma_next)
    x_next = _broadcast(scale, x0_hat) * x0_hat + _broadcast(down * scale, x0_hat) * eps_hat
    if not bool((up > 0).any()):
        return x_next
    if noise is None:
        raise ValueError("euler_ancestral_step needs noise for a step that does not end at sigma = 0")
    return x_next + _broadcast(up * scale, x0_hat) * noise


def dpmpp_2m_step(
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    x0_prev: Optional[torch.Tensor] = None,
    sigma_prev: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, "DPM-Solver++", Alg. 2), VP in, VP out. With
    alpha = 1 / sqrt(1 + sigma^2) (= sqrt(abar)), alpha sigma the VP noise std and lambda = -log sigma
    (half the log-SNR), h = lambda_next - lambda:
        first order (no previous x0, or sigma_next = 0; = DDIM):
            x_next = (sigma_next alpha_next / (sigma alpha)) x_t - alpha_next (e^-h - 1) x0_hat
        second order, with r = (lambda - lambda_prev) / h:
            D = (1 + 1 / (2 r)) x0_hat - 1 / (2 r) x0_prev,   x_next = ... as above with D for x0_hat.
    sigma_next = 0 gives x_next = x0_hat."""
    alpha_next = 1 / _vp_scale(sigma_next)
    if bool((sigma_next == 0).all()):
        return x0_hat.clone()
    h = sigma.log() - sigma_next.log()  # lambda_next - lambda
    c_x = sigma_next / sigma * _vp_scale(sigma) * alpha_next
    c_d = -alpha_next * torch.expm1(-h)
    if x0_prev is None:
        return _broadcast(c_x, x_t) * x_t + _broadcast(c_d, x_t) * x0_hat
    r = (sigma_prev.log() - sigma.log()) / h
    d = _broadcast(1 + 1 / (2 * r), x_t) * x0_hat - _broadcast(1 / (2 * r), x_t) * x0_prev
    return _broadcast(c_x, x_t) * x_t + _broadcast(c_d, x_t) * d


Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def randn(shape: Sequence[int], generator: Generators, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal noise of ``shape`` = (B, ...), drawn on the generator's device.

    With a list of B generators, row i is drawn from generator i alone, so each sample of a batch
    can be reproduced on its own from its own seed (as diffusers' ``randn_tensor`` does)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, dtype, device) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def needs_noise(method: str, eta: float, s: int) -> bool:
    """Whether the step to s draws noise: every DDPM step and every DDIM step with eta > 0, except the last."""
    return s >= 0 and (method == "ddpm" or eta > 0)


def check_method(method: str, eta: float = 0.0, sigmas: Optional[str] = None) -> None:
    """Raise ValueError for a method, eta and sigmas that do not go together (names the allowed values)."""
    _check_choice("method", method, METHODS)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf"):
        raise ValueError(f"eta={eta!r} must be a finite number >= 0")
    if method == "ddpm" and eta != 0:
        raise ValueError(f"eta={eta} applies to method='ddim' only; 'ddpm' takes variance='fixed_small'|'fixed_large'")
    if method != "ddim" and eta != 0:
        raise ValueError(f"eta={eta} applies to method='ddim' only; method='{method}' has no eta")
    if sigmas is not None:
        _check_choice("sigmas", sigmas, SIGMA_SCHEDULES)
        if method not in SIGMA_METHODS:
            raise ValueError(f"sigmas={sigmas!r} applies to methods {', '.join(SIGMA_METHODS)}; "
                             f"method='{method}' steps on the timestep grid (sigmas=None)")


def _call(denoise: Denoise, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    output = denoise(x, t)
    if not isinstance(output, torch.Tensor) or output.shape != x.shape:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"denoise returned {got}; expected a tensor of shape {tuple(x.shape)}")
    return output


def sample(
    denoise: Denoise,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    method: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    sigmas: Optional[str] = None,
    prediction: str = "eps",
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    variance: str = "fixed_small",
    clip_x0: Optional[float] = None,
    generator: Generators = None,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Run the reverse process from x_T to an estimate of x_0.

    Args:
        denoise: ``denoise(x_t, t)`` with x_t of x_T's shape and t a (B,) tensor (long; float32 for
            euler/euler-a with Karras sigmas); returns the model output (same shape) in the
            parameterisation ``prediction``.
        x_T: starting noise, (B, ...), usually ``torch.randn(..., generator=g)`` (the VP sample at the
            first timestep; every method starts from the same x_T).
        schedule: the training noise schedule.
        method: ``ddim`` (eta >= 0; eta = 0 is deterministic), ``ddpm`` (ancestral), ``dpmpp-2m``,
            ``euler`` (deterministic) or ``euler-a`` (ancestral); see the module docstring.
        steps: number of denoising steps (model calls), 1..T.
        eta: DDIM's stochasticity (Song et al. eq. 16); must be 0 for every other method.
        sigmas: ``None`` (the timestep grid) or ``karras`` (Karras et al. eq. 5, rho = 7; for
            dpmpp-2m, euler and euler-a).
        prediction: ``eps``, ``x0`` or ``v``.
        timestep_spacing: ``leading``, ``trailing`` or ``linspace`` (see ``inference_timesteps``).
        steps_offset: added to ``leading`` timesteps (Stable Diffusion's scheduler config uses 1).
        variance: DDPM's sigma_t^2, ``fixed_small`` (beta~, the posterior variance) or
            ``fixed_large`` (beta).
        clip_x0: if given, clamp the predicted x0 to [-clip_x0, clip_x0] at every step (and re-derive
            eps from it).
        generator: source of the noise of stochastic steps; a list of B generators gives each sample
            its own noise stream.
        callback: ``callback(i, t, x_s, x0_hat)`` after step i (progress bars, previews).

    Returns:
        The final sample, x_T's shape and dtype.
    """
    check_method(method, eta, sigmas)
    _check_choice("prediction", prediction, PREDICTIONS)
    _check_choice("variance", variance, VARIANCES)
    if not callable(denoise):
        raise ValueError("denoise must be a callable denoise(x_t, t)")
    if not isinstance(x_T, torch.Tensor) or x_T.dim() < 1 or x_T.shape[0] < 1:
        raise ValueError("x_T must be a tensor of shape (B, ...) with B >= 1")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0={clip_x0} must be a positive number or None")
    args = (denoise, x_T, schedule, method, steps, prediction, timestep_spacing, steps_offset, clip_x0, generator,
            callback)
    if method in SIGMA_METHODS:
        return _sample_sigmas(*args, sigmas)
    return _sample_timesteps(*args, eta, variance)


def _sample_timesteps(denoise, x_T, schedule, method, steps, prediction, timestep_spacing, steps_offset, clip_x0,
                      generator, callback, eta, variance) -> torch.Tensor:
    """DDPM and DDIM: from each visited integer timestep t to the next one s, and from the last to -1."""
    timesteps = inference_timesteps(schedule.T, steps, timestep_spacing, steps_offset)
    x = x_T
    batch = x.shape[0]
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)  # (B,)
        output = _call(denoise, x, t_batch)
        x0_hat, eps_hat = schedule.split_prediction(output, x, t, prediction)
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
            eps_hat = schedule.eps_from_x0(x0_hat, x, t)
        noise = randn(x.shape, generator, x.dtype, x.device) if needs_noise(method, eta, s) else None
        if method == "ddpm":
            x = ddpm_step(schedule, x, x0_hat, t, s, variance, noise)
        else:
            x = ddim_step(schedule, x, x0_hat, eps_hat, t, s, eta, noise)
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


def model_timestep(method: str, sigmas: Optional[str], t: float) -> Union[int, float]:
    """The timestep the model sees at a grid point of fractional timestep t (module docstring): the integer
    itself on the timestep grid; with Karras sigmas, t rounded (dpmpp-2m) or t as float32 (euler, euler-a)."""
    if sigmas is None or method == "dpmpp-2m":
        return int(round(t))
    return float(torch.tensor(t, dtype=torch.float32))


def _sample_sigmas(denoise, x_T, schedule, method, steps, prediction, timestep_spacing, steps_offset, clip_x0,
                   generator, callback, sigmas) -> torch.Tensor:
    """DPM-Solver++ 2M, Euler and Euler ancestral: from each noise level sigma_i to the next, the last to 0."""
    timesteps, levels = sigma_grid(schedule, steps, sigmas, timestep_spacing, steps_offset)  # (n,), (n + 1,)
    x = x_T
    batch = x.shape[0]
    x0_prev = None
    for i in range(len(timesteps)):
        sigma, sigma_next = levels[i : i + 1], levels[i + 1 : i + 2]  # (1,) float64
        t = model_timestep(method, sigmas, float(timesteps[i]))
        t_dtype = torch.float32 if isinstance(t, float) else torch.long
        output = _call(denoise, x, torch.full((batch,), t, dtype=t_dtype, device=x.device))  # t: (B,)
        abar = abar_from_sigma(sigma)
        x0_hat, eps_hat = split_prediction_at(output, x, abar, prediction)
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
            eps_hat = eps_from_x0_at(x0_hat, x, abar)
        if method == "dpmpp-2m":
            x_next = dpmpp_2m_step(x, x0_hat, sigma, sigma_next, x0_prev, levels[i - 1 : i] if i else None)
        elif method == "euler":
            x_next = euler_step(x0_hat, eps_hat, sigma_next)
        else:
            noise = randn(x.shape, generator, x.dtype, x.device) if float(sigma_next) > 0 else None
            x_next = euler_ancestral_step(x0_hat, eps_hat, sigma, sigma_next, noise)
        x, x0_prev = x_next, x0_hat
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x
