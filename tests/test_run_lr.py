"""The one learning-rate rule of every trainer (train.run.lr) against diffusers' get_scheduler."""

import pytest
import torch

from train.run.lr import build_lr_scheduler, lr_at
from train.run.sections import OptimConfig


def _rates(scheduler, optimizer, steps):
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("kind", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_equals_diffusers_get_scheduler(kind):
    from diffusers.optimization import get_scheduler

    optim = OptimConfig(lr=3e-4, lr_scheduler=kind, warmup_steps=7)
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    ours = _rates(build_lr_scheduler(ours_opt, optim, 40), ours_opt, 40)
    ref = _rates(get_scheduler(kind, ref_opt, num_warmup_steps=7, num_training_steps=40), ref_opt, 40)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-18)


def test_floor_and_shape():
    optim = OptimConfig(lr=1e-3, lr_min=1e-4, lr_scheduler="cosine", warmup_steps=10)
    assert lr_at(0, optim, 110) == 0.0 and lr_at(5, optim, 110) == pytest.approx(5e-4)
    assert lr_at(10, optim, 110) == pytest.approx(1e-3)  # the peak right after warm-up
    assert lr_at(60, optim, 110) == pytest.approx(5.5e-4)  # half way: the mean of peak and floor
    assert lr_at(110, optim, 110) == pytest.approx(1e-4) and lr_at(500, optim, 110) == pytest.approx(1e-4)
    linear = OptimConfig(lr=1e-3, lr_min=1e-4, lr_scheduler="linear", warmup_steps=0)
    assert lr_at(50, linear, 100) == pytest.approx(5.5e-4)


def test_a_bad_rule_is_refused():
    with pytest.raises(ValueError, match="lr_min"):
        OptimConfig(lr=1e-3, lr_min=1e-2)
