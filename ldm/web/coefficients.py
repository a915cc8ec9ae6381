"""Per-step sampler coefficients for the browser: the page applies them and does no schedule maths.

Every step of ``ldm.samplers.sample`` is affine in the model output, the current sample and the
step's noise. For step i (timestep t, next timestep s) the page computes, elementwise:

    x0  = px * x + po * out                    (``split_prediction``; clamped when clip_x0 is set)
    eps = ex * x + eo * out                    (``split_prediction``), or, when clip_x0 is set,
    eps = qx * x + q0 * x0                     (``eps_from_x0``, from the clamped x0)
    x   = ax * x + a0 * x0 + ae * eps + az * z (``ddim_step`` / ``ddpm_step``; z the step's noise)

The coefficients are read off the library's own functions by feeding them unit inputs in float64
(each function is linear in its tensor arguments), so they are those functions' numbers, not a
second implementation of the maths. ``noise`` says whether the step draws z (``needs_noise``).
"""

from __future__ import annotations

import torch

from ldm.samplers import VARIANCES, ddim_step, ddpm_step, needs_noise
from ldm.schedule import NoiseSchedule, _check_choice, inference_timesteps

WEB_METHODS = ("ddim", "ddpm")  # the samplers the page runs (dpmpp-2m, euler, euler-a: not yet)

# The order of the numbers in one step's row, as the page reads them.
FIELDS = ("t", "noise", "px", "po", "ex", "eo", "qx", "q0", "ax", "a0", "ae", "az")


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
) -> list[list[float]]:
    """One row of ``FIELDS`` per sampler step, in the order ``ldm.samplers.sample`` takes them."""
    _check_choice("method", method, WEB_METHODS)
    _check_choice("variance", variance, VARIANCES)
    if method == "ddpm" and eta != 0:
        raise ValueError(f"eta={eta} applies to method='ddim' only")
    if not eta >= 0:
        raise ValueError(f"eta={eta} must be >= 0")
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
        rows.append([t, int(noisy), float(px), float(po), float(ex), float(eo), qx, q0, ax, a0, ae, az])
    return rows


def sampler_table(
    schedule: NoiseSchedule,
    sampling,
    *,
    max_steps: int,
    etas: tuple[float, ...] = (0.0, 0.5, 1.0),
    variance: str = "fixed_small",
) -> dict:
    """Rows for DDIM at each eta in ``etas`` and for DDPM, for every step count 1..max_steps.

    ``sampling``: the bundle's ``SamplingConfig`` (prediction, timestep spacing, offset, clip_x0)."""
    if not isinstance(max_steps, int) or not 1 <= max_steps <= schedule.T:
        raise ValueError(f"max_steps={max_steps!r} must be an integer in 1..{schedule.T}")
    conventions = dict(prediction=sampling.prediction, timestep_spacing=sampling.timestep_spacing,
                       steps_offset=sampling.steps_offset)
    samplers = [("ddim", float(eta), f"DDIM, eta {eta:g}") for eta in etas] + [("ddpm", 0.0, f"DDPM ({variance})")]
    table = []
    for method, eta, label in samplers:
        by_steps = {str(n): step_rows(schedule, method=method, steps=n, eta=eta, variance=variance, **conventions)
                    for n in range(1, max_steps + 1)}
        table.append({"method": method, "eta": eta, "label": label, "by_steps": by_steps})
    return {
        "fields": list(FIELDS),
        "num_train_timesteps": schedule.T,
        "prediction": sampling.prediction,
        "clip_x0": sampling.clip_x0,
        "max_steps": max_steps,
        "samplers": table,
    }

