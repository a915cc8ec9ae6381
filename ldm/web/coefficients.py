"""Per-step sampler coefficients for the browser: the page applies them and does no schedule maths.

Every step of ``ldm.samplers.sample`` is affine in the model output, the current sample and the
step's noise. For step i (timestep t, next timestep s) the page computes, elementwise:

    x0  = px * x + po * out                    (``split_prediction``; clamped when clip_x0 is set)
    eps = ex * x + eo * out                    (``split_prediction``), or, when clip_x0 is set,
    eps = qx * x + q0 * x0                     (``eps_from_x0``, from the clamped x0)
    x   = ax * x + a0 * x0 + ae * eps + az * z + ap * x0_prev
                                               (``ddim_step`` / ``ddpm_step`` / ``euler_step`` /
                                                ``euler_ancestral_step`` / ``dpmpp_2m_step``; z the step's
                                                noise, x0_prev the previous step's x0: DPM++ 2M's multistep term)

The coefficients are read off the library's own functions by feeding them unit inputs in float64
(each function is linear in its tensor arguments), so they are those functions' numbers, not a
second implementation of the maths. ``noise`` says whether the step draws z (``needs_noise``).
"""

from __future__ import annotations

import torch

from ldm.runtime.steps import FIELDS
from ldm.samplers import (
    SIGMA_METHODS,
    VARIANCES,
    check_method,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_step,
    model_timestep,
    needs_noise,
)
from ldm.schedule import (
    NoiseSchedule,
    _check_choice,
    abar_from_sigma,
    eps_from_x0_at,
    inference_timesteps,
    sigma_grid,
    split_prediction_at,
)

# FIELDS: the order of the numbers in one step's row, as the page (and ldm.runtime.steps.apply_step) reads them.
# The samplers the page offers beyond DDIM (one per eta) and DDPM: (method, sigmas, label).
SIGMA_SAMPLERS = (("dpmpp-2m", None, "DPM++ 2M"), ("dpmpp-2m", "karras", "DPM++ 2M Karras"),
                  ("euler", None, "Euler"), ("euler-a", None, "Euler a"))


def _linear_coefficients(fn, n_args: int) -> list[float]:
    """The coefficients of a function linear in its ``n_args`` float64 tensor arguments."""
    out = []
    for i in range(n_args):
        args = [torch.full((1,), float(i == j), dtype=torch.float64) for j in range(n_args)]
        out.append(float(fn(*args).reshape(-1)[0]))
    return out


def step_rows(
    schedule: NoiseSchedule,
    *,
    method: str,
    steps: int,
    eta: float = 0.0,
    prediction: str = "eps",
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    variance: str = "fixed_small",
    sigmas=None,
) -> list[list[float]]:
    """One row of ``FIELDS`` per sampler step, in the order ``ldm.samplers.sample`` takes them."""
    check_method(method, eta, sigmas)
    _check_choice("variance", variance, VARIANCES)
    if method in SIGMA_METHODS:
        return _sigma_rows(schedule, method, steps, sigmas, prediction, timestep_spacing, steps_offset)
    timesteps = inference_timesteps(schedule.T, steps, timestep_spacing, steps_offset)
    rows = []
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        noisy = needs_noise(method, eta, s)
        px, ex = (v for v in schedule.split_prediction(torch.zeros(1, dtype=torch.float64),
                                                       torch.ones(1, dtype=torch.float64), t, prediction))
        po, eo = (v for v in schedule.split_prediction(torch.ones(1, dtype=torch.float64),
                                                       torch.zeros(1, dtype=torch.float64), t, prediction))
        q0, qx = _linear_coefficients(lambda x0, x: schedule.eps_from_x0(x0, x, t), 2)
        if method == "ddim":
            ax, a0, ae, az = _linear_coefficients(lambda x, x0, e, z: ddim_step(schedule, x, x0, e, t, s, eta, z), 4)
        else:
            ax, a0, az = _linear_coefficients(lambda x, x0, z: ddpm_step(schedule, x, x0, t, s, variance, z), 3)
            ae = 0.0
        if not noisy:
            az = 0.0
        rows.append([t, int(noisy), float(px), float(po), float(ex), float(eo), qx, q0, ax, a0, ae, az, 0.0])
    return rows


def _sigma_rows(schedule, method, steps, sigmas, prediction, spacing, offset) -> list[list[float]]:
    """``step_rows`` for dpmpp-2m, euler and euler-a: the same reading-off, on ``sigma_grid``'s levels."""
    timesteps, levels = sigma_grid(schedule, steps, sigmas, spacing, offset)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    rows = []
    for i in range(len(timesteps)):
        sigma, sigma_next = levels[i : i + 1], levels[i + 1 : i + 2]
        abar = abar_from_sigma(sigma)
        px, ex = (float(v) for v in split_prediction_at(zero, one, abar, prediction))
        po, eo = (float(v) for v in split_prediction_at(one, zero, abar, prediction))
        q0, qx = _linear_coefficients(lambda x0, x: eps_from_x0_at(x0, x, abar), 2)
        noisy = method == "euler-a" and float(sigma_next) > 0
        ax = ap = ae = az = 0.0
        if method == "dpmpp-2m":
            prev = levels[i - 1 : i] if i else None
            ax, a0, ap = _linear_coefficients(
                lambda x, x0, xp: dpmpp_2m_step(x, x0, sigma, sigma_next, xp if i else None, prev), 3)
        elif method == "euler":
            a0, ae = _linear_coefficients(lambda x0, e: euler_step(x0, e, sigma_next), 2)
        else:
            a0, ae, az = _linear_coefficients(
                lambda x0, e, z: euler_ancestral_step(x0, e, sigma, sigma_next, z if noisy else None), 3)
        t = model_timestep(method, sigmas, float(timesteps[i]))
        rows.append([t, int(noisy), px, po, ex, eo, qx, q0, ax, a0, ae, az if noisy else 0.0, ap])
    return rows


def sampler_table(
    schedule: NoiseSchedule,
    sampling,
    *,
    max_steps: int,
    etas: tuple[float, ...] = (0.0, 0.5, 1.0),
    variance: str = "fixed_small",
) -> dict:
    """Rows for DDIM at each eta in ``etas``, DDPM and ``SIGMA_SAMPLERS``, for every step count 1..max_steps.

    ``sampling``: the bundle's ``SamplingConfig`` (prediction, timestep spacing, offset, clip_x0)."""
    if not isinstance(max_steps, int) or not 1 <= max_steps <= schedule.T:
        raise ValueError(f"max_steps={max_steps!r} must be an integer in 1..{schedule.T}")
    conventions = dict(prediction=sampling.prediction, timestep_spacing=sampling.timestep_spacing,
                       steps_offset=sampling.steps_offset)
    samplers = [("ddim", float(eta), None, f"DDIM, eta {eta:g}") for eta in etas] + [("ddpm", 0.0, None, f"DDPM ({variance})")]
    samplers += [(method, 0.0, sigmas, label) for method, sigmas, label in SIGMA_SAMPLERS]
    table = []
    for method, eta, sigmas, label in samplers:
        by_steps = {str(n): step_rows(schedule, method=method, steps=n, eta=eta, variance=variance, sigmas=sigmas,
                                      **conventions)
                    for n in range(1, max_steps + 1)}
        table.append({"method": method, "eta": eta, "sigmas": sigmas, "label": label, "by_steps": by_steps})
    return {
        "fields": list(FIELDS),
        "num_train_timesteps": schedule.T,
        "prediction": sampling.prediction,
        "clip_x0": sampling.clip_x0,
        "max_steps": max_steps,
        "samplers": table,
    }

