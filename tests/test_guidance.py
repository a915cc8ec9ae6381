"""Classifier-free guidance: one batched model call per step, exact w = 0 and w = 1, the CFG formula."""

import pytest
import torch

from ldm.guidance import ClassifierFreeGuidance
from ldm.samplers import sample
from ldm.schedule import NoiseSchedule
from pipeline_fakes import CountingModel, contexts


def test_guided_output_is_cfg_formula_from_one_batched_call():
    model, (cond, uncond) = CountingModel(), contexts()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 999])
    w = 7.5
    out = ClassifierFreeGuidance(model, cond, uncond, w)(x, t)
    assert model.batches == [4]  # one call on [uncond, cond]
    e_u, e_c = CountingModel()(x, t, uncond), CountingModel()(x, t, cond)
    torch.testing.assert_close(out, e_u + w * (e_c - e_u))


def test_w1_is_conditional_exactly_and_w0_unconditional_with_half_batch():
    (cond, uncond) = contexts()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    for w, ctx in [(1.0, cond), (0.0, uncond)]:
        model = CountingModel()
        out = ClassifierFreeGuidance(model, cond, uncond, w)(x, t)
        assert model.batches == [2]
        assert torch.equal(out, CountingModel()(x, t, ctx))
        assert isinstance(out, torch.Tensor) and out.shape == x.shape


@pytest.mark.parametrize("w, calls_per_step", [(0.0, 2), (1.0, 2), (3.0, 4)])
def test_sampler_makes_one_model_call_per_step(w, calls_per_step):
    model, (cond, uncond) = CountingModel(), contexts()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample(ClassifierFreeGuidance(model, cond, uncond, w), x_T, NoiseSchedule("linear"), method="ddim", steps=12)
    assert model.batches == [calls_per_step] * 12
    assert out.shape == x_T.shape


def test_single_context_row_is_shared_across_the_batch():
    model, (cond, uncond) = CountingModel(), contexts(batch=1)
    x, t = torch.randn(3, 4, 8, 8), torch.full((3,), 5)
    out = ClassifierFreeGuidance(model, cond, uncond, 2.0)(x, t)
    assert model.batches == [6] and out.shape == x.shape
    expected = ClassifierFreeGuidance(CountingModel(), cond.expand(3, -1, -1), uncond.expand(3, -1, -1), 2.0)(x, t)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("w", [-1.0, float("nan"), "7.5", None])
def test_bad_guidance_weight(w):
    cond, uncond = contexts()
    with pytest.raises(ValueError, match="guidance"):
        ClassifierFreeGuidance(CountingModel(), cond, uncond, w)


def test_mismatched_contexts():
    cond, _ = contexts()
    with pytest.raises(ValueError, match="differ in shape"):
        ClassifierFreeGuidance(CountingModel(), cond, torch.zeros(2, 7, 8), 2.0)
    with pytest.raises(ValueError, match="batch 2 but x_t has batch 3"):
        ClassifierFreeGuidance(CountingModel(), cond, cond, 2.0)(torch.zeros(3, 4, 8, 8), torch.zeros(3, dtype=torch.long))
