"""DDPM (ancestral) and DDIM samplers: one function, one signature.

A sampler sees the model only through ``denoise(x_t, t) -> output``, where t is a
(B,) long tensor and the output is in the parameterisation ``prediction``
(eps, x0 or v). Guidance, conditioning and the network itself live in that
closure (see ``ldm.guidance``); the schedule maths lives in ``ldm.schedule``.

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
  on the generator's device, one draw per stochastic step, in step order.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ldm.schedule import PREDICTIONS, NoiseSchedule, _broadcast, _check_choice, inference_timesteps

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step_index, t, x_s, x0_hat): called after each step with the new sample and the x0 estimate.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]

METHODS = ("ddim", "ddpm")
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


def sample(
    denoise: Denoise,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    method: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
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
        denoise: ``denoise(x_t, t)`` with x_t of x_T's shape and t a (B,) long tensor; returns the
            model output (same shape) in the parameterisation ``prediction``.
        x_T: starting noise, (B, ...), usually ``torch.randn(..., generator=g)``.
        schedule: the training noise schedule.
        method: ``ddim`` (eta >= 0; eta = 0 is deterministic) or ``ddpm`` (ancestral).
        steps: number of denoising steps, 1..T; fewer than T visits a strided subset.
        eta: DDIM's stochasticity (Song et al. eq. 16); must be 0 for ``ddpm``.
        prediction: ``eps``, ``x0`` or ``v``.
        timestep_spacing: ``leading``, ``trailing`` or ``linspace`` (see ``inference_timesteps``).
        steps_offset: added to ``leading`` timesteps (Stable Diffusion's scheduler config uses 1).
        variance: DDPM's sigma_t^2, ``fixed_small`` (beta~, the posterior variance) or
            ``fixed_large`` (beta).
        clip_x0: if given, clamp the predicted x0 to [-clip_x0, clip_x0] at every step.
        generator: source of the noise of stochastic steps; a list of B generators gives each sample
            its own noise stream.
        callback: ``callback(i, t, x_s, x0_hat)`` after step i (progress bars, previews).

    Returns:
        The final sample, x_T's shape and dtype.
    """
    _check_choice("method", method, METHODS)
    _check_choice("prediction", prediction, PREDICTIONS)
    _check_choice("variance", variance, VARIANCES)
    if not callable(denoise):
        raise ValueError("denoise must be a callable denoise(x_t, t)")
    if not isinstance(x_T, torch.Tensor) or x_T.dim() < 1 or x_T.shape[0] < 1:
        raise ValueError("x_T must be a tensor of shape (B, ...) with B >= 1")
    if not eta >= 0:
        raise ValueError(f"eta={eta} must be >= 0")
    if method == "ddpm" and eta != 0:
        raise ValueError(f"eta={eta} applies to method='ddim' only; 'ddpm' takes variance='fixed_small'|'fixed_large'")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0={clip_x0} must be a positive number or None")
    timesteps = inference_timesteps(schedule.T, steps, timestep_spacing, steps_offset)

    x = x_T
    batch = x.shape[0]
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)  # (B,)
        output = denoise(x, t_batch)
        if not isinstance(output, torch.Tensor) or output.shape != x.shape:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"denoise returned {got}; expected a tensor of shape {tuple(x.shape)}")
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
