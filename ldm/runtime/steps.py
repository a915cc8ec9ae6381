"""The sampler's per-step arithmetic, once, for torch tensors and numpy arrays alike.

Every step of ``ldm.samplers.sample`` is affine in the model output, the current sample, the step's
noise and (DPM++ 2M) the previous step's x0 estimate; ``ldm.web.coefficients.step_rows`` reads the
coefficients off the library's own step functions (float64). ``apply_step`` applies one row in float32,
as a fixed sequence of elementwise products and sums (each correctly rounded, no fused multiply-add),
so torch on the CPU and numpy give the same bits for the same inputs. The pipeline
(``Text2ImagePipeline.generate_latents``, every backend) and the torch-free runner (``ldm.runtime.runner``)
both sample through it, so their samplers cannot differ; the browser page applies the same rows.

    x0  = px * x + po * out          (clamped to [-clip, clip] when the model clips x0, then
    eps = ex * x + eo * out           eps = qx * x + q0 * x0)
    x   = ax * x + a0 * x0 + ae * eps + az * z + ap * x0_prev

Terms whose coefficient is 0 are left out (the same ones in every backend).
"""

from __future__ import annotations

import struct

# The order of the numbers in one step's row (``ldm.web.coefficients.FIELDS`` is this tuple).
FIELDS = ("t", "noise", "px", "po", "ex", "eo", "qx", "q0", "ax", "a0", "ae", "az", "ap")


def f32(c: float) -> float:
    """``c`` rounded to float32 (as a Python float): what a float32 tensor or array is multiplied by."""
    return struct.unpack("f", struct.pack("f", c))[0]


def _affine(terms):
    """sum of c * v over the terms with c != 0, left to right, each c rounded to float32 first."""
    out = None
    for c, v in terms:
        if c == 0 or v is None:
            continue
        term = v * f32(c)
        out = term if out is None else out + term
    return out


def apply_step(row, x, out, noise=None, x0_prev=None, clip_x0=None, clamp=None):
    """One sampler step: (x_next, x0_hat) from the sample ``x``, the model output ``out``, the step's
    ``noise`` (when ``row`` says the step draws it) and the previous step's x0 estimate (None at the first).
    ``row``: one ``step_rows`` row (``FIELDS``); ``clamp(a, lo, hi)``: torch.clamp or numpy.clip, for clip_x0."""
    r = dict(zip(FIELDS, row))
    x0 = _affine([(r["px"], x), (r["po"], out)])
    if clip_x0 is not None:
        x0 = clamp(x0, -clip_x0, clip_x0)
        eps = _affine([(r["qx"], x), (r["q0"], x0)])
    else:
        eps = _affine([(r["ex"], x), (r["eo"], out)])
    if r["noise"] and noise is None:
        raise ValueError("this step draws noise; give the step's noise")
    x_next = _affine([(r["ax"], x), (r["a0"], x0), (r["ae"], eps), (r["az"], noise), (r["ap"], x0_prev)])
    return x_next, x0
