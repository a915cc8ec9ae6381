"""LoRA files: ours (diffusers' layout) and kohya's (A1111, ComfyUI), read, written and merged into a U-Net.

A LoRA changes the weight W (out, in) of some U-Net modules by a low-rank update:

    W' = W + scale * (alpha / r) * B A          B = up (out, r), A = down (r, in); conv: (out, r, 1, 1), (r, in, kh, kw)

Two layouts are read (``read_lora``), and both are written:

* diffusers (ours): ``pytorch_lora_weights.safetensors`` with peft keys ``unet.<module>.lora_A.weight`` (A)
  and ``unet.<module>.lora_B.weight`` (B), the LoRA config (``unet.r``, ``unet.lora_alpha``, ...) as JSON
  in the ``lora_adapter_metadata`` entry of the file's metadata: what diffusers'
  ``StableDiffusionLoraLoaderMixin.save_lora_weights`` writes and ``load_lora_weights`` reads. A fine-tuned
  bundle keeps its LoRA so, at its top level (``save_lora``). Bundles made before kept it in
  ``unet_lora/pytorch_lora_weights.safetensors`` with the keys and the config unprefixed
  (``save_lora_adapter``); that is read too. Without a config, alpha = r (peft's convention: scale 1).
* kohya (sd-scripts; read by A1111, ComfyUI and diffusers): ``lora_unet_<module path, '.' -> '_'>.lora_down.weight``
  (A), ``.lora_up.weight`` (B) and ``.alpha`` (a scalar; absent: alpha = r). Module names are the diffusers
  U-Net's, so a key is matched to a module by spelling the model's own names that way (``save_kohya``
  writes them so).

Text-encoder updates (kohya ``lora_te_<module>``, diffusers ``text_encoder.<module>.lora_A/B.weight``: what
most LoRAs from model sites carry beside the U-Net's) apply to a transformers CLIP text encoder, the one a
Stable Diffusion 1.x/2.x folder or single file has, with module names as in ``CLIPTextModel``
(``text_model.encoder.layers.0.self_attn.q_proj``). SDXL's two text encoders (``lora_te1_``, ``lora_te2_``,
``text_encoder_2.``) are not supported.

``merge_loras`` adds every update of every LoRA, in the order given, into the U-Net's float32 weights:
exact (no adapter layers at run time) and as cheap as one matrix product per module. A LoRA made for
another model (a module it names is missing, or an update's shape is not the weight's) and a file in
no known layout are ``LoraError``s: one line naming the file, the first offending key and, for a shape,
both shapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

PathLike = Union[str, os.PathLike]
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
OLD_LORA_DIR = "unet_lora"  # bundles made before: unet_lora/pytorch_lora_weights.safetensors, unprefixed keys
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
UNET_PREFIX = "unet."
TEXT_PREFIX = "text_encoder."  # diffusers' keys of text-encoder updates
KOHYA_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIX = "lora_te_"
LAYOUTS = "diffusers (unet.<module>.lora_A/lora_B.weight) or kohya (lora_unet_<module>.lora_down/lora_up.weight, .alpha)"


class LoraError(ValueError):
    """A LoRA file that cannot be used: no LoRA in a known layout, or one made for another model."""


# -- naming a LoRA on the command line ---------------------------------------------------------


def parse_lora_spec(text: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE`` (``--lora``) -> (path, scale); the scale defaults to 1.0. A path that
    itself holds a colon is taken whole when it exists."""
    if not isinstance(text, str) or not text:
        raise LoraError(f"--lora {text!r}: give FILE or FILE:SCALE, e.g. style.safetensors:0.8")
    path, sep, scale = text.rpartition(":")
    if not sep or os.path.exists(text) or not path or "/" in scale or "\\" in scale:
        return Path(text), 1.0
    try:
        value = float(scale)
    except ValueError:
        raise LoraError(f"--lora {text}: scale {scale!r} is not a number; give FILE or FILE:SCALE, "
                        "e.g. style.safetensors:0.8") from None
    if not math.isfinite(value):
        raise LoraError(f"--lora {text}: scale {scale!r} must be a finite number, e.g. 0.8")
    return Path(path), value


