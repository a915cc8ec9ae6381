"""Classifier-free guidance (Ho & Salimans 2022) as a ``denoise`` wrapper.

    out = out_uncond + w * (out_cond - out_uncond)

The wrapper turns a conditional model ``model(x_t, t, context) -> output`` and
two contexts (the empty or negative prompt, and the prompt) into a
``denoise(x_t, t)`` with the sampler's signature. Each call makes one batched
model call on [uncond, cond]; w = 1 is the conditional model alone and w = 0
the unconditional one, each with a single half-size call. It always returns a
tensor of x_t's shape, whatever w is.

The same combination is valid for eps, x0 and v outputs: all three are affine
in the score at fixed (x_t, t), so guiding any of them guides the score.
"""

from __future__ import annotations

from typing import Callable

import torch

# model(x_t (B, C, H, W), t (B,), context (B, L, D)) -> output (B, C, H, W)
ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _match_batch(context: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """A context of batch 1 is shared by every sample; otherwise it must have one row per sample."""
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return context.expand(batch, *context.shape[1:])
    raise ValueError(f"{name} has batch {context.shape[0]} but x_t has batch {batch}; give 1 or {batch} rows")


class ClassifierFreeGuidance:
    """``denoise(x_t, t)`` for a conditional model under classifier-free guidance with weight w.

    Args:
        model: ``model(x_t, t, context)``.
        cond: the prompt's context, (B, L, D) or (1, L, D).
        uncond: the empty-prompt or negative-prompt context, the same shape as ``cond``.
        guidance: the weight w >= 0 (1 = no guidance; Stable Diffusion's default is 7.5).
    """

    def __init__(self, model: ConditionalModel, cond: torch.Tensor, uncond: torch.Tensor, guidance: float):
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not guidance >= 0:
            raise ValueError(f"guidance={guidance!r} must be a number >= 0 (1 disables guidance)")
        if cond.shape[1:] != uncond.shape[1:]:
            raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} contexts differ in shape")
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.guidance = float(guidance)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x_t.shape[0]
        cond = _match_batch(self.cond, batch, "cond")
        uncond = _match_batch(self.uncond, batch, "uncond")
        if self.guidance == 1:
            return self.model(x_t, t, cond)
        if self.guidance == 0:
            return self.model(x_t, t, uncond)
        out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))  # (2B, ...)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + self.guidance * (out_cond - out_uncond)
