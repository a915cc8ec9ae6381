"""DPM-Solver++ 2M, Euler and Euler ancestral agree with diffusers' schedulers, step by step.

Same set-up as test_samplers_reference.py (its denoise function, schedules and tolerance): ours in
float32, the reference fed our float64 ``alphas_cumprod`` and float64 samples, and the very float32
noise our sampler draws. Settings on the diffusers side, the conventions of ``ldm.samplers``:

* DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
  final_sigmas_type="zero", lower_order_final=True). Its own timestep grid differs from DDIM's
  (it spaces steps + 1 points); on the timestep grid it is given ours (``set_timesteps(timesteps=...)``).
  With Karras sigmas its levels and rounded timesteps are compared with ours, except for the cosine
  schedule, where diffusers does not round (we do; the reference's model calls get our rounded t).
* EulerDiscreteScheduler(final_sigmas_type="zero"): on the timestep grid given our timesteps; with
  ``use_karras_sigmas`` in its ``linspace`` spacing, whose sigma range (sigma_0 .. sigma_{T-1}) is ours.
  Its state lives in sigma space: it starts from x_T sqrt(1 + sigma_0^2) and each of its samples is
  compared with ours after dividing by sqrt(1 + sigma^2) (the exact change of variables, float64).
* EulerAncestralDiscreteScheduler has no custom-timestep or Karras option: for ``linspace`` spacing and
  for Karras sigmas its ``timesteps``/``sigmas`` are set to those EulerDiscreteScheduler computes for
  the same configuration, which its ``step`` then follows.
* Tolerance: 1e-5 relative at every step, as for DDIM/DDPM: ours computes float64 coefficients and
  applies them to float32 samples (~1e-7 relative per operation, a few per step, over 10-50 steps).
  diffusers' steps cast the sample to float32 (``sample.to(torch.float32)``), and in float32 its Euler
  step from the top of the cosine schedule (sigma ~ 2e4) with v prediction is 1e-4 off a float64 run
  (x' - sigma d cancels); ours, which steps as x0 + sigma_next d, is 5e-8 off. So the reference is
  diffusers' scheduler code run with float64 wherever it names float32 (``_float64_schedulers``), and
  its sigmas (rounded to float32 in numpy, 6e-8 relative) are turned into float64 tensors, so that its
  arithmetic on them is float64 (Euler ancestral's sigma_next^2 - sigma_up^2 cancels in float32 when
  sigma >> sigma_next: 6e-5 off at cosine's top with 50 trailing steps).
"""

import itertools

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from test_samplers_reference import SCHEDULES, T, assert_trajectories_agree, denoise

from ldm.samplers import model_timestep, sample
from ldm.schedule import DIFFUSERS_PREDICTION, NoiseSchedule, sigma_grid


@pytest.fixture(autouse=True)
def _float32_noise(monkeypatch):
    """diffusers' Euler ancestral draws ``randn_tensor(..., dtype=model_output.dtype)``; in the float64
    reference make it draw what our float32 sampler draws from the same generator."""

    def randn_float32(shape, generator=None, device=None, dtype=None, **kwargs):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    monkeypatch.setattr("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor", randn_float32)


