"""Guidance methods as ``denoise`` wrappers: classifier-free guidance (Ho & Salimans 2022) and three variants.

    cfg:       out = out_uncond + w * (out_cond - out_uncond)

Each wrapper turns a conditional model ``model(x_t, t, context) -> output`` and two contexts (the empty or
negative prompt, and the prompt) into a ``denoise(x_t, t)`` with the sampler's signature, and makes ONE
batched model call on [uncond, cond] per step (or one half-size call where it needs one context only:
w = 1 is the conditional model alone for every method, w = 0 the unconditional one for cfg and interval).
A wrapper also takes one weight per row (``guidance`` a sequence of B numbers, for sweeps that batch several
weights): then every guided call is the batched one, and each row is what its own scalar w gives.
It always returns a tensor of x_t's shape, whatever w is.

The CFG combination is valid for eps, x0 and v outputs: all three are affine in the score at fixed
(x_t, t), so guiding any of them guides the score. The variants are not affine, so they name the
parameterisation they work in and convert with the schedule's abar at t (``ldm.schedule``):

* ``rescale:PHI`` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are Flawed",
  sec. 3.4): CFG, then the guided prediction rescaled to the conditional one's standard deviation (over
  every dimension but the batch) and mixed, phi * rescaled + (1 - phi) * cfg. On the v prediction.
* ``interval:LO-HI`` (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample
  and Distribution Quality"): CFG with weight w where the noise level sigma lies in (LO, HI], the
  conditional model alone (w = 1, one half-size call) elsewhere. sigma as k-diffusion and the paper
  use it, x_t / sqrt(abar) = x_0 + sigma eps (``NoiseSchedule.sigma``).
* ``apg[:eta=E,r=R,beta=B]`` (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High
  Guidance Scales in Diffusion Models", the authors' ``normalized_guidance``): on the x0 prediction.

``GuidanceMethod`` is the parsed form of a spec string (``parse_guidance_method``), used by the generate
CLI, the pipeline, sweeps and the PNG record; ``format_guidance_method`` writes it back canonically.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ldm.schedule import (
    NoiseSchedule, _broadcast, abar_from_sigma, eps_from_x0_at, split_prediction_at,
)

# model(x_t (B, C, H, W), t (B,), context (B, L, D)) -> output (B, C, H, W)
ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# w: one weight, or one per row of x_t
Weights = Union[float, Sequence[float], torch.Tensor]


def _check_weights(guidance) -> Union[float, tuple[float, ...]]:
    """A float for one weight, a tuple of floats for per-row weights; ValueError unless each is a number >= 0."""
    if isinstance(guidance, torch.Tensor) and guidance.dim() == 1:
        values = guidance.detach().cpu().tolist()
    elif isinstance(guidance, (list, tuple)):
        values = list(guidance)
    else:
        values = None
    for v in values if values is not None else [guidance]:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            raise ValueError(f"guidance={guidance!r} must be a number >= 0 (1 disables guidance) or a sequence of such")
    if values is None:
        return float(guidance)
    if not values:
        raise ValueError("guidance=[] has no weights; give a number >= 0 or one per row")
    return tuple(float(v) for v in values)


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
        guidance: the weight w >= 0 (1 = no guidance; Stable Diffusion's default is 7.5), or one weight per
            row of x_t (a sequence or 1-D tensor of B numbers; a sweep batching several weights together): then
            every call is the batched one, and a row of weight 1 gets the conditional output exactly.
    """

    def __init__(self, model: ConditionalModel, cond: torch.Tensor, uncond: torch.Tensor, guidance: Weights):
        guidance = _check_weights(guidance)
        if cond.shape[1:] != uncond.shape[1:]:
            raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} contexts differ in shape")
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.guidance = guidance  # a float, or a tuple of one float per row

    @property
    def per_row(self) -> bool:
        return isinstance(self.guidance, tuple)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x_t.shape[0]
        cond = _match_batch(self.cond, batch, "cond")
        uncond = _match_batch(self.uncond, batch, "uncond")
        if self.guidance == 1:
            return self.model(x_t, t, cond)
        if self.guidance == 0:
            return self.model(x_t, t, uncond)
        out_uncond, out_cond = self._both(x_t, t, cond, uncond)
        w = self._weight(x_t)
        return self._exact_rows(out_uncond + w * (out_cond - out_uncond), out_cond, w)

    def _weight(self, x: torch.Tensor) -> Union[float, torch.Tensor]:
        """w: the float, or the per-row weights as a (B, 1, ..., 1) tensor of x's dtype."""
        if not self.per_row:
            return self.guidance
        if len(self.guidance) != x.shape[0]:
            raise ValueError(f"guidance has {len(self.guidance)} weights but x_t has batch {x.shape[0]}; "
                             f"give one weight or {x.shape[0]}")
        return torch.tensor(self.guidance, dtype=x.dtype, device=x.device).view(-1, *[1] * (x.dim() - 1))

    @staticmethod
    def _exact_rows(out: torch.Tensor, out_cond: torch.Tensor, w: Union[float, torch.Tensor]) -> torch.Tensor:
        """Per-row weights: a row of weight 1 is the conditional output exactly, as a scalar w = 1 gives."""
        return torch.where(w == 1, out_cond, out) if isinstance(w, torch.Tensor) else out

    def _contexts(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _match_batch(self.cond, batch, "cond"), _match_batch(self.uncond, batch, "uncond")

    def _both(self, x_t, t, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """(out_uncond, out_cond) from one batched call on [uncond, cond]."""
        out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))  # (2B, ...)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond, out_cond


