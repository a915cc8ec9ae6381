"""Mixed precision that follows the machine (placeholder until the CPU probe lands)."""

from __future__ import annotations

MIXED_PRECISION = ("auto", "fp32", "bf16", "fp16")


def resolve_mixed_precision(requested: str, device, log=print) -> str:
    if requested not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision={requested!r}; allowed: {', '.join(MIXED_PRECISION)}")
    if requested != "auto":
        return requested
    import torch

    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