def find_lora_file(path: PathLike) -> Path:
    """The LoRA file that ``path`` names: a .safetensors file, or a folder holding ``pytorch_lora_weights.safetensors``
    (a fine-tuned bundle, a diffusers LoRA folder) or ``unet_lora/`` (a bundle made before)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / LORA_FILE, path / OLD_LORA_DIR / LORA_FILE):
            if candidate.is_file():
                return candidate
        raise LoraError(f"LoRA folder {path} holds no {LORA_FILE} (nor {OLD_LORA_DIR}/{LORA_FILE}); give the LoRA "
                        "file, or a bundle written by ldm finetune with lora.method=lora")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraError(f"LoRA file {path} is not .safetensors; only safetensors LoRA files are read "
                        "(pickled checkpoints are never loaded)")
    return path


HASH_LENGTH = 16


def file_hash(path: PathLike, length: int = HASH_LENGTH) -> str:
    """sha256 of the file's bytes, as a short hex string (what a PNG record names a LoRA by)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModule:
    """One module's update: scale * (alpha / rank) * up @ down."""

    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    alpha: float
    key: str  # the file's key for ``down``, to name in messages

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """scale * (alpha / r) * B A, float32, shaped (out, in) or (out, in, kh, kw)."""
        up = self.up.float().reshape(self.up.shape[0], self.rank)  # (out, r)
        down = self.down.float().reshape(self.rank, -1)  # (r, in * kh * kw)
        # as peft's get_delta_weight: (B @ A) * scaling, scaling = scale * alpha / r
        return (up @ down).reshape(self.up.shape[0], *self.down.shape[1:]) * (scale * self.alpha / self.rank)


@dataclass
class Lora:
    """A LoRA file's updates: ``modules`` maps the module's name in the file's layout (diffusers: the U-Net
    module path; kohya: ``lora_unet_...``) to its update."""

    path: Path
    layout: str  # "diffusers" or "kohya"
    modules: dict[str, LoraModule]
    text_modules: dict[str, LoraModule] = field(default_factory=dict)  # the text encoder's, named as ``modules``
    hash: str = ""  # ``file_hash`` of the bytes read (``read_lora``: the file is read once for both)

    @property
    def every_module(self) -> list[LoraModule]:
        """The U-Net's updates and the text encoder's."""
        return [*self.modules.values(), *self.text_modules.values()]

    def kohya_state(self) -> dict[str, torch.Tensor]:
        """The kohya/A1111 state dict: ``lora_unet_<path with _>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``
        (and ``lora_te_...`` for the text encoder's)."""
        state = {}
        for prefix, modules in ((KOHYA_PREFIX, self.modules), (KOHYA_TEXT_PREFIX, self.text_modules)):
            for name, m in modules.items():
                base = name if self.layout == "kohya" else prefix + name.replace(".", "_")
                state[f"{base}.lora_down.weight"] = m.down.contiguous()
                state[f"{base}.lora_up.weight"] = m.up.contiguous()
                state[f"{base}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
        return state


def _not_a_lora(path: Path, why: str) -> LoraError:
    return LoraError(f"{path} is not a LoRA in a known layout ({why}); expected {LAYOUTS}")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The file's tensors, metadata and ``file_hash``, from one read of its bytes."""
    from safetensors.torch import load

    from ldm_io.weights import check_safetensors

    header = check_safetensors(path)  # truncated or not safetensors: one line naming the file
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:HASH_LENGTH]
    return load(data), dict(header.get("__metadata__") or {}), digest


def _peft_config(path: Path, metadata: dict[str, str], prefix: str = UNET_PREFIX) -> dict:
    """The LoRA config in the file's metadata of the part ``prefix`` names (the U-Net's, or the text encoder's),
    unprefixed; {} when there is none."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise _not_a_lora(path, f"its {METADATA_KEY} metadata is not JSON") from None
    if not isinstance(config, dict):
        raise _not_a_lora(path, f"its {METADATA_KEY} metadata is not a JSON object")
    if any(k.startswith((UNET_PREFIX, TEXT_PREFIX)) for k in config):
        config = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    elif prefix != UNET_PREFIX:
        return {}  # an unprefixed config is the U-Net's (an old bundle's)
    return config


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha pattern rule: the first pattern that matches the end of the module's name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _read_diffusers(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Lora:
    other = next((k for k in state if k.startswith("text_encoder_2.")), None)
    if other:
        raise LoraError(f"{path} holds LoRA weights for a second text encoder ({other}): an SDXL LoRA; "
                        "LoRAs for Stable Diffusion 1.x/2.x and our bundles are supported")
    text = {k: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    unet = {k: v for k, v in state.items() if not k.startswith(TEXT_PREFIX)}
    lora = _read_diffusers_part(path, unet, metadata, UNET_PREFIX) if unet else Lora(path, "diffusers", {})
    if text:
        lora.text_modules = _read_diffusers_part(path, text, metadata, TEXT_PREFIX).modules
    return lora


def _read_diffusers_part(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], part: str) -> Lora:
    """One part's updates (``part``: the U-Net's keys, or the text encoder's), named without the prefix."""
    keys = list(state)
    prefix = part if all(k.startswith(part) for k in keys) else ""  # unprefixed: an old bundle's U-Net
    state = {k[len(prefix):]: v for k, v in state.items()}
    config = _peft_config(path, metadata, part)
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in state):
        raise _not_a_lora(path, "a DoRA, whose magnitude vectors are not supported")
    alpha, patterns = config.get("lora_alpha"), config.get("alpha_pattern") or {}
    modules = {}
    for key in sorted(state):
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            up_key = f"{name}.lora_B.weight"
            if up_key not in state:
                raise _not_a_lora(path, f"{key} has no {up_key}")
            down, up = state[key], state[up_key]
            rank = int(down.shape[0])
            a = float(_pattern_value(patterns, name, alpha if alpha is not None else rank))
            if config.get("use_rslora"):
                a = a * rank / math.sqrt(rank)  # scaling alpha / sqrt(r), written as alpha' / r
            modules[name] = LoraModule(down, up, a, prefix + key)
        elif not key.endswith(".lora_B.weight"):
            raise _not_a_lora(path, f"key {prefix + key!r}")
    return Lora(path, "diffusers", modules)