# -- conversions at a timestep t (long, or float32 fractional for euler/euler-a with Karras sigmas) -------

def _abar(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """abar at each row's t, float64 (B,): the table for integer t, log-sigma interpolation for fractional t."""
    if t.dtype.is_floating_point:
        return abar_from_sigma(schedule.sigma_at(t.detach().cpu().double()))
    return schedule.abar(t)


def _sigma(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """The noise level sigma = sqrt((1 - abar) / abar) at each row's t, float64 (B,)."""
    if t.dtype.is_floating_point:
        return schedule.sigma_at(t.detach().cpu().double())
    return schedule.sigma(t)


def _from_x0(x0: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The model output in ``prediction`` that gives x0 at (x_t, abar) (``split_prediction_at`` inverted)."""
    if prediction == "x0":
        return x0
    eps = eps_from_x0_at(x0, x_t, abar)
    if prediction == "eps":
        return eps
    return _broadcast(abar.sqrt(), x_t) * eps - _broadcast((1 - abar).sqrt(), x_t) * x0  # v


def _to_v(out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022) from a model output in ``prediction``."""
    if prediction == "v":
        return out
    x0, eps = split_prediction_at(out, x_t, abar, prediction)
    return _broadcast(abar.sqrt(), x_t) * eps - _broadcast((1 - abar).sqrt(), x_t) * x0


def _from_v(v: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    if prediction == "v":
        return v
    x0 = _broadcast(abar.sqrt(), x_t) * x_t - _broadcast((1 - abar).sqrt(), x_t) * v
    return _from_x0(x0, x_t, abar, prediction)


def _check_schedule(schedule, prediction: str, name: str) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"guidance method {name} needs the model's NoiseSchedule (schedule=...)")
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"prediction={prediction!r}; allowed: eps, x0, v")


def _per_sample(x: torch.Tensor) -> list[int]:
    return list(range(1, x.dim()))


class RescaledGuidance(ClassifierFreeGuidance):
    """CFG with rescale phi (Lin et al. 2023, sec. 3.4): with x the v prediction,

        x_cfg = x_uncond + w (x_cond - x_uncond)
        x_out = phi * x_cfg * std(x_cond) / std(x_cfg) + (1 - phi) * x_cfg

    std over every dimension but the batch (per sample), as diffusers' ``rescale_noise_cfg``.

    Which output: the v prediction, whatever the model predicts (eps and x0 models are converted to v
    and back with abar at t). The paper's models are trained with v prediction (its fix 2), so the formula
    as published acts on v; its aim is the over-exposed x0 that a high w gives, and matching the std of v
    rather than of eps keeps it a statement about the image (v is a unit-variance mix of x0 and eps at every
    t, dominated by -x0 at low noise, where eps's std says nothing about the image). ComfyUI's RescaleCFG
    likewise converts every model's output to a v-style prediction before rescaling. For a v-prediction
    model this is exactly diffusers' ``rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=phi)``
    on the model's outputs (a diffusers pipeline applies that function to whatever its model outputs, eps for
    SD 1.x, so for eps models the two differ). phi = 0 is plain CFG (the same arithmetic); the paper uses 0.7.
    """

    def __init__(self, model: ConditionalModel, cond: torch.Tensor, uncond: torch.Tensor, guidance: Weights, *,
                 phi: float, schedule: NoiseSchedule, prediction: str = "eps"):
        super().__init__(model, cond, uncond, guidance)
        _check_schedule(schedule, prediction, "rescale")
        _check_param("rescale", "phi", phi)
        self.phi, self.schedule, self.prediction = float(phi), schedule, prediction

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.phi == 0 or self.guidance == 1:  # (a tuple of per-row weights is never == 1)
            return super().__call__(x_t, t)
        cond, uncond = self._contexts(x_t.shape[0])
        out_uncond, out_cond = self._both(x_t, t, cond, uncond)
        abar = _abar(self.schedule, t)
        v_uncond, v_cond = _to_v(out_uncond, x_t, abar, self.prediction), _to_v(out_cond, x_t, abar, self.prediction)
        w = self._weight(x_t)
        v_cfg = v_uncond + w * (v_cond - v_uncond)
        dims = _per_sample(v_cfg)
        std_cond, std_cfg = v_cond.std(dim=dims, keepdim=True), v_cfg.std(dim=dims, keepdim=True)
        ratio = torch.where(std_cfg > 0, std_cond / std_cfg, torch.ones_like(std_cfg))  # a constant x_cfg stays
        v = self.phi * (v_cfg * ratio) + (1 - self.phi) * v_cfg
        return self._exact_rows(_from_v(v, x_t, abar, self.prediction), out_cond, w)


class IntervalGuidance(ClassifierFreeGuidance):
    """CFG with weight w only at noise levels sigma in (sigma_lo, sigma_hi] (Kynkaanniemi et al. 2024),
    the conditional model alone (w = 1) elsewhere.

    The interval is given in sigma, as in the paper: sigma = sqrt((1 - abar_t) / abar_t), the noise level of
    x_t / sqrt(abar_t) = x_0 + sigma eps (k-diffusion's and EDM's sigma; ``NoiseSchedule.sigma``, and for a
    fractional t its log-sigma interpolation). A step inside makes the one batched call of CFG (and is CFG
    exactly); a step outside makes one half-size call on the prompt alone. sigma_hi may be inf; (0, inf]
    covers every step.
    """

    def __init__(self, model: ConditionalModel, cond: torch.Tensor, uncond: torch.Tensor, guidance: Weights, *,
                 sigma_lo: float, sigma_hi: float, schedule: NoiseSchedule, prediction: str = "eps"):
        super().__init__(model, cond, uncond, guidance)
        _check_schedule(schedule, prediction, "interval")
        _check_interval(sigma_lo, sigma_hi)
        self.sigma_lo, self.sigma_hi, self.schedule = float(sigma_lo), float(sigma_hi), schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = _sigma(self.schedule, t)  # (B,)
        inside = (sigma > self.sigma_lo) & (sigma <= self.sigma_hi)
        if bool(inside.all()):
            return super().__call__(x_t, t)
        cond, uncond = self._contexts(x_t.shape[0])
        if not bool(inside.any()):
            return self.model(x_t, t, cond)
        out_uncond, out_cond = self._both(x_t, t, cond, uncond)  # rows on both sides (t differs across rows)
        w = self._weight(x_t)
        guided = self._exact_rows(out_uncond + w * (out_cond - out_uncond), out_cond, w)
        return torch.where(inside.to(x_t.device).view(-1, *[1] * (x_t.dim() - 1)), guided, out_cond)


class AdaptiveProjectedGuidance(ClassifierFreeGuidance):
    """Adaptive projected guidance (Sadat et al. 2024), following the authors' ``normalized_guidance``, on the
    x0 (denoised) prediction D:

        diff    = D_cond - D_uncond
        m       = diff + beta * m          (momentum: a running average, beta < 0 in the paper; m = 0 at the start)
        diff    = m * min(1, r / ||m||)    (norm threshold; ||.|| over every dimension but the batch)
        par     = <diff, D_cond> / ||D_cond||^2 * D_cond,   orth = diff - par    (float64)
        D_out   = D_cond + (w - 1) * (orth + eta * par)

    The model's output is converted to x0 and the result back with abar at t (``ldm.schedule``). eta = 0 drops
    the part parallel to D_cond (the paper's main source of over-saturation), r = inf turns the threshold off,
    beta = 0 the momentum; with all three (eta=1, r=inf, beta=0) this is CFG, and the wrapper then computes CFG
    with CFG's arithmetic (exactly). The momentum state belongs to one sampling run: it starts at zero and is
    reset by ``reset()``, and by itself when a call's t is above the previous call's (a new run starts at the
    highest noise) or the batch shape changes. Make one wrapper per run where runs may share a t.
    """

    def __init__(self, model: ConditionalModel, cond: torch.Tensor, uncond: torch.Tensor, guidance: Weights, *,
                 eta: float = 0.0, r: float = 15.0, beta: float = -0.5, schedule: NoiseSchedule,
                 prediction: str = "eps"):
        super().__init__(model, cond, uncond, guidance)
        _check_schedule(schedule, prediction, "apg")
        for key, value in (("eta", eta), ("r", r), ("beta", beta)):
            _check_param("apg", key, value)
        self.eta, self.r, self.beta = float(eta), float(r), float(beta)
        self.schedule, self.prediction = schedule, prediction
        self.reset()

    def reset(self) -> None:
        """Start a new sampling run: the momentum's running average back to zero."""
        self._average: Optional[torch.Tensor] = None
        self._last_t: Optional[float] = None

    @property
    def is_cfg(self) -> bool:
        return self.eta == 1 and self.beta == 0 and self.r == math.inf

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_now = float(t.max())
        if self._last_t is not None and (t_now > self._last_t or (
                self._average is not None and self._average.shape != x_t.shape)):
            self.reset()
        self._last_t = t_now
        if self.guidance == 1 or self.is_cfg:
            return super().__call__(x_t, t)
        cond, uncond = self._contexts(x_t.shape[0])
        out_uncond, out_cond = self._both(x_t, t, cond, uncond)
        abar = _abar(self.schedule, t)
        x0_uncond = split_prediction_at(out_uncond, x_t, abar, self.prediction)[0]
        x0_cond = split_prediction_at(out_cond, x_t, abar, self.prediction)[0]
        diff = x0_cond - x0_uncond
        dims = _per_sample(diff)
        if self.beta != 0:
            self._average = diff if self._average is None else diff + self.beta * self._average
            diff = self._average
        if self.r < math.inf:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(norm), self.r / norm)
        v0, v1 = diff.double(), torch.nn.functional.normalize(x0_cond.double(), dim=dims)
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        orthogonal = v0 - parallel
        update = (orthogonal + self.eta * parallel).to(diff.dtype)
        w = self._weight(x_t)
        x0 = x0_cond + (w - 1) * update
        return self._exact_rows(_from_x0(x0, x_t, abar, self.prediction), out_cond, w)


# -- method specs ------------------------------------------------------------------------------------

# name -> its parameters, in the order the spec writes them, and their defaults (None: must be given)
METHODS: dict[str, dict[str, Optional[float]]] = {
    "cfg": {},
    "rescale": {"phi": 0.7},
    "interval": {"sigma_lo": None, "sigma_hi": None},
    "apg": {"eta": 0.0, "r": 15.0, "beta": -0.5},
}
SPEC_FORMS = ("cfg, rescale[:PHI] (0 <= PHI <= 1, default 0.7), interval:LO-HI (noise levels sigma, "
              "0 <= LO < HI, HI may be inf), apg[:eta=E,r=R,beta=B] (0 <= E <= 1, R > 0 or inf, -1 < B < 1; "
              "default eta=0,r=15,beta=-0.5)")
_NUMBER = r"(?:inf|\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)"
_INTERVAL = re.compile(rf"({_NUMBER})-({_NUMBER})", re.IGNORECASE)


def _check_param(method: str, key: str, value) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = {"phi": 0 <= value <= 1, "eta": 0 <= value <= 1, "r": value > 0,
              "beta": -1 < value < 1}.get(key, True)
    if not ok:
        raise ValueError(f"guidance method {method}: {key}={value!r} is out of range; allowed: {SPEC_FORMS}")


def _check_interval(lo, hi) -> None:
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"guidance method interval: bounds {lo!r}-{hi!r} must be numbers; allowed: {SPEC_FORMS}")
    if not (0 <= lo < hi and lo < math.inf):
        raise ValueError(f"guidance method interval:{_num(lo)}-{_num(hi)} needs 0 <= LO < HI; allowed: {SPEC_FORMS}")


