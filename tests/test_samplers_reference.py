"""Our samplers agree with diffusers' DDPMScheduler / DDIMScheduler, step by step.

Both are driven by the same deterministic, non-trivial denoise function from the same x_T with
the same generator, and every intermediate sample is compared. Settings on the diffusers side:

* DDIM: ``set_alpha_to_one=True`` (the last step lands on abar = 1, our convention) and
  ``use_clipped_model_output=True`` (eps re-derived from the clipped x0, our convention).
* The reference computes in float64, ours in float32, and the two must agree to 1e-5 relative
  (the norm of the difference over the norm of the reference, at every step). diffusers in
  float32 is not itself that close to the exact result: it builds its schedule in float32 (DDPM's
  per-step ratio abar_t / abar_{t-1} then drifts by up to 2.6e-4 relative over 1000 cosine steps)
  and its float32 DDIM updates drift 1.4e-5 from a float64 run over 1000 cosine steps (ours:
  3.6e-6). So the reference is diffusers' scheduler code fed our float64 ``alphas_cumprod``,
  float64 samples, and the very float32 noise draws our sampler makes (``_float32_noise``).
  ``test_schedule.py`` compares the schedules themselves.
* ``quadratic`` is diffusers' ``scaled_linear`` curve with DDPM's beta range.
* diffusers' DDIM steps from t to t - T // steps, which is off the ``linspace`` grid; we step to
  the next grid timestep. For ``linspace`` the reference is diffusers' own DDIM update told to
  step to that grid timestep (``_ddim_step_to``).
* diffusers' DDPM adds noise on the final step whenever its timestep is > 0 (``trailing``); with
  ``fixed_large`` that noise has variance 1 - abar_t and we add none (DDPM's z = 0 at t = 1), so
  that one case compares every step but the last.
"""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ldm.samplers import sample
from ldm.schedule import DIFFUSERS_PREDICTION, NoiseSchedule

T = 1000
# our schedule -> (diffusers beta_schedule, beta_start, beta_end)
SCHEDULES = {
    "linear": ("linear", 1e-4, 0.02),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "quadratic": ("scaled_linear", 1e-4, 0.02),
    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
}
# (method, eta, variance)
METHODS = [
    ("ddpm", 0.0, "fixed_small"),
    ("ddpm", 0.0, "fixed_large"),
    ("ddim", 0.0, None),
    ("ddim", 0.5, None),
    ("ddim", 1.0, None),
]
RTOL = 1e-5


