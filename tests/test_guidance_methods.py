"""Guidance methods (ldm.guidance): rescale, interval and APG. Each reduces to plain CFG exactly when its parameter
switches it off, changes the result when its parameter changes, makes CFG's model calls, and agrees with the
reference it follows (diffusers' rescale_noise_cfg; diffusers' APG normalized_guidance, the authors' code). The
spec strings parse and format back; the pipeline, ``ldm generate`` and the PNG record (our JSON and A1111's text)
carry the method, and ``--from-png`` replays it bitwise."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.generate_cli import PNG_KEY
from ldm.guidance import (
    AdaptiveProjectedGuidance, ClassifierFreeGuidance, GuidanceMethod, IntervalGuidance, RescaledGuidance,
    format_guidance_method, make_guidance, parse_guidance_method, parse_guidance_methods,
)
from ldm.infotext import guidance_method_from_parameters, parse_parameters
from ldm.pipeline import Text2ImagePipeline
from ldm.samplers import sample
from ldm.schedule import NoiseSchedule, sigma_grid, split_prediction_at
from ldm.testing import build_bundle
from pipeline_fakes import CountingModel, contexts

SCHEDULE = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)  # the shipped models' schedule


def run(spec, w=5.0, method="ddim", steps=12, sigmas=None, prediction="eps", model=None):
    """A whole sampling run of ``spec`` with weight w on the counting model."""
    model = model or CountingModel()
    cond, uncond = contexts()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    denoise = make_guidance(spec, model, cond, uncond, w, schedule=SCHEDULE, prediction=prediction)
    return sample(denoise, x_T, SCHEDULE, method=method, steps=steps, sigmas=sigmas, prediction=prediction,
                  generator=torch.Generator().manual_seed(2))


# -- specs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, canonical", [
    ("cfg", "cfg"), ("rescale", "rescale:0.7"), ("rescale:0.25", "rescale:0.25"), ("interval:0.3-5", "interval:0.3-5"),
    ("interval:0-inf", "interval:0-inf"), ("interval: 1e-3 - 1E2", "interval:0.001-100"),
    ("apg", "apg:eta=0,r=15,beta=-0.5"), ("APG:r=2.5", "apg:eta=0,r=2.5,beta=-0.5"),
    ("apg:beta=0,eta=1,r=inf", "apg:eta=1,r=inf,beta=0"), ("rescale:0.1234567891234", "rescale:0.1234567891234"),
])
def test_spec_parses_and_formats_back(spec, canonical):
    method = parse_guidance_method(spec)
    assert format_guidance_method(method) == str(method) == canonical
    assert parse_guidance_method(canonical) == method and parse_guidance_method(method) == method


def test_sweep_list_keeps_apg_parameters_together():
    got = parse_guidance_methods("cfg,rescale:0.7,interval:0.2-0.8,apg:eta=0.5,r=4,beta=-0.25,apg")
    assert [str(m) for m in got] == ["cfg", "rescale:0.7", "interval:0.2-0.8", "apg:eta=0.5,r=4,beta=-0.25",
                                     "apg:eta=0,r=15,beta=-0.5"]
    assert got[3].kwargs == {"eta": 0.5, "r": 4.0, "beta": -0.25}


@pytest.mark.parametrize("spec, words", [
    ("pag", "is unknown; allowed: cfg, rescale"), ("cfg:2", "cfg takes no parameters"), ("rescale:1.5", "phi=1.5 is out of range"),
    ("rescale:x", "'x' is not a number"), ("interval:5-1", "needs 0 <= LO < HI"), ("interval:3", "interval:LO-HI"),
    ("apg:gamma=1", "KEY one of eta, r, beta"), ("apg:r=0", "r=0.0 is out of range"), ("apg:beta=1", "beta=1.0"),
    ("apg:eta=nan", "eta=nan"), ("rescale:", "nothing after ':'"), (GuidanceMethod("rescale"), "lacks its parameter"),
])
def test_bad_spec_is_a_value_error_naming_the_allowed_forms(spec, words):
    with pytest.raises(ValueError, match="allowed") as exc:
        parse_guidance_method(spec)
    assert words in str(exc.value) and "apg[:eta=E,r=R,beta=B]" in str(exc.value) and "\n" not in str(exc.value)


# -- reductions to CFG, exactly ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["rescale:0", "interval:0-inf", "apg:eta=1,r=inf,beta=0"])
@pytest.mark.parametrize("sampler", [("ddim", None), ("euler", "karras"), ("ddpm", None)])
def test_switched_off_equals_cfg_exactly(spec, sampler):
    method, sigmas = sampler
    cfg = run("cfg", method=method, sigmas=sigmas)
    assert torch.equal(run(spec, method=method, sigmas=sigmas), cfg)


def test_interval_covering_every_step_of_the_grid_equals_cfg():
    _, levels = sigma_grid(SCHEDULE, 12)  # the 12 levels ddim visits, then 0
    lo, hi = float(levels[-2]) * 0.999, float(levels[0])  # (lo, hi] holds every level visited, the top one too
    assert torch.equal(run(f"interval:{lo!r}-{hi!r}"), run("cfg"))


def test_apg_without_projection_momentum_or_threshold_is_cfg_through_x0():
    """The general APG path (r finite but never reached, so not the CFG shortcut) is CFG up to float32 rounding:
    x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) and back multiplies a rounding of ~1e-7 by at most
    1 / sqrt(abar) ~ 15 at the top step, over 12 steps of O(1) values."""
    torch.testing.assert_close(run("apg:eta=1,r=1e30,beta=0"), run("cfg"), rtol=1e-4, atol=1e-4)


# -- each parameter changes the result -------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    ("rescale:0.3", "rescale:0.7"), ("cfg", "rescale:0.7"), ("interval:0.5-3", "interval:1-20"), ("cfg", "interval:1-20"),
    ("apg:eta=0,r=inf,beta=0", "apg:eta=1,r=1e30,beta=0"), ("apg:eta=1,r=inf,beta=0", "apg:eta=1,r=inf,beta=-0.5"),
    ("apg:eta=1,r=inf,beta=0", "apg:eta=1,r=1,beta=0"), ("cfg", "apg"),
])
def test_parameter_changes_the_result(a, b):
    assert not torch.allclose(run(a), run(b), atol=1e-3)


# -- model calls -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["cfg", "rescale:0.7", "apg", "interval:0-inf"])
@pytest.mark.parametrize("w, size", [(1.0, 2), (4.0, 4)])
def test_one_batched_call_per_step_as_cfg(spec, w, size):
    model = CountingModel()
    run(spec, w=w, model=model)
    assert model.batches == [size] * 12


def test_interval_makes_half_size_calls_outside():
    model = CountingModel()
    run("interval:0.5-3", model=model)
    _, levels = sigma_grid(SCHEDULE, 12)
    expected = [4 if 0.5 < s <= 3 else 2 for s in levels[:-1].tolist()]
    assert model.batches == expected and 2 in expected and 4 in expected
    # rows at different noise levels in one call: CFG inside, the conditional output outside
    cond, uncond = contexts()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 800])  # sigma ~0.37 and ~7.4
    out = IntervalGuidance(CountingModel(), cond, uncond, 3.0, sigma_lo=1, sigma_hi=20, schedule=SCHEDULE)(x, t)
    cfg = ClassifierFreeGuidance(CountingModel(), cond, uncond, 3.0)(x, t)
    assert torch.equal(out[1], cfg[1]) and torch.allclose(out[0], CountingModel()(x, t, cond)[0])


@pytest.mark.parametrize("spec", ["cfg", "rescale:0.7", "interval:0.5-3", "apg:eta=0.2,r=3,beta=-0.5"])
@pytest.mark.parametrize("sampler", [("ddim", None), ("euler", "karras")])
def test_per_row_weights_give_each_row_its_scalar_run(spec, sampler):
    """One weight per row (a sweep batching several w): row i is the run with the scalar w_i, exactly (every
    operation is per row, and rows of weight 1 take the conditional output as the scalar w = 1 does). Every
    guided step is the batched call (interval's steps outside its range stay half-size)."""
    method, sigmas = sampler
    weights = (1.0, 4.5)
    model = CountingModel()
    mixed = run(spec, w=list(weights), method=method, sigmas=sigmas, model=model)
    assert set(model.batches) == ({2, 4} if spec.startswith("interval") else {4})
    for i, w in enumerate(weights):
        assert torch.equal(mixed[i], run(spec, w=w, method=method, sigmas=sigmas)[i]), (spec, w)
    assert torch.equal(run(spec, w=torch.tensor(weights)), run(spec, w=list(weights)))


def test_per_row_weights_must_match_the_batch():
    cond, uncond = contexts()
    with pytest.raises(ValueError, match="guidance has 3 weights but x_t has batch 2"):
        make_guidance("cfg", CountingModel(), cond, uncond, [1.0, 2.0, 3.0])(torch.zeros(2, 4, 8, 8), torch.zeros(2).long())
    for bad in ([], [1.0, -1.0], [2.0, "3"]):
        with pytest.raises(ValueError, match="guidance"):
            make_guidance("apg", CountingModel(), cond, uncond, bad, schedule=SCHEDULE)


# -- agreement with the references -------------------------------------------------------------------

def test_rescale_agrees_with_diffusers_rescale_noise_cfg():
    """For a v model the wrapper is rescale_noise_cfg on the outputs; for eps and x0 models it is rescale_noise_cfg
    on the v predictions, converted with abar at t. Tolerance: float32 arithmetic on O(1) values (a v model: a few
    roundings, ~1e-6); through eps the conversions multiply roundings by up to 1 / sqrt(abar_t) (~3 at t=600)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cond, uncond = contexts()
    x, t, w, phi = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([600, 600]), 6.0, 0.7
    model = CountingModel()
    out_u, out_c = model(x, t, uncond), model(x, t, cond)
    ours = RescaledGuidance(model, cond, uncond, w, phi=phi, schedule=SCHEDULE, prediction="v")(x, t)
    torch.testing.assert_close(ours, rescale_noise_cfg(out_u + w * (out_c - out_u), out_c, phi), rtol=1e-5, atol=1e-5)
    a = SCHEDULE.abar(t).view(-1, 1, 1, 1).float()
    for prediction in ("eps", "x0"):
        def v_of(out):
            x0, eps = split_prediction_at(out, x, SCHEDULE.abar(t), prediction)
            return a.sqrt() * eps - (1 - a).sqrt() * x0

        ours = RescaledGuidance(model, cond, uncond, w, phi=phi, schedule=SCHEDULE, prediction=prediction)(x, t)
        v_u, v_c = v_of(out_u), v_of(out_c)
        torch.testing.assert_close(v_of(ours), rescale_noise_cfg(v_u + w * (v_c - v_u), v_c, phi), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ours, rescale_noise_cfg(out_u + w * (out_c - out_u), out_c, phi), atol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_apg_agrees_with_the_authors_normalized_guidance_over_a_run(prediction):
    """diffusers' normalized_guidance with use_original_formulation=True is the authors' code (pred_cond + w * update
    there is applied with scale w - 1, as the paper writes it); we feed it the x0 predictions step by step with one
    MomentumBuffer, as the paper applies it. Tolerance: float32 conversions to and from x0 (factor <= ~15)."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    w, eta, r, beta = 5.0, 0.2, 3.0, -0.5
    cond, uncond = contexts()
    wrapper = AdaptiveProjectedGuidance(CountingModel(), cond, uncond, w, eta=eta, r=r, beta=beta, schedule=SCHEDULE,
                                        prediction=prediction)
    buffer, model = MomentumBuffer(beta), CountingModel()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    for step in (900, 600, 300, 50):
        t = torch.tensor([step, step])
        abar = SCHEDULE.abar(t)
        x0_u = split_prediction_at(model(x, t, uncond), x, abar, prediction)[0]
        x0_c = split_prediction_at(model(x, t, cond), x, abar, prediction)[0]
        ref = normalized_guidance(x0_c, x0_u, w - 1, buffer, eta=eta, norm_threshold=r, use_original_formulation=True)
        ours = split_prediction_at(wrapper(x, t), x, abar, prediction)[0]
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        x = 0.9 * x + 0.1 * ours  # move on, so the momentum sees changing differences


def test_apg_momentum_starts_afresh_each_run():
    cond, uncond = contexts(batch=1)  # shared by every row, so the batch may change
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def denoiser():
        return make_guidance("apg:beta=-0.5", CountingModel(), cond, uncond, 5.0, schedule=SCHEDULE)

    denoise = denoiser()
    first, second = (sample(denoise, x_T, SCHEDULE, steps=12) for _ in range(2))
    assert torch.equal(first, second) and torch.equal(first, sample(denoiser(), x_T, SCHEDULE, steps=12))
    denoise(torch.randn(3, 4, 8, 8), torch.full((3,), 5))  # another batch shape at a lower t: starts afresh
    assert denoise._average.shape[0] == 3
    denoise.reset()
    assert denoise._average is None
    # the momentum matters: without the reset a second run would differ from the first
    stale = denoiser()
    stale(x_T, torch.full((2,), 10))
    stale._last_t = math.inf  # hide the run boundary from it
    assert not torch.equal(sample(stale, x_T, SCHEDULE, steps=12), first)


def test_methods_need_the_schedule():
    cond, uncond = contexts()
    with pytest.raises(ValueError, match="needs the model's NoiseSchedule"):
        make_guidance("apg", CountingModel(), cond, uncond, 5.0)
    assert type(make_guidance("cfg", CountingModel(), cond, uncond, 5.0)) is ClassifierFreeGuidance


# -- pipeline, CLI, PNG record ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


def test_pipeline_takes_the_method_and_its_parameters(bundle):
    pipe = Text2ImagePipeline.from_pretrained(bundle, backend="torch")

    def image(spec):
        return pipe("a koala", steps=4, guidance=6.0, seed=0, num_images=2, output="tensor", guidance_method=spec)

    cfg = image("cfg")
    assert torch.equal(cfg, pipe("a koala", steps=4, guidance=6.0, seed=0, num_images=2, output="tensor"))
    assert torch.equal(image("rescale:0"), cfg) and torch.equal(image(parse_guidance_method("interval:0-inf")), cfg)
    for a, b in [("rescale:0.3", "rescale:0.9"), ("interval:0.5-3", "interval:2-20"), ("apg:eta=0", "apg:eta=1"),
                 ("apg:beta=0", "apg:beta=-0.5"), ("apg:r=inf", "apg:r=0.5")]:
        assert not torch.equal(image(a), image(b)), (a, b)
    with pytest.raises(ValueError, match="guidance method 'apg:k=1'"):
        image("apg:k=1")


@pytest.mark.parametrize("spec, a1111", [
    ("rescale:0.7", ("CFG Rescale phi", "0.7")), ("apg:eta=0.5,r=4", ("Guidance method", "apg:eta=0.5,r=4,beta=-0.5")),
    ("interval:0.5-3", ("Guidance method", "interval:0.5-3")),
])
def test_generate_records_the_method_and_replays_bitwise(bundle, tmp_path, capsys, spec, a1111):
    out = tmp_path / "k.png"
    assert main(["generate", "a koala", "--model", str(bundle), "--steps", "3", "--guidance", "5", "--num-images", "2",
                 "--guidance-method", spec, "--out", str(out), "--quiet"]) == 0
    path = tmp_path / "k-1.png"
    text = Image.open(path).text
    record, params = json.loads(text[PNG_KEY]), parse_parameters(text["parameters"])
    assert record["guidance_method"] == str(parse_guidance_method(spec))
    assert params[a1111[0]] == a1111[1] and guidance_method_from_parameters(params) == record["guidance_method"]
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(path), "--out", str(again), "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(path)))
    assert json.loads(Image.open(again).text[PNG_KEY])["guidance_method"] == record["guidance_method"]


def test_cfg_record_and_text_and_old_records(bundle, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main(["generate", "a koala", "--model", str(bundle), "--steps", "2", "--out", str(out), "--quiet"]) == 0
    text = Image.open(out).text
    record, params = json.loads(text[PNG_KEY]), parse_parameters(text["parameters"])
    assert record["guidance_method"] == "cfg" and "Guidance method" not in params and "CFG Rescale phi" not in params
    assert guidance_method_from_parameters(params) == "cfg"
    # a record written before guidance methods existed replays as cfg
    from PIL.PngImagePlugin import PngInfo

    del record["guidance_method"]
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(record))
    old = tmp_path / "old.png"
    Image.open(out).save(old, pnginfo=info)
    capsys.readouterr()
    assert main(["generate", "--from-png", str(old), "--out", str(tmp_path / "again.png"), "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    # a record whose method was edited into nonsense is named as damaged
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps({**record, "guidance_method": "apg:eta=7"}))
    Image.open(out).save(old, pnginfo=info)
    assert main(["generate", "--from-png", str(old), "--out", str(tmp_path / "again2.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "was edited or damaged" in err and "eta=7.0 is out of range" in err


@pytest.mark.parametrize("spec", ["apg:eta=2", "sag", "interval:1"])
def test_bad_method_is_one_line_exit_2(bundle, capsys, spec):
    assert main(["generate", "a koala", "--model", str(bundle), "--steps", "2", "--quiet", "--guidance-method", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm generate: error: --guidance-method:") and "allowed" in err and "\n" not in err
