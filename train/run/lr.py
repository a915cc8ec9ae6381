"""The learning-rate rule of every trainer: linear warm-up, then constant, linear or cosine decay.

With W = ``warmup_steps``, N = ``max_steps``, peak lr and floor lr_min, the rate used by optimizer
step s (counting from 0) is

    s < W:            lr * s / W                                         (warm-up)
    constant:         lr
    linear:           lr_min + (lr - lr_min) * (1 - p)                     p = (s - W) / (N - W), capped at 1
    cosine:           lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2       (Loshchilov & Hutter 2017, no restarts)

With lr_min = 0 these are diffusers' (and transformers') ``get_scheduler`` of the same names, step
for step (a test), including its convention that warm-up starts from 0 at step 0.

``constant`` has no warm-up; ``constant_with_warmup`` is the warm-up followed by ``constant``.
``build_lr_scheduler`` wraps the rule in a ``torch.optim.lr_scheduler.LambdaLR`` (its state goes
into checkpoints), stepped once per optimizer step. A resumed run continues at the checkpoint's
step under its own config's rule and peak lr (``train.run.resume``): ``optim.lr=...`` given with
``--resume`` applies, and the run log says so.
"""

from __future__ import annotations

import math

import torch

from train.run.sections import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0) under ``optim``'s rule."""
    if optim.lr_scheduler != "constant" and step < optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    if optim.lr_scheduler in ("constant", "constant_with_warmup"):
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    shape = 1 - progress if optim.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return optim.lr_min + (optim.lr - optim.lr_min) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
    """A LambdaLR over ``optimizer`` (built with ``lr=optim.lr``) following ``lr_at``, scaled to each param group's
    own lr. A group with ``stop_step`` N (a key of the group's dict) has lr 0 from step N on: it stays as it is."""

    def rule(stop):
        return lambda step: 0.0 if stop and step >= stop else lr_at(step, optim, max_steps) / optim.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [rule(g.get("stop_step")) for g in optimizer.param_groups])


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` (tensors, or param groups with their own weight_decay) with ``optim``'s kernel."""
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps)
    if optim.implementation == "fused":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = optim.implementation == "foreach"
    return torch.optim.AdamW(params, **kwargs)
