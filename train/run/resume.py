"""Resuming with changed optimizer settings, the same for every trainer: the config's values win.

A checkpoint holds the optimizer's param groups (lr, betas, weight_decay, eps, ...) and the LR
schedule's state (its ``base_lrs``: the peak rate of the run that wrote it). Loaded as they are, they
would silently override what the resumed run's config says, e.g. an ``optim.lr`` lowered to get
past a divergence. So every trainer wraps its loading in

    settings = OptimizerSettings(optimizer, lr_scheduler)          # built from this run's config
    ...load the checkpoint into optimizer and lr_scheduler...
    for change in settings.reapply():                               # this run's config put back
        ckpt.warn(change, log)                                      # "optim.lr is 0.001 in ... , 1e-05 now"

What a resume keeps from the checkpoint: the weights, the optimizer's moments and step counts, the
step (so the LR schedule continues at the same step, under this config's rule and peak), the
position in the data and the random states. What it takes from the config: every optimizer
hyperparameter and the LR rule (``optim.*``, ``train.max_steps``). Settings that change the data
order or the tensors a checkpoint holds (batch size, accumulation, processes, the model) are
refused by each trainer in one line.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

# param group key -> the config key that sets it (the main optimizer of every trainer)
OPTIM_KEYS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "betas": "optim.betas", "eps": "optim.eps"}


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class OptimizerSettings:
    """The hyperparameters ``optimizer`` (and ``lr_scheduler``, a LambdaLR) were built with, to put back
    after a checkpoint is loaded into them. ``keys``: param group key -> config key, for the messages."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_scheduler=None, keys: Optional[dict[str, str]] = None,
                 label: str = ""):
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.keys = OPTIM_KEYS if keys is None else keys
        self.label = label
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.base_lrs = list(lr_scheduler.base_lrs) if lr_scheduler is not None else None

    def _peaks(self) -> list[float]:
        """The peak learning rate of each group as loaded (the schedule's base_lrs, else the group's lr)."""
        if self.lr_scheduler is not None:
            return list(self.lr_scheduler.base_lrs)
        return [g["lr"] for g in self.optimizer.param_groups]

    def reapply(self, checkpoint: Any = "the checkpoint") -> list[str]:
        """Put this run's hyperparameters back into the loaded optimizer (and schedule: the peak rate, and
        the rate of the current step under this config's rule); returns one line per setting the
        checkpoint had otherwise, for the run log."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.groups):
            raise ValueError(f"{checkpoint} holds an optimizer of {len(groups)} parameter groups, this run builds "
                             f"{len(self.groups)}; was it written by another trainer or model?")
        ours = self.base_lrs if self.base_lrs is not None else [g["lr"] for g in self.groups]
        changes: dict[str, tuple[set, set]] = {}

        def note(key: str, theirs: Any, mine: Any) -> None:
            if key in self.keys and _plain(theirs) != _plain(mine):
                old, new = changes.setdefault(self.keys[key], (set(), set()))
                old.add(repr(_plain(theirs)))
                new.add(repr(_plain(mine)))

        for loaded_lr, lr in zip(self._peaks(), ours):
            note("lr", loaded_lr, lr)
        for group, fresh in zip(groups, self.groups):
            for key, value in fresh.items():
                if key not in ("lr", "initial_lr"):
                    note(key, group.get(key), value)
                    group[key] = value
            if "initial_lr" in fresh:
                group["initial_lr"] = fresh["initial_lr"]
        if self.lr_scheduler is not None:
            sched = self.lr_scheduler
            sched.base_lrs = list(self.base_lrs)
            for group, base, rule in zip(groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * rule(sched.last_epoch)  # what LambdaLR's step at last_epoch gives
            sched._last_lr = [g["lr"] for g in groups]
        else:
            for group, fresh in zip(groups, self.groups):
                group["lr"] = fresh["lr"]
        where = f" ({self.label})" if self.label else ""
        return [f"{name}{where} is {', '.join(sorted(old))} in {checkpoint} and {', '.join(sorted(new))} in this "
                "run's config: the config's value applies from the resumed step on"
                for name, (old, new) in changes.items()]
