"""The empty prompt: the one definition of the unconditional context.

Classifier-free guidance needs the same "no caption" input in two places:

* training replaces a caption's context by the empty context with probability
  ``p_uncond`` (caption dropout, ``apply_caption_dropout``), so one network
  learns both the conditional and the unconditional prediction;
* sampling feeds the empty context to the unconditional branch
  (``unconditional_context``), unless the user gives a negative prompt, which
  then takes its place.

Both use the text encoder's own output for ``EMPTY_PROMPT`` (``""``: start and
end tokens, then padding), computed once by ``TextEncoder.empty_context``, as
Stable Diffusion does. A zero tensor would be a different input from the one
the encoder gives at sampling time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from conditioning.encoders import TextEncoder

EMPTY_PROMPT = ""


def apply_caption_dropout(
    context: torch.Tensor,
    empty: torch.Tensor,
    p_uncond: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Replace each row of ``context`` (B, L, D) by ``empty`` with probability ``p_uncond``.

    Args:
        context: the captions' contexts, (B, L, D).
        empty: the empty-prompt context, (1, L, D) or (B, L, D), e.g. ``encoder.empty_context(1)``.
        p_uncond: dropout probability in [0, 1] (Stable Diffusion and generative-models' ``ucg_rate``: 0.1).
        generator: source of the per-row coin flips (drawn on the generator's device).

    Returns:
        A new tensor of context's shape and dtype; ``context`` is not modified.
    """
    if not isinstance(p_uncond, (int, float)) or isinstance(p_uncond, bool) or not 0 <= p_uncond <= 1:
        raise ValueError(f"p_uncond={p_uncond!r} must be a probability in [0, 1]")
    if context.dim() != 3:
        raise ValueError(f"context must be (B, L, D); got shape {tuple(context.shape)}")
    if empty.dim() != 3 or empty.shape[1:] != context.shape[1:] or empty.shape[0] not in (1, context.shape[0]):
        raise ValueError(f"empty {tuple(empty.shape)} must be (1, L, D) or (B, L, D) for context {tuple(context.shape)}")
    batch = context.shape[0]
    device = generator.device if generator is not None else context.device
    drop = torch.rand(batch, generator=generator, device=device).to(context.device) < p_uncond  # (B,)
    return torch.where(drop.view(batch, 1, 1), empty.to(context.dtype), context)  # (B, L, D)


def unconditional_context(
    encoder: "TextEncoder", batch_size: int, negative_prompt: Optional[str] = None
) -> torch.Tensor:
    """The context of the unconditional branch at sampling time, (batch_size, L, D).

    The empty-prompt context, or the negative prompt's context when one is given (a negative
    prompt of ``""`` is the empty prompt itself).
    """
    if negative_prompt is None or negative_prompt == EMPTY_PROMPT:
        return encoder.empty_context(batch_size)
    if not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
    context, _ = encoder([negative_prompt])  # (1, L, D)
    return context.expand(batch_size, -1, -1)