class _Float64Torch:
    """``torch`` with float64 for float32: diffusers' scheduler code, unchanged, computing in float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.fixture(autouse=True)
def _float64_schedulers(monkeypatch):
    for module in ("scheduling_dpmsolver_multistep", "scheduling_euler_discrete", "scheduling_euler_ancestral_discrete"):
        monkeypatch.setattr(f"diffusers.schedulers.{module}.torch", _Float64Torch())


def our_trajectory(schedule, method, sigmas, prediction, spacing, steps, x_T):
    traj, ts = [], []
    sample(denoise, x_T, schedule, method=method, sigmas=sigmas, steps=steps, prediction=prediction,
           timestep_spacing=spacing, generator=torch.Generator().manual_seed(1),
           callback=lambda i, t, x, x0: (traj.append(x), ts.append(t)))
    return traj, ts


def diffusers_config(name, prediction):
    beta_schedule, beta_start, beta_end = SCHEDULES[name]
    return dict(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                prediction_type=DIFFUSERS_PREDICTION[prediction], final_sigmas_type="zero")


def euler_scheduler(cls, name, schedule, prediction, spacing, steps, karras):
    """An Euler (ancestral) scheduler on our grid: its own Karras sigmas (linspace), or our timesteps."""
    config = diffusers_config(name, prediction)
    ref = EulerDiscreteScheduler(**config, use_karras_sigmas=karras, timestep_spacing="linspace" if karras else spacing)
    ref.alphas_cumprod = schedule.alphas_cumprod.clone()  # float64
    if karras:
        ref.set_timesteps(steps)
    else:
        ref.set_timesteps(timesteps=[int(t) for t in sigma_grid(schedule, steps, None, spacing)[0]])
    if cls is EulerDiscreteScheduler:
        ref.sigmas = ref.sigmas.double()
        return ref
    sched = cls(**{k: v for k, v in config.items() if k != "final_sigmas_type"}, timestep_spacing=spacing)
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    sched.set_timesteps(steps)
    if karras or spacing == "linspace":  # the grids EulerAncestral cannot make itself
        sched.timesteps, sched.sigmas = ref.timesteps.clone(), ref.sigmas.clone()
    sched.sigmas = sched.sigmas.double()
    return sched


def reference_euler(cls, name, schedule, prediction, spacing, steps, karras, x_T):
    sched = euler_scheduler(cls, name, schedule, prediction, spacing, steps, karras)
    generator = torch.Generator().manual_seed(1)
    scale = lambda sigma: (1 + sigma.double() ** 2).sqrt()  # noqa: E731  VP -> sigma space
    x, traj = x_T.double() * scale(sched.sigmas[0]), []
    for i, t in enumerate(sched.timesteps):
        model_in = sched.scale_model_input(x, t)
        output = denoise(model_in, t.expand(x.shape[0]))
        x = sched.step(output, t, x, generator=generator).prev_sample.double()
        traj.append((x / scale(sched.sigmas[i + 1])).float())
    return traj, [float(t) for t in sched.timesteps], sched.sigmas.double()


def reference_dpm(name, schedule, prediction, spacing, steps, karras, x_T, model_ts):
    sched = DPMSolverMultistepScheduler(**diffusers_config(name, prediction), algorithm_type="dpmsolver++",
                                        solver_order=2, solver_type="midpoint", lower_order_final=True,
                                        use_karras_sigmas=karras, timestep_spacing=spacing)
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()  # float64
    if karras:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(timesteps=[int(t) for t in sigma_grid(schedule, steps, None, spacing)[0]])
    sched.sigmas = sched.sigmas.double()
    x, traj = x_T.double(), []
    for i, t in enumerate(sched.timesteps):
        output = denoise(x, torch.full((x.shape[0],), model_ts[i]))
        x = sched.step(output, t, x).prev_sample.double()
        traj.append(x.float())
    return traj, [int(t) for t in sched.timesteps], sched.sigmas.double()


def check_grid(schedule, method, sigmas, spacing, steps, our_ts, ref_ts, ref_sigmas, name):
    """Our noise levels and the timesteps the model saw are the reference's (sigmas: float32 there)."""
    _, levels = sigma_grid(schedule, steps, sigmas, spacing)
    torch.testing.assert_close(levels, ref_sigmas, rtol=1.2e-7, atol=0)  # the reference's sigmas are float32
    if method == "dpmpp-2m" and sigmas == "karras" and name == "cosine":
        return  # diffusers does not round cosine's Karras timesteps (see the module docstring)
    assert our_ts == ref_ts


SIGMA_CASES = [("dpmpp-2m", None), ("dpmpp-2m", "karras"), ("euler", None), ("euler", "karras"),
               ("euler-a", None), ("euler-a", "karras")]
CASES = [
    (name, prediction, method, sigmas, spacing, steps)
    for name, prediction, (method, sigmas), spacing, steps in itertools.product(
        SCHEDULES, ["eps", "v"], SIGMA_CASES, ["leading", "trailing", "linspace"], [10, 50])
    if sigmas is None or spacing == "linspace"  # Karras levels do not depend on the spacing
]


