"""EMA of the trained weights: diffusers' ``EMAModel`` built from our config, and its state as
safetensors-ready tensors (keyed by parameter name) plus JSON scalars for checkpoints.

The decay after n optimizer steps past ``update_after_step`` is (diffusers' ``get_decay``)
    warm-up on:  min(decay, max(min_decay, 1 - (1 + n / inv_gamma) ** -power))
    warm-up off: min(decay, max(min_decay, (1 + n) / (10 + n)))
and each step moves the average: ema <- ema - (1 - decay_n) (ema - w).
"""

from __future__ import annotations

from typing import Iterable

import torch

from train.run.sections import EMAConfig


def build_ema(config: EMAConfig, parameters: Iterable[torch.nn.Parameter]):
    """An EMAModel over ``parameters`` (the trainable ones), its shadow weights in float32."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(
        [p for p in parameters], decay=config.decay, min_decay=config.min_decay,
        update_after_step=config.update_after_step, use_ema_warmup=config.warmup,
        inv_gamma=config.inv_gamma, power=config.power, foreach=True,
    )
    ema.shadow_params = [p.float() for p in ema.shadow_params]
    return ema


def ema_state(ema, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(shadow tensors by parameter name, JSON scalars) of an EMAModel."""
    scalars = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    return {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}, scalars


def load_ema_state(ema, names: list[str], tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """Restore ``ema`` from what ``ema_state`` returned (same parameter names and order)."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint EMA lacks {len(missing)} parameters, e.g. {missing[0]}; was it saved from another model?")
    for p, n in zip(ema.shadow_params, names):
        p.copy_(tensors[n])
    for k, v in scalars.items():
        setattr(ema, k, v)