def denoise(x, t):
    """Smooth, nonlinear in x, mixes neighbours and depends on t: any mix-up of timesteps,
    coefficients or parameterisations shows."""
    tt = (t.to(x.dtype) / T).view(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(0.8 * x + 0.3 * x.roll(1, dims=-1)) * (0.6 + 0.4 * torch.cos(3 * tt)) + 0.1 * tt


def our_trajectory(schedule, prediction, method, eta, variance, spacing, steps, x_T, clip=None):
    traj = []
    sample(
        denoise, x_T, schedule, method=method, steps=steps, eta=eta, prediction=prediction,
        timestep_spacing=spacing, variance=variance or "fixed_small", clip_x0=clip,
        generator=torch.Generator().manual_seed(1), callback=lambda i, t, x, x0: traj.append(x),
    )
    return traj


def _ddim_step_to(sched, s, output, t, x, eta, generator):
    """diffusers' DDIMScheduler.step from t to the timestep s of our choosing.

    Its step computes prev = t - config.num_train_timesteps // num_inference_steps; we set those
    two numbers for the duration of the call so that prev = s, and leave its maths untouched."""
    saved_T, saved_n = sched.config.num_train_timesteps, sched.num_inference_steps
    sched.register_to_config(num_train_timesteps=int(t) - s)
    sched.num_inference_steps = 1
    try:
        return sched.step(output, t, x, eta=eta, generator=generator, use_clipped_model_output=True).prev_sample
    finally:
        sched.register_to_config(num_train_timesteps=saved_T)
        sched.num_inference_steps = saved_n


@pytest.fixture(autouse=True)
def _float32_noise(monkeypatch):
    """diffusers draws step noise with ``randn_tensor(..., dtype=sample.dtype)``; in the float64
    reference make it draw what our float32 sampler draws from the same generator."""

    def randn_float32(shape, generator=None, device=None, dtype=None, **kwargs):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    for module in ("scheduling_ddpm", "scheduling_ddim"):
        monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor", randn_float32)


def reference_trajectory(name, schedule, prediction, method, eta, variance, spacing, steps, x_T, clip=None):
    beta_schedule, beta_start, beta_end = SCHEDULES[name]
    common = dict(
        num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
        prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing=spacing,
        clip_sample=clip is not None, clip_sample_range=clip or 1.0,
    )
    if method == "ddpm":
        sched = DDPMScheduler(variance_type=variance, **common)
    else:
        sched = DDIMScheduler(set_alpha_to_one=True, **common)
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()  # float64
    sched.set_timesteps(steps)
    timesteps = [int(t) for t in sched.timesteps]
    generator = torch.Generator().manual_seed(1)
    x, traj = x_T.double(), []
    for i, t in enumerate(timesteps):
        output = denoise(x, torch.full((x.shape[0],), t))
        if method == "ddpm":
            x = sched.step(output, t, x, generator=generator).prev_sample
        else:
            s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            x = _ddim_step_to(sched, s, output, t, x, eta, generator)
        traj.append(x.float())
    return traj


def assert_trajectories_agree(ours, ref, skip_last=False):
    assert len(ours) == len(ref)
    pairs = list(zip(ours, ref))[: -1 if skip_last else None]
    for i, (a, b) in enumerate(pairs):
        assert a.dtype == b.dtype == torch.float32
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= RTOL, f"step {i}: relative error {rel:.2e} > {RTOL:.0e}"


def run_case(name, prediction, method, eta, variance, spacing, steps, clip=None):
    b0, b1 = SCHEDULES[name][1:]
    schedule = NoiseSchedule(name, T, b0, b1)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
    ours = our_trajectory(schedule, prediction, method, eta, variance, spacing, steps, x_T, clip)
    ref = reference_trajectory(name, schedule, prediction, method, eta, variance, spacing, steps, x_T, clip)
    skip_last = method == "ddpm" and variance == "fixed_large" and spacing == "trailing"
    assert_trajectories_agree(ours, ref, skip_last)
    return ours, ref


CASES = list(itertools.product(SCHEDULES, ["eps", "v"], METHODS, ["leading", "trailing", "linspace"], [10, 50]))


@pytest.mark.parametrize(
    "name,prediction,method,spacing,steps", CASES,
    ids=[f"{n}-{p}-{m[0]}{m[1] if m[0] == 'ddim' else m[2]}-{s}-{k}" for n, p, m, s, k in CASES],
)
def test_strided_sampling_agrees_with_diffusers(name, prediction, method, spacing, steps):
    run_case(name, prediction, *method, spacing, steps)


FULL = list(itertools.product(SCHEDULES, ["eps", "v"], METHODS))


@pytest.mark.parametrize(
    "name,prediction,method", FULL,
    ids=[f"{n}-{p}-{m[0]}{m[1] if m[0] == 'ddim' else m[2]}" for n, p, m in FULL],
)
def test_all_1000_steps_agree_with_diffusers(name, prediction, method):
    # With steps = T every spacing visits T-1 .. 0 (checked in test_schedule.py), so one suffices.
    run_case(name, prediction, *method, "leading", T)


@pytest.mark.parametrize("method", METHODS[:1] + METHODS[2:4], ids=["ddpm", "ddim0", "ddim0.5"])
def test_clipped_x0_agrees_with_diffusers(method):
    run_case("linear", "eps", *method, "leading", 10, clip=1.0)


def test_trailing_fixed_large_ends_without_noise():
    """The one documented difference: our last DDPM step is the posterior mean, whatever the generator."""
    schedule = NoiseSchedule("linear", T)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    finals = [
        sample(denoise, x_T, schedule, method="ddpm", steps=10, timestep_spacing="trailing",
               variance="fixed_large", generator=torch.Generator().manual_seed(seed))
        for seed in (1, 1, 2)
    ]
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=0)
    assert not torch.allclose(finals[0], finals[2])  # earlier steps are stochastic
