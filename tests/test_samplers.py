"""Sampler behaviour beyond agreement with diffusers: determinism, seeds, the callback, bad input."""

import pytest
import torch

from ldm.samplers import sample
from ldm.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule("linear", 1000)


def denoise(x, t):
    return 0.5 * torch.tanh(x) * (1 + t.view(-1, *([1] * (x.dim() - 1))) / 1000)


def x_T(seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ddim_eta0_is_deterministic_and_ignores_generator():
    a = sample(denoise, x_T(), SCHEDULE, method="ddim", steps=20, generator=torch.Generator().manual_seed(1))
    b = sample(denoise, x_T(), SCHEDULE, method="ddim", steps=20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 0.5), ("euler-a", 0.0)])
def test_stochastic_samplers_follow_the_generator(method, eta):
    run = lambda seed: sample(denoise, x_T(), SCHEDULE, method=method, eta=eta, steps=20,  # noqa: E731
                              generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_any_trailing_shape_and_dtype_preserved():
    for shape in [(3, 5), (1, 2, 3, 4, 5)]:
        out = sample(denoise, x_T(shape=shape).double(), SCHEDULE, steps=5)
        assert out.shape == shape and out.dtype == torch.float64


def test_callback_sees_every_step_in_order():
    seen = []
    final = sample(denoise, x_T(), SCHEDULE, method="ddim", steps=10, timestep_spacing="trailing",
                   callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape, x)))
    assert [(i, t) for i, t, *_ in seen] == list(enumerate(range(999, 0, -100)))
    assert all(s == x0s == (2, 4, 8, 8) for *_, s, x0s, _ in seen)
    assert torch.equal(seen[-1][-1], final)


def test_clip_x0_bounds_the_prediction():
    x0s = []
    sample(lambda x, t: -3 * x, x_T(), SCHEDULE, steps=10, clip_x0=1.0, callback=lambda i, t, x, x0: x0s.append(x0))
    assert all(x0.abs().max() <= 1.0 for x0 in x0s)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(method="heun"), ["method='heun'", "ddim", "ddpm", "dpmpp-2m", "euler", "euler-a"]),
        (dict(method="euler", eta=0.5), ["eta=0.5", "ddim", "method='euler' has no eta"]),
        (dict(method="dpmpp-2m", eta=1.0), ["eta=1.0", "method='dpmpp-2m' has no eta"]),
        (dict(method="euler-a", eta=1.0), ["eta=1.0", "method='euler-a' has no eta"]),
        (dict(method="ddpm", sigmas="karras"), ["sigmas='karras'", "dpmpp-2m, euler, euler-a", "method='ddpm'"]),
        (dict(method="ddim", sigmas="karras"), ["sigmas='karras'", "method='ddim'"]),
        (dict(method="euler", sigmas="exponential"), ["sigmas='exponential'", "karras"]),
        (dict(steps=0), ["steps=0", "1..1000"]),
        (dict(steps=1001), ["steps=1001", "1..1000"]),
        (dict(steps=2.5), ["steps=2.5"]),
        (dict(eta=-0.5), ["eta=-0.5", ">= 0"]),
        (dict(method="ddpm", eta=0.5), ["eta=0.5", "ddim"]),
        (dict(timestep_spacing="karras"), ["timestep_spacing='karras'", "leading", "trailing", "linspace"]),
        (dict(prediction="epsilon"), ["prediction='epsilon'", "eps", "x0", "v"]),
        (dict(method="ddpm", variance="learned"), ["variance='learned'", "fixed_small", "fixed_large"]),
        (dict(clip_x0=0), ["clip_x0"]),
    ],
)
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError) as info:
        sample(denoise, x_T(), SCHEDULE, **kwargs)
    for w in words:
        assert w in str(info.value)


def test_denoise_of_wrong_shape():
    with pytest.raises(ValueError, match=r"denoise returned \(2, 4, 8\); expected a tensor of shape \(2, 4, 8, 8\)"):
        sample(lambda x, t: x[..., 0], x_T(), SCHEDULE, steps=2)


def test_a_generator_per_sample_makes_each_row_reproducible_alone():
    x = x_T()
    both = sample(denoise, x, SCHEDULE, method="ddpm", steps=20,
                  generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    second = sample(denoise, x[1:], SCHEDULE, method="ddpm", steps=20, generator=[torch.Generator().manual_seed(6)])
    # a batch of 2 against a batch of 1: elementwise kernels may take other vector/tail paths (an ulp per
    # op, 20 steps), so float32 tolerances relative to values up to ~300
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sample(denoise, x, SCHEDULE, method="ddpm", steps=2, generator=[torch.Generator()] * 3)