@pytest.mark.parametrize(
    "name,prediction,method,sigmas,spacing,steps", CASES,
    ids=[f"{n}-{p}-{m}{'-karras' if s else ''}-{sp}-{k}" for n, p, m, s, sp, k in CASES],
)
def test_sigma_samplers_agree_with_diffusers(name, prediction, method, sigmas, spacing, steps):
    b0, b1 = SCHEDULES[name][1:]
    schedule = NoiseSchedule(name, T, b0, b1)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
    ours, our_ts = our_trajectory(schedule, method, sigmas, prediction, spacing, steps, x_T)
    karras = sigmas == "karras"
    if method == "dpmpp-2m":
        ref, ref_ts, ref_sigmas = reference_dpm(name, schedule, prediction, spacing, steps, karras, x_T, our_ts)
    else:
        cls = EulerDiscreteScheduler if method == "euler" else EulerAncestralDiscreteScheduler
        ref, ref_ts, ref_sigmas = reference_euler(cls, name, schedule, prediction, spacing, steps, karras, x_T)
    check_grid(schedule, method, sigmas, spacing, steps, our_ts, ref_ts, ref_sigmas, name)
    assert_trajectories_agree(ours, ref)


def test_model_timesteps_follow_diffusers_convention():
    """Karras levels are not integer timesteps: Euler's model sees the fractional t (float32), DPM-Solver's t rounded."""
    schedule = NoiseSchedule("scaled_linear", T, 0.00085, 0.012)
    seen = {}
    for method in ("euler", "dpmpp-2m"):
        ts = []
        sample(lambda x, t: (ts.append(t), torch.zeros_like(x))[1], torch.zeros(1, 4), schedule, method=method,
               sigmas="karras", steps=10)
        seen[method] = torch.cat(ts)
    frac = sigma_grid(schedule, 10, "karras")[0]
    assert seen["euler"].dtype == torch.float32 and seen["dpmpp-2m"].dtype == torch.long
    assert torch.equal(seen["euler"], frac.float()) and torch.equal(seen["dpmpp-2m"], frac.round().long())
    assert (frac.frac() != 0).sum() >= 8  # all but the ends are between integer timesteps
    assert model_timestep("euler", None, 900.0) == 900  # on the timestep grid: the integer itself


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_is_ddim_eta0_on_the_same_timesteps(spacing):
    """Karras et al. 2022 sec. 3: DDIM (eta = 0) is Euler's method in sigma space; only float32 rounding differs
    (two algebraically equal float64 coefficient sets applied to float32 tensors: ~1e-7 per step)."""
    schedule = NoiseSchedule("linear", T)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for prediction in ("eps", "v"):
        args = dict(steps=20, prediction=prediction, timestep_spacing=spacing)
        euler = sample(denoise, x_T, schedule, method="euler", **args)
        ddim = sample(denoise, x_T, schedule, method="ddim", **args)
        assert ((euler - ddim).norm() / ddim.norm()).item() < 1e-5


def test_karras_grid_is_eq5():
    schedule = NoiseSchedule("scaled_linear", T, 0.00085, 0.012)
    ts, levels = sigma_grid(schedule, 25, "karras")
    s_min, s_max = schedule.sigma(0).item(), schedule.sigma(T - 1).item()
    # Karras eq. 5: sigma^(1/7) is evenly spaced from sigma_max^(1/7) to sigma_min^(1/7)
    torch.testing.assert_close(levels[:-1] ** (1 / 7), torch.linspace(s_max ** (1 / 7), s_min ** (1 / 7), 25,
                                                                      dtype=torch.float64), rtol=1e-12, atol=0)
    assert levels[-1] == 0 and ts[0] == T - 1 and abs(ts[-1]) < 1e-9
    torch.testing.assert_close(schedule.sigma_at(ts), levels[:-1], rtol=1e-12, atol=0)  # t_from_sigma inverts
    assert np.all(np.diff(ts.numpy()) < 0)