def _num(x: float) -> str:
    """A float as the shortest text that reads back as the same float: 0.7, 15, -0.5, inf."""
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


@dataclass(frozen=True)
class GuidanceMethod:
    """A guidance method and its parameters: ``name`` in ``METHODS``, ``params`` ((key, value), ...) in
    ``METHODS[name]``'s order, every one given. Make it with ``parse_guidance_method``; ``str()`` is the
    canonical spec (``format_guidance_method``)."""

    name: str = "cfg"
    params: tuple[tuple[str, float], ...] = ()

    @property
    def kwargs(self) -> dict[str, float]:
        return dict(self.params)

    def __str__(self) -> str:
        return format_guidance_method(self)


CFG = GuidanceMethod()


def format_guidance_method(method: GuidanceMethod) -> str:
    """The canonical spec: ``cfg``, ``rescale:0.7``, ``interval:0.3-14.6``, ``apg:eta=0,r=15,beta=-0.5``;
    ``parse_guidance_method`` reads it back to an equal ``GuidanceMethod``."""
    p = method.kwargs
    if method.name == "cfg":
        return "cfg"
    if method.name == "rescale":
        return f"rescale:{_num(p['phi'])}"
    if method.name == "interval":
        return f"interval:{_num(p['sigma_lo'])}-{_num(p['sigma_hi'])}"
    return f"{method.name}:" + ",".join(f"{k}={_num(v)}" for k, v in method.params)


