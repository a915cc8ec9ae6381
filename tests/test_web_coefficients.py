"""The browser's per-step coefficients reproduce ldm.samplers.sample (DDIM eta 0 and > 0, DDPM, DPM++ 2M,
Euler, Euler a, with and without Karras sigmas)."""

import numpy as np
import pytest
import torch

from ldm.pipeline import SamplingConfig
from ldm.samplers import sample
from ldm.schedule import NoiseSchedule
from ldm.web.coefficients import FIELDS, sampler_table, step_rows


def apply_rows(rows, model_output, x_T, noises, clip_x0=None):
    """The page's loop (static/sampler.js) in numpy float64."""
    x = np.asarray(x_T, dtype=np.float64)
    noises = iter(noises)
    x0_prev = None
    for t, noisy, px, po, ex, eo, qx, q0, ax, a0, ae, az, ap in rows:
        out = model_output(x, t)
        x0 = px * x + po * out
        if clip_x0 is not None:
            x0 = np.clip(x0, -clip_x0, clip_x0)
            eps = qx * x + q0 * x0
        else:
            eps = ex * x + eo * out
        z = next(noises) if noisy else 0.0
        x = ax * x + a0 * x0 + ae * eps + az * z + (ap * x0_prev if ap else 0.0)
        x0_prev = x0
    return x


W = torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 3


def model(x, t):
    """A nonlinear stand-in for the guided U-Net, (B, 8) float64 -> (B, 8)."""
    return torch.tanh(x @ W * (1 + t / 500)) + 0.1 * x


def run_both(method, steps, eta, prediction="eps", spacing="leading", offset=0, variance="fixed_small", clip=None,
             sigmas=None):
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    x_T = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample(lambda x, t: model(x, t[0].item()), x_T, schedule, method=method, steps=steps, eta=eta,
                 prediction=prediction, timestep_spacing=spacing, steps_offset=offset, variance=variance,
                 clip_x0=clip, generator=torch.Generator().manual_seed(7), sigmas=sigmas)
    rows = step_rows(schedule, method=method, steps=steps, eta=eta, prediction=prediction,
                     timestep_spacing=spacing, steps_offset=offset, variance=variance, sigmas=sigmas)
    g = torch.Generator().manual_seed(7)
    noises = (torch.randn(x_T.shape, generator=g, dtype=torch.float64).numpy() for _ in range(steps))
    got = apply_rows(rows, lambda x, t: model(torch.from_numpy(x), t).numpy(), x_T.numpy(), noises, clip)
    return ref.numpy(), got, rows


@pytest.mark.parametrize("method,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("ddpm", 0.0)])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_rows_reproduce_the_sampler(method, eta, steps):
    ref, got, rows = run_both(method, steps, eta)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    assert [bool(r[1]) for r in rows] == [i < steps - 1 and (method == "ddpm" or eta > 0) for i in range(steps)]


@pytest.mark.parametrize("method,sigmas", [("dpmpp-2m", None), ("dpmpp-2m", "karras"), ("euler", None),
                                           ("euler", "karras"), ("euler-a", None), ("euler-a", "karras")])
@pytest.mark.parametrize("steps", [1, 7, 50])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_rows_reproduce_the_sigma_samplers(method, sigmas, steps, prediction):
    ref, got, rows = run_both(method, steps, 0.0, prediction, sigmas=sigmas, clip=1.0 if steps == 7 else None)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    assert [bool(r[1]) for r in rows] == [method == "euler-a" and i < steps - 1 for i in range(steps)]
    assert [bool(r[-1]) for r in rows] == [method == "dpmpp-2m" and 0 < i < steps - 1 for i in range(steps)]


@pytest.mark.parametrize("prediction,spacing,offset,variance,clip", [
    ("v", "trailing", 0, "fixed_small", None),
    ("x0", "linspace", 0, "fixed_large", None),
    ("eps", "leading", 1, "fixed_large", 1.0),
])
@pytest.mark.parametrize("method,eta", [("ddim", 0.3), ("ddpm", 0.0)])
def test_rows_follow_the_bundle_conventions(prediction, spacing, offset, variance, clip, method, eta):
    ref, got, _ = run_both(method, 10, eta, prediction, spacing, offset, variance, clip)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_table_lists_every_sampler_and_step_count():
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    table = sampler_table(schedule, SamplingConfig(), max_steps=4, etas=(0.0, 1.0))
    assert table["fields"] == list(FIELDS)
    assert [(s["method"], s["eta"], s["sigmas"]) for s in table["samplers"]] == [
        ("ddim", 0.0, None), ("ddim", 1.0, None), ("ddpm", 0.0, None), ("dpmpp-2m", 0.0, None),
        ("dpmpp-2m", 0.0, "karras"), ("euler", 0.0, None), ("euler-a", 0.0, None)]
    for s in table["samplers"]:
        assert sorted(s["by_steps"], key=int) == ["1", "2", "3", "4"]
        assert all(len(s["by_steps"][n]) == int(n) for n in s["by_steps"])
    with pytest.raises(ValueError, match="max_steps"):
        sampler_table(schedule, SamplingConfig(), max_steps=0)


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_rows_and_exported_noise_reproduce_the_pipeline(tmp_path, method, eta):
    """The page's recipe (rows + the exporter's noise for a seed) gives the pipeline's latents for that seed."""
    from ldm.pipeline import Text2ImagePipeline
    from ldm.guidance import ClassifierFreeGuidance
    from ldm.testing import build_bundle
    from ldm.web.export import noise_draws

    pipe = Text2ImagePipeline.from_pretrained(build_bundle(tmp_path / "bundle"))
    steps, seed, guidance = 6, 3, 3.0
    req = pipe.request("koala, twemoji style", "blurry", seed, 1)
    ref = pipe.generate_latents(req, steps=steps, method=method, eta=eta, guidance=guidance)[0].numpy()  # (C, h, w)
    shape = pipe.latent_shape(None, None)
    noise = noise_draws([seed], shape, steps)[0]  # (steps, C, h, w)
    cond, uncond = pipe._contexts(req.prompts, req.negatives, guidance)
    denoise = ClassifierFreeGuidance(pipe.model, cond, uncond, guidance)
    rows = step_rows(pipe.schedule, method=method, steps=steps, eta=eta, prediction=pipe.sampling.prediction,
                     timestep_spacing=pipe.sampling.timestep_spacing, steps_offset=pipe.sampling.steps_offset)

    def guided(x, t):
        with torch.no_grad():
            return denoise(torch.from_numpy(x).float()[None], torch.tensor([t]))[0].double().numpy()

    got = apply_rows(rows, guided, noise[0], noise[1:])
    np.testing.assert_allclose(got, ref, atol=1e-4)