def _read_kohya(path: Path, state: dict[str, torch.Tensor]) -> Lora:
    modules = {}
    for key in sorted(state):
        base, _, what = key.partition(".")
        if base.startswith(("lora_te1_", "lora_te2_")):
            raise LoraError(f"{path} holds LoRA weights for two text encoders ({key}): an SDXL LoRA; LoRAs for "
                            "Stable Diffusion 1.x/2.x and our bundles are supported")
        if not base.startswith((KOHYA_PREFIX, KOHYA_TEXT_PREFIX)):
            raise _not_a_lora(path, f"key {key!r}")
        if what == "lora_down.weight":
            up_key, alpha_key = f"{base}.lora_up.weight", f"{base}.alpha"
            if up_key not in state:
                raise _not_a_lora(path, f"{key} has no {up_key}")
            down = state[key]
            alpha = float(state[alpha_key].float().item()) if alpha_key in state else float(down.shape[0])
            modules[base] = LoraModule(down, state[up_key], alpha, key)
        elif what not in ("lora_up.weight", "alpha"):
            raise _not_a_lora(path, f"key {key!r}: LoCon/LyCORIS variants are not supported")
    return Lora(path, "kohya", {k: m for k, m in modules.items() if k.startswith(KOHYA_PREFIX)},
                {k: m for k, m in modules.items() if k.startswith(KOHYA_TEXT_PREFIX)})