def _float(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"guidance method {spec!r}: {text!r} is not a number; allowed: {SPEC_FORMS}") from None


def parse_guidance_method(spec: Union[str, GuidanceMethod, None]) -> GuidanceMethod:
    """A spec string (or a ``GuidanceMethod``, checked; None = cfg) -> ``GuidanceMethod``; a ValueError names the
    allowed forms (``SPEC_FORMS``) otherwise."""
    if spec is None:
        return CFG
    if isinstance(spec, GuidanceMethod):
        try:
            spec = format_guidance_method(spec) if spec.name in METHODS else spec.name
        except KeyError as exc:
            raise ValueError(f"guidance method {spec.name} lacks its parameter {exc}; allowed: {SPEC_FORMS}") from None
    if not isinstance(spec, str):
        raise ValueError(f"guidance method {spec!r} is not a string; allowed: {SPEC_FORMS}")
    name, sep, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise ValueError(f"guidance method {spec!r} is unknown; allowed: {SPEC_FORMS}")
    defaults, rest = METHODS[name], rest.strip()
    if sep and not rest or name == "cfg" and sep:
        raise ValueError(f"guidance method {spec!r}: " + ("cfg takes no parameters" if name == "cfg" else
                         "nothing after ':'") + f"; allowed: {SPEC_FORMS}")
    values = {k: v for k, v in defaults.items()}
    if name == "rescale" and rest:
        values["phi"] = _float(rest, spec)
    elif name == "interval":
        m = _INTERVAL.fullmatch(rest.replace(" ", ""))
        if m is None:
            raise ValueError(f"guidance method {spec!r}: give the interval as interval:LO-HI, e.g. interval:0.3-14.6; "
                             f"allowed: {SPEC_FORMS}")
        values["sigma_lo"], values["sigma_hi"] = float(m.group(1)), float(m.group(2))
        _check_interval(values["sigma_lo"], values["sigma_hi"])
    elif name == "apg" and rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            if not eq or key not in defaults:
                raise ValueError(f"guidance method {spec!r}: {item.strip()!r} is not KEY=VALUE with KEY one of "
                                 f"{', '.join(defaults)}; allowed: {SPEC_FORMS}")
            values[key] = _float(value.strip(), spec)
    for key, value in values.items():
        if name != "interval":
            _check_param(name, key, value)
    return GuidanceMethod(name, tuple((k, float(v)) for k, v in values.items()))


