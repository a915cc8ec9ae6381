"""``torch.randn`` on the CPU, without torch: the same float32 numbers from the same seed.

The sampler's starting noise and its per-step noise are ``torch.randn(shape, generator=g)`` with
``g = torch.Generator().manual_seed(seed)`` (``ldm.samplers.randn``). The torch-free runner must draw
the same numbers, or its images would differ from the torch pipeline's. On the CPU torch draws them so
(ATen ``normal_fill``, for contiguous float32 tensors of 16 values or more):

1. the generator is MT19937 seeded with ``seed & 0xffffffff`` (the reference ``init_genrand``);
2. ``numel`` uniforms u = (r & 0xffffff) * 2^-24, one 32-bit draw r each;
3. Box-Muller on each block of 16: for j < 8, with u1 = 1 - u[j], u2 = u[j + 8],
   r = sqrt(-2 log u1), theta = 2 pi u2, x[j] = r cos(theta), x[j + 8] = r sin(theta), in float32;
4. when numel is not a multiple of 16, 16 fresh uniforms replace the last 16 and that block is redone.

Everything but step 3's log, sin and cos is reproduced bit for bit. torch takes those from Sleef's vector
functions (1 ulp), numpy from its own, so about 15% of the values differ from torch's, by a unit or two in
the last place (2.4e-7 for |x| < 2). Bitwise agreement would need Sleef's algorithms ported.
"""

from __future__ import annotations

import math

import numpy as np


def _uniforms(rng: np.random.RandomState, n: int) -> np.ndarray:
    """n float32 uniforms in [0, 1) as torch's CPU generator makes them: (r & 0xffffff) * 2^-24, r a 32-bit draw."""
    raw = rng._bit_generator.random_raw(n).astype(np.uint32)  # MT19937's 32-bit outputs, in order
    return (raw & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)


def _box_muller(u: np.ndarray) -> np.ndarray:
    """Box-Muller on blocks of 16 uniforms (n, 16) -> (n, 16) normals, in float32 as ATen's ``normal_fill_16``."""
    u1 = np.float32(1.0) - u[:, :8]
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = np.float32(2.0 * math.pi) * u[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1)


class TorchCPUGenerator:
    """A stand-in for ``torch.Generator().manual_seed(seed)`` whose ``randn`` draws what ``torch.randn`` would,
    to within a few units in the last place of float32 (numpy's log, sin and cos where torch uses Sleef's)."""

    def __init__(self, seed: int):
        self.rng = np.random.RandomState(int(seed) & 0xFFFFFFFF)  # the reference MT19937 seeding, as torch's

    def randn(self, shape) -> np.ndarray:
        n = math.prod(shape)
        if n < 16:
            raise ValueError(f"noise of {n} values is drawn differently by torch; the runner needs 16 or more")
        u = _uniforms(self.rng, n)  # (n,): one draw per value, the last n % 16 of them unused
        x = _box_muller(u[: n - n % 16].reshape(-1, 16)).reshape(-1)
        if n % 16:  # torch redoes the last 16 values from 16 fresh uniforms
            x = np.concatenate([x[: n - 16], _box_muller(_uniforms(self.rng, 16).reshape(1, 16)).reshape(-1)])
        return x.reshape(shape).astype(np.float32, copy=False)