def read_lora(path: PathLike) -> Lora:
    """The LoRA in ``path`` (a file or a folder, see ``find_lora_file``), in either layout."""
    path = find_lora_file(path)
    state, metadata, digest = _read_safetensors(path)
    if not state:
        raise _not_a_lora(path, "it holds no tensors")
    keys = list(state)
    if all(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        lora = _read_kohya(path, state)
    elif any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        lora = _read_diffusers(path, state, metadata)
    else:
        raise _not_a_lora(path, f"its first key is {keys[0]!r}")
    if not lora.modules and not lora.text_modules:
        raise _not_a_lora(path, "it has no down/A weights")
    lora.hash = digest
    for m in lora.every_module:
        ok = (m.down.is_floating_point() and m.up.is_floating_point() and m.down.dim() in (2, 4)
              and m.up.dim() == m.down.dim() and m.up.shape[1] == m.rank and m.rank >= 1)
        if not ok:
            raise _not_a_lora(path, f"{m.key} has shape {tuple(m.down.shape)} and its up/B weight "
                                    f"{tuple(m.up.shape)}; they must be (r, in) and (out, r)")
    return lora


# -- merging -----------------------------------------------------------------------------------


def _targets(lora: Lora, modules: dict[str, LoraModule], root: torch.nn.Module, kohya_prefix: str,
             what: str) -> dict[str, torch.nn.Module]:
    """The module of ``root`` (``what``: "U-Net" or "text encoder") each update applies to; a missing one is an
    error naming its key."""
    named = dict(root.named_modules())
    if lora.layout == "kohya":
        named = {kohya_prefix + name.replace(".", "_"): m for name, m in named.items() if name}
    targets = {}
    for name, m in modules.items():
        module = named.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise LoraError(f"LoRA {lora.path}: key {m.key} is for a module {name!r} that this model's {what} does not "
                            "have; the LoRA was made for another base model")
        targets[name] = module
    return targets


def _text_model(lora: Lora, text_encoder) -> torch.nn.Module:
    """The torch module of ``text_encoder`` that ``lora``'s text-encoder updates name (transformers' CLIPTextModel)."""
    first = next(iter(lora.text_modules.values())).key
    if text_encoder is None:
        raise LoraError(f"LoRA {lora.path} holds text-encoder weights ({first}) and no text encoder was given to merge "
                        "them into")
    if getattr(text_encoder, "backend", None) != "transformers":
        raise LoraError(f"LoRA {lora.path} holds text-encoder weights ({first}) for a transformers CLIP (Stable "
                        f"Diffusion's); this model's text encoder is {getattr(text_encoder, 'backend', 'another kind')}")
    return text_encoder.model


@torch.no_grad()
def merge_loras(unet: torch.nn.Module, loras: Sequence[tuple[Lora, float]], text_encoder=None) -> torch.nn.Module:
    """Add W += scale * (alpha / r) * B A for every module of every (lora, scale), in order, into ``unet``'s
    weights, and the text-encoder updates into ``text_encoder``'s (``conditioning`` text encoder, transformers
    CLIP), computed in float32 and stored in the weight's dtype. Every module and shape is checked before
    any weight changes, so a LoRA for another model leaves both as they were."""
    plans = []
    for lora, scale in loras:
        parts = [(lora.modules, unet, KOHYA_PREFIX, "U-Net")]
        if lora.text_modules:
            parts.append((lora.text_modules, _text_model(lora, text_encoder), KOHYA_TEXT_PREFIX, "text encoder"))
        for modules, root, kohya_prefix, what in parts:
            for name, module in _targets(lora, modules, root, kohya_prefix, what).items():
                m = modules[name]
                shape = (m.up.shape[0], *m.down.shape[1:])
                if tuple(module.weight.shape) != tuple(shape):
                    raise LoraError(f"LoRA {lora.path}: key {m.key} gives an update of shape {tuple(shape)} but the "
                                    f"{what}'s {name}.weight has shape {tuple(module.weight.shape)}; the LoRA was made "
                                    "for another base model")
                plans.append((module.weight, m, scale))
    for weight, m, scale in plans:
        delta = m.delta(scale).to(weight.device)
        weight.copy_((weight.float() + delta).to(weight.dtype))
    if text_encoder is not None and any(lora.text_modules for lora, _ in loras):
        text_encoder.clear_cache()  # encodings made before the merge are stale
    return unet


def read_loras(loras: Optional[Iterable]) -> list[tuple[Lora, float]]:
    """``[(file, scale) or file, ...]`` -> ``[(Lora, scale), ...]`` (the pipeline's ``loras=``); a ``Lora``
    already read may stand for its file."""
    out = []
    for item in loras or ():
        source, scale = (item, 1.0) if isinstance(item, (str, os.PathLike, Lora)) else item
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise LoraError(f"LoRA {getattr(source, 'path', source)}: scale {scale!r} must be a finite number")
        out.append((source if isinstance(source, Lora) else read_lora(source), float(scale)))
    return out


# -- writing -----------------------------------------------------------------------------------


class AdapterBase:
    """The base weights of a U-Net that carries a peft LoRA adapter (``add_adapter``), read from the module itself
    rather than from a copy (a second fp32 U-Net: 3.4 GB at SD-1.5 size): ``state_dict()`` is the module's own less
    the adapter's tensors, under the plain U-Net's names (peft's ``to_q.base_layer.weight`` -> ``to_q.weight``);
    ``save_pretrained`` writes them as a plain U-Net of the same config. The adapter never changes these weights,
    so they are the base's as loaded."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k.replace(".base_layer.", "."): v for k, v in self.unet.state_dict().items() if ".lora_" not in k}

    def save_pretrained(self, path: PathLike, **kwargs) -> None:
        plain = type(self.unet).from_config(self.unet.config)  # only where the base's own files cannot be copied
        plain.load_state_dict(self.state_dict())
        plain.save_pretrained(path, **kwargs)


def save_lora(folder: PathLike, unet_lora) -> Path:
    """Write the peft LoRA adapter that ``unet_lora`` carries (``add_adapter``) to ``folder/pytorch_lora_weights.safetensors``
    in diffusers' layout, with diffusers' own writer (``save_lora_weights``). ``folder`` is being
    built inside an atomic folder (``save_bundle``), so the file appears only with the finished bundle."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    names = list(getattr(unet_lora, "peft_config", {}))
    if len(names) != 1:
        raise ValueError(f"the U-Net carries {len(names)} LoRA adapters ({', '.join(names) or 'none'}); give one")
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet_lora, adapter_name=names[0]).items()}
    config = unet_lora.peft_config[names[0]].to_dict()
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=config)
    return Path(folder) / LORA_FILE


def save_kohya(lora: Lora, out: PathLike, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write ``lora`` in kohya's layout (what A1111 and ComfyUI read) to ``out``, atomically, with sd-scripts'
    metadata fields for the rank and alpha (and ``metadata``)."""
    from safetensors.torch import save_file

    from ldm_io import atomic_path

    ranks = sorted({m.rank for m in lora.every_module})
    alphas = sorted({m.alpha for m in lora.every_module})
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
                "ss_network_alpha": f"{alphas[-1]:g}", "ss_output_name": Path(out).stem, **(metadata or {})}
    with atomic_path(out) as tmp:
        save_file(lora.kohya_state(), str(tmp), metadata=metadata)
    return Path(out)