def parse_guidance_methods(text: str) -> list[GuidanceMethod]:
    """A comma-separated list of specs (a sweep's ``--guidance-method``): ``cfg,rescale:0.7,apg:eta=0,r=15``.
    A piece of the form KEY=VALUE continues the apg spec before it, so apg's own commas need no quoting."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"guidance methods {text!r}: give one or more, separated by commas; allowed: {SPEC_FORMS}")
    specs: list[str] = []
    for piece in text.split(","):
        if "=" in piece and ":" not in piece and specs:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return [parse_guidance_method(s) for s in specs]


def make_guidance(method: Union[str, GuidanceMethod, None], model: ConditionalModel, cond: torch.Tensor,
                  uncond: torch.Tensor, guidance: Weights, *, schedule: Optional[NoiseSchedule] = None,
                  prediction: str = "eps") -> ClassifierFreeGuidance:
    """The ``denoise(x_t, t)`` of ``method`` (a spec or ``GuidanceMethod``) with weight w = ``guidance``;
    ``schedule`` and ``prediction`` (the model's) are needed by every method but cfg. Make one per sampling run."""
    m = parse_guidance_method(method)
    if m.name == "cfg":
        return ClassifierFreeGuidance(model, cond, uncond, guidance)
    kinds = {"rescale": RescaledGuidance, "interval": IntervalGuidance, "apg": AdaptiveProjectedGuidance}
    return kinds[m.name](model, cond, uncond, guidance, schedule=schedule, prediction=prediction, **m.kwargs)
