"""Stable Diffusion 1.x/2.x single-file checkpoints, in the original LDM/CompVis key layout, in and out.

    bundle = cached_bundle("model.safetensors")         # converted once, then a diffusers-layout bundle
    export_single_file("path/to/bundle", "out.safetensors")

A single file holds three state dicts under prefixes: ``model.diffusion_model.*`` (the U-Net),
``first_stage_model.*`` (the KL autoencoder) and the text encoder, either OpenAI's CLIP ViT-L/14 as
transformers stores it, ``cond_stage_model.transformer.text_model.*`` (SD 1.x), or OpenCLIP ViT-H/14,
``cond_stage_model.model.*`` (SD 2.x). It holds no config: what diffusers' ``from_single_file``
fetches from the hub is derived here from the tensors' shapes (``derive_configs``), nothing is fetched:

* U-Net: in/out channels, block widths, resnets per block, which blocks cross-attend, the context
  width, linear or 1x1-conv transformer projections. Attention heads follow the SD version (SD 1: 8
  heads in every block; SD 2: 64 channels per head), GroupNorm uses 32 groups, and the image size
  is 512 px (SD 1) or 768 px (SD 2), as in the original configs (v1-inference.yaml, v2-inference-v.yaml).
* Autoencoder: widths, resnets per block, latent channels, whether quant convs and the mid attention
  are there; scaling factor 0.18215 and 32 groups (SD's first_stage_config).
* Text encoder: width, layers, MLP width, vocabulary and positions; 64 channels per head; quick_gelu
  (OpenAI CLIP) or gelu (OpenCLIP). SD 2 reads the penultimate layer of OpenCLIP, so its last block
  is dropped, as diffusers does (its SD 2 text encoder has 23 of the 24 layers).
* Tokenizer: CLIP's BPE (``conditioning.bpe``: the vocabulary open_clip ships, which is OpenAI's),
  padded with ``<|endoftext|>`` (SD 1) or ``!`` (SD 2), 77 tokens.
* Scheduler: SD's scaled_linear betas 0.00085..0.012 over 1000 steps; epsilon prediction for SD 1. SD 2
  came as v-prediction (the 768-px 2.0 and 2.1) and epsilon (the 512-px "base" models) with the same shapes;
  diffusers' from_single_file takes v unless the file's ``global_step`` is the base's (a .ckpt field that
  safetensors files lack), so it reads the base models wrong. Here ``convert`` asks the U-Net instead, as A1111
  does (``predicts_v``): at t = 999 on a constant input, a v-model's output lies far below its input.

What the shapes cannot say and a file of ours needs (a tiny test model's head count, group count,
scaling factor, schedule) is written by ``export_single_file`` into the file's safetensors metadata
(``METADATA_KEY``: a JSON object of those fields only) and read back here; other tools ignore it.

A file is converted once into a bundle in diffusers' layout under the cache
(``$LDM_CACHE/single_file/<sha256>`` or ``~/.cache/ldm-toolkit/single_file/...``), keyed by the file's
content, and from then on loads as a bundle does: its configs are read without loading weights
(sizes, memory checks), its ONNX graphs are cached beside it, fine-tuning reads it like any folder.
The weights are the file's tensors, renamed (diffusers' own converters,
``diffusers.loaders.single_file_utils``), so a model loaded from the file computes exactly what
the folder it was exported from computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

PathLike = Union[str, os.PathLike]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1: transformers' CLIPTextModel keys (text_model.*)
OPEN_CLIP = "cond_stage_model.model."  # SD 2: open_clip's text tower
METADATA_KEY = "ldm_toolkit.configs"  # safetensors metadata: the config fields shapes cannot give (JSON)

SD_IMAGE_SIZE = {"sd1": 512, "sd2": 768}
SD_SCALING_FACTOR = 0.18215
SD_NORM_GROUPS = 32
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading", "steps_offset": 1,
                "clip_sample": False, "set_alpha_to_one": False}
HEAD_CHANNELS = 64  # channels per attention head: SD 2's U-Net, and both CLIP text towers
SD1_HEADS = 8  # SD 1's U-Net: 8 heads in every block
BYTE_TOKENS = 512  # CLIP's vocabulary: 256 byte symbols, the same with </w>, ...
SPECIAL_TOKENS = 2  # ... the merges, then <|startoftext|>, <|endoftext|>

# The fields of each part's config that METADATA_KEY may carry, with their JSON types.
METADATA_FIELDS = {
    "unet": {"attention_head_dim": (int, list), "norm_num_groups": int, "sample_size": int},
    "vae": {"norm_num_groups": int, "scaling_factor": (int, float), "sample_size": int},
    "text_encoder": {"num_attention_heads": int},
    "scheduler": {"num_train_timesteps": int, "beta_schedule": str, "beta_start": (int, float), "beta_end": (int, float),
                  "prediction_type": str, "timestep_spacing": str, "steps_offset": int, "clip_sample": bool,
                  "clip_sample_range": (int, float), "set_alpha_to_one": bool},
}

EXPECTED = (f"a Stable Diffusion 1.x/2.x single file in the original layout ({UNET}*, {VAE}* and "
            f"{CLIP}* or {OPEN_CLIP}*)")


class SingleFileError(ValueError):
    """A file that is not an SD 1.x/2.x single-file checkpoint, or a bundle that cannot be written as one."""


# -- reading the header --------------------------------------------------------------------------------------


@dataclass
class Header:
    """What a single file's header says, without reading any tensor."""

    path: Path
    shapes: dict[str, tuple[int, ...]]  # key -> shape
    metadata: dict[str, str]  # safetensors __metadata__

    @property
    def version(self) -> str:
        """"sd1" (OpenAI CLIP text encoder) or "sd2" (OpenCLIP)."""
        return "sd2" if any(k.startswith(OPEN_CLIP) for k in self.shapes) else "sd1"


def read_header(path: PathLike) -> Header:
    """The header of ``path``, after checking that it is a whole safetensors file in the SD 1.x/2.x layout;
    anything else (another format, a truncated file, a LoRA, SDXL, an unknown layout) is a one-line
    ``SingleFileError`` saying what was expected."""
    from ldm_io.weights import check_safetensors

    path = Path(path)
    if not path.is_file():
        raise SingleFileError(f"{path} does not exist; give --model a bundle folder or {EXPECTED}")
    if path.suffix.lower() != ".safetensors":
        raise SingleFileError(f"{path} is not a .safetensors file; --model FILE reads {EXPECTED} (pickled .ckpt "
                              "files are never loaded: convert a trusted copy to safetensors)")
    check_safetensors(path)  # truncated or corrupt: one line naming the file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    header = Header(path, shapes, metadata)
    _check_layout(header)
    return header


def _check_layout(h: Header) -> None:
    keys = list(h.shapes)
    lora = [k for k in keys if re.search(r"(^lora_(unet|te\d?)_)|(\.lora_(down|up|A|B)\.)|(\.alpha$)", k)]
    if lora:
        raise SingleFileError(f"{h.path} is a LoRA file ({len(lora)} LoRA tensors, e.g. {lora[0]}), not a checkpoint; "
                              f"give --model {EXPECTED}, and the LoRA with --lora")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise SingleFileError(f"{h.path} is an SDXL checkpoint (conditioner.embedders.*); only {EXPECTED} is supported")
    missing = [p for p in (UNET, VAE) if not any(k.startswith(p) for k in keys)]
    if not any(k.startswith(CLIP) or k.startswith(OPEN_CLIP) for k in keys):
        missing.append(f"{CLIP} or {OPEN_CLIP}")
    if missing:
        sample = ", ".join(keys[:3]) if keys else "no tensors at all"
        raise SingleFileError(f"{h.path} has no {' and no '.join(p + '*' for p in missing)} tensors (it holds "
                              f"{sample}{', ...' if len(keys) > 3 else ''}); expected {EXPECTED}")


# -- deriving the configs from the shapes ------------------------------------------------------------------------


@dataclass
class SingleFileConfigs:
    """The diffusers/transformers configs of a single file's parts, and how its tokenizer is written."""

    version: str  # "sd1" or "sd2"
    unet: dict  # UNet2DConditionModel kwargs
    vae: dict  # AutoencoderKL kwargs
    text_encoder: dict  # CLIPTextConfig kwargs
    scheduler: dict  # a diffusers scheduler config
    num_merges: Optional[int]  # the tokenizer's BPE merges (None: all of CLIP's)
    pad_token: str
    prediction_given: bool = False  # the file's metadata names the prediction type (else SD 2's is probed)


def _indices(shapes: dict, prefix: str) -> list[int]:
    """The sorted integers i of keys ``prefix + "<i>." ...``."""
    found = {int(m.group(1)) for k in shapes if k.startswith(prefix) and (m := re.match(r"(\d+)\.", k[len(prefix):]))}
    return sorted(found)


def _need(shapes: dict, key: str, path: Path) -> tuple[int, ...]:
    if key not in shapes:
        raise SingleFileError(f"{path} lacks {key}; expected {EXPECTED}")
    return shapes[key]


def _metadata(h: Header) -> dict:
    """METADATA_KEY's fields, checked against METADATA_FIELDS; absent: {}."""
    text = h.metadata.get(METADATA_KEY)
    if text is None:
        return {}
    bad = f"{h.path}: its {METADATA_KEY} metadata"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SingleFileError(f"{bad} is not JSON ({exc}); remove it or export the file again") from None
    if not isinstance(data, dict) or set(data) - set(METADATA_FIELDS):
        raise SingleFileError(f"{bad} must be an object with parts among {', '.join(METADATA_FIELDS)}")
    for part, fields in data.items():
        if not isinstance(fields, dict):
            raise SingleFileError(f"{bad}: {part} must be an object")
        for name, value in fields.items():
            kind = METADATA_FIELDS[part].get(name)
            if kind is None or isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
                raise SingleFileError(f"{bad}: {part}.{name}={value!r} is not an allowed field of that type "
                                      f"(allowed: {', '.join(METADATA_FIELDS[part])})")
    return data


def _unet_config(h: Header, version: str, image_size: int, vae_factor: int, meta: dict) -> dict:
    s, p = h.shapes, h.path
    model_channels, in_channels = _need(s, UNET + "input_blocks.0.0.weight", p)[:2]
    out_channels = _need(s, UNET + "out.2.weight", p)[0]
    if any(k.startswith(UNET + "label_emb") for k in s):
        raise SingleFileError(f"{p} has a class-conditioned U-Net (label_emb.*); expected {EXPECTED}")
    if in_channels != out_channels:
        raise SingleFileError(f"{p}: the U-Net takes {in_channels} channels and gives {out_channels} (an inpainting "
                              "or other image-conditioned model); only text-to-image models are supported")
    inputs = _indices(s, UNET + "input_blocks.")
    down = [i for i in inputs if UNET + f"input_blocks.{i}.0.op.weight" in s]
    levels = len(down) + 1
    layers, rest = divmod(len(inputs) - 1 - len(down), levels)
    if rest or layers < 1 or down != [(layers + 1) * (i + 1) for i in range(levels - 1)]:
        raise SingleFileError(f"{p}: the U-Net's input_blocks ({len(inputs)}, downsampling at {down}) are not "
                              f"levels of equal depth; expected {EXPECTED}")

    def attends(block: str) -> bool:
        return UNET + f"{block}.1.transformer_blocks.0.attn2.to_k.weight" in s

    channels, down_types, depth, context, linear = [], [], [], None, None
    for i in range(levels):
        blocks = [f"input_blocks.{(layers + 1) * i + j + 1}" for j in range(layers)]
        channels.append(_need(s, UNET + blocks[0] + ".0.out_layers.3.weight", p)[0])
        att = [attends(b) for b in blocks]
        if len(set(att)) > 1:
            raise SingleFileError(f"{p}: U-Net level {i} has attention in some blocks only; expected {EXPECTED}")
        down_types.append("CrossAttnDownBlock2D" if att[0] else "DownBlock2D")
        if att[0]:
            depth.append(len(_indices(s, UNET + blocks[0] + ".1.transformer_blocks.")))
            context = s[UNET + blocks[0] + ".1.transformer_blocks.0.attn2.to_k.weight"][1]
            linear = len(s[UNET + blocks[0] + ".1.proj_in.weight"]) == 2
        else:
            depth.append(1)
    up_types = []
    for i in range(levels):
        att = {attends(f"output_blocks.{(layers + 1) * i + j}") for j in range(layers + 1)}
        if len(att) > 1:
            raise SingleFileError(f"{p}: U-Net output level {i} has attention in some blocks only; expected {EXPECTED}")
        up_types.append("CrossAttnUpBlock2D" if att.pop() else "UpBlock2D")
    if context is None or not attends("middle_block"):
        raise SingleFileError(f"{p}: the U-Net has no cross-attention (in its blocks and its middle block); "
                              f"expected {EXPECTED}")
    if version == "sd2":
        heads = [c // HEAD_CHANNELS for c in channels]  # num_head_channels: 64 (v2-inference*.yaml)
    else:
        heads = SD1_HEADS  # num_heads: 8 (v1-inference.yaml)
    config = {
        "sample_size": image_size // vae_factor, "in_channels": in_channels, "out_channels": out_channels,
        "down_block_types": down_types, "up_block_types": up_types, "block_out_channels": channels,
        "layers_per_block": layers, "cross_attention_dim": context, "attention_head_dim": heads,
        "use_linear_projection": bool(linear), "norm_num_groups": SD_NORM_GROUPS,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
    }
    config.update(meta.get("unet", {}))
    return config


def _vae_config(h: Header, image_size: int, meta: dict) -> dict:
    s, p = h.shapes, h.path
    in_channels = _need(s, VAE + "encoder.conv_in.weight", p)[1]
    levels = _indices(s, VAE + "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise SingleFileError(f"{p} has no encoder.down.<i> blocks under {VAE}; expected {EXPECTED}")
    channels = [_need(s, VAE + f"encoder.down.{i}.block.0.conv2.weight", p)[0] for i in levels]
    layers = len(_indices(s, VAE + "encoder.down.0.block."))
    config = {
        "in_channels": in_channels, "out_channels": _need(s, VAE + "decoder.conv_out.weight", p)[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels), "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels, "layers_per_block": layers,
        "latent_channels": _need(s, VAE + "decoder.conv_in.weight", p)[1], "norm_num_groups": SD_NORM_GROUPS,
        "sample_size": image_size, "scaling_factor": SD_SCALING_FACTOR,
        "use_quant_conv": VAE + "quant_conv.weight" in s, "use_post_quant_conv": VAE + "post_quant_conv.weight" in s,
        "mid_block_add_attention": VAE + "encoder.mid.attn_1.q.weight" in s,
    }
    config.update(meta.get("vae", {}))
    return config


def _text_config(h: Header, version: str, meta: dict) -> tuple[dict, Optional[int]]:
    """CLIPTextConfig kwargs and the tokenizer's number of merges."""
    s, p = h.shapes, h.path
    if version == "sd2":
        vocab, width = _need(s, OPEN_CLIP + "token_embedding.weight", p)
        positions = _need(s, OPEN_CLIP + "positional_embedding", p)[0]
        blocks = _indices(s, OPEN_CLIP + "transformer.resblocks.")
        if len(blocks) < 2:
            raise SingleFileError(f"{p}: the OpenCLIP text encoder has {len(blocks)} layer(s); SD 2 reads the "
                                  "penultimate layer, so it needs at least 2")
        layers = len(blocks) - 1  # the penultimate layer's output, then ln_final (FrozenOpenCLIPEmbedder)
        mlp = _need(s, OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight", p)[0]
        act = "gelu"
    else:
        text = CLIP + ("text_model." if any(k.startswith(CLIP + "text_model.") for k in s) else "")
        vocab, width = _need(s, text + "embeddings.token_embedding.weight", p)
        positions = _need(s, text + "embeddings.position_embedding.weight", p)[0]
        layers = len(_indices(s, text + "encoder.layers."))
        mlp = _need(s, text + "encoder.layers.0.mlp.fc1.weight", p)[0]
        act = "quick_gelu"
    full = BYTE_TOKENS + SPECIAL_TOKENS
    from conditioning.bpe import FULL_NUM_MERGES

    if not full <= vocab <= full + FULL_NUM_MERGES:
        raise SingleFileError(f"{p}: the text encoder has {vocab} token embeddings; CLIP's tokenizer has "
                              f"{full + FULL_NUM_MERGES} (embeddings added for new words cannot be read from a single file)")
    num_merges = None if vocab == full + FULL_NUM_MERGES else vocab - full
    config = {"vocab_size": vocab, "hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers,
              "num_attention_heads": max(1, width // HEAD_CHANNELS), "max_position_embeddings": positions,
              "hidden_act": act, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1}
    config.update(meta.get("text_encoder", {}))
    return config, num_merges


def derive_configs(header: Header) -> SingleFileConfigs:
    """Every part's config from the tensors' shapes, the SD version's conventions, and METADATA_KEY."""
    meta = _metadata(header)
    version = header.version
    image_size = SD_IMAGE_SIZE[version]
    vae = _vae_config(header, image_size, meta)
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    unet = _unet_config(header, version, image_size, factor, meta)
    text, num_merges = _text_config(header, version, meta)
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise SingleFileError(f"{header.path}: the U-Net attends to {unet['cross_attention_dim']}-wide contexts but the "
                              f"text encoder is {text['hidden_size']} wide; expected {EXPECTED}")
    scheduler = {**SD_SCHEDULER, "prediction_type": "v_prediction" if version == "sd2" else "epsilon",
                 **meta.get("scheduler", {})}
    return SingleFileConfigs(version, unet, vae, text, scheduler, num_merges, "!" if version == "sd2" else "<|endoftext|>",
                             prediction_given="prediction_type" in meta.get("scheduler", {}))


def predicts_v(unet) -> bool:
    """Whether an SD 2 U-Net predicts v rather than the noise: A1111's test (``is_using_v_parameterization_for_sd2``
    in its modules/sd_models_config.py). On a constant input of 0.5 at t = 999 (x_t is almost all noise there),
    with a constant context, an eps-model returns about its input, while a v-model (v = a eps - s x0, with
    a = 0.07 and s = 1.0 at that step) returns far less. A1111 calls a mean of output minus input below -1 a
    v-model, for every SD 2 checkpoint it loads without a config; untested here on real weights (none are here)."""
    import torch

    dtype = unet.dtype
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999]), encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1


# -- converting a file into a bundle -----------------------------------------------------------------------------


def cache_root() -> Path:
    """The toolkit's cache: $LDM_CACHE, else $XDG_CACHE_HOME/ldm-toolkit, else ~/.cache/ldm-toolkit."""
    if os.environ.get("LDM_CACHE"):
        return Path(os.environ["LDM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm-toolkit"


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _loaded(cls, config, state: dict, what: str, path: Path):
    """``cls(config)`` built without allocating weights, holding ``state``'s tensors; a key or shape that does
    not fit is a SingleFileError (the file does not hold what its shapes said)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise SingleFileError(f"{path}: its {what} tensors do not fit the {what} its shapes describe (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); expected {EXPECTED}")
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    for name, buf in model.named_buffers():  # non-persistent buffers made on the meta device
        if buf.is_meta:
            raise SingleFileError(f"{path}: the {what}'s buffer {name} was not initialised")
    return model.eval()


def convert(path: PathLike, dest: PathLike, configs: Optional[SingleFileConfigs] = None,
            sha256: Optional[str] = None) -> Path:
    """Write the single file ``path`` as a bundle folder ``dest`` (diffusers' StableDiffusionPipeline layout);
    ``configs`` and ``sha256``: its ``derive_configs`` and ``file_sha256``, when already known."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from conditioning.bpe import write_clip_tokenizer_files
    from ldm_io import atomic_directory

    path = Path(path)
    configs = configs or derive_configs(read_header(path))
    checkpoint = load_file(str(path))
    unet = _loaded(UNet2DConditionModel, configs.unet, convert_ldm_unet_checkpoint(checkpoint, configs.unet), "U-Net", path)
    vae = _loaded(AutoencoderKL, configs.vae, convert_ldm_vae_checkpoint(checkpoint, configs.vae), "autoencoder", path)
    text_config = CLIPTextConfig(**configs.text_encoder)
    if configs.version == "sd2":
        last = f"{OPEN_CLIP}transformer.resblocks.{configs.text_encoder['num_hidden_layers']}."
        kept = {k: v for k, v in checkpoint.items() if k.startswith(OPEN_CLIP) and not k.startswith(last)}
        with_model = type("_Config", (), {"config": text_config})  # what the converter reads of the model
        text_state = convert_open_clip_checkpoint(with_model, kept, prefix=OPEN_CLIP)
        text_state.pop("text_projection.weight", None)  # OpenCLIP's projection: not part of CLIPTextModel
    else:
        text_state = convert_ldm_clip_checkpoint({k if k.startswith(CLIP + "text_model.") else
                                                  k.replace(CLIP, CLIP + "text_model.", 1): v
                                                  for k, v in checkpoint.items() if k.startswith(CLIP)})
    text_state = {k: v for k, v in text_state.items() if not k.endswith("position_ids")}
    text_state = _for_text_model(text_state, CLIPTextModel, text_config)
    text = _loaded(CLIPTextModel, text_config, text_state, "text encoder", path)
    scheduler = dict(configs.scheduler)
    if configs.version == "sd2" and not configs.prediction_given:
        scheduler["prediction_type"] = "v_prediction" if predicts_v(unet) else "epsilon"
        print(f"{path.name}: an SD 2 file of {scheduler['prediction_type']} (asked of its U-Net, as A1111 does)",
              file=sys.stderr)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    with atomic_directory(dest, keep_existing=True, durable=True) as tmp:
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        text.save_pretrained(tmp / "text_encoder")
        write_clip_tokenizer_files(tmp / "tokenizer", num_merges=configs.num_merges, pad_token=configs.pad_token,
                                   model_max_length=configs.text_encoder["max_position_embeddings"])
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / "single_file.json").write_text(json.dumps({"sha256": sha256 or file_sha256(path),
                                                                     "version": configs.version}))
    return Path(dest)


def _for_text_model(state: dict, cls, config) -> dict:
    """``text_model.*`` keys as this transformers' CLIPTextModel names them (flattened from 5.6 on)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        flat = not hasattr(cls(config), "text_model")
    return {k.removeprefix("text_model."): v for k, v in state.items()} if flat else state


def content_hash(path: Path) -> str:
    """``file_sha256(path)``, remembered in the cache's ``hashes.json`` by the file's path, size and modification
    time (as A1111 keeps its model hashes), so a large file is read whole once, not on every load."""
    from ldm_io import write_text

    index_file = cache_root() / "single_file" / "hashes.json"
    stat, name = path.stat(), str(path.resolve())
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    seen = index.get(name)
    if isinstance(seen, dict) and seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns:
        return str(seen.get("sha256"))
    digest = file_sha256(path)
    index[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        write_text(index_file, json.dumps(index, indent=1))
    except OSError:  # a cache that cannot be written costs only the hashing next time
        pass
    return digest


def cached_bundle(path: PathLike) -> Path:
    """The bundle folder of single file ``path``: converted on first use, then read from the cache."""
    path = Path(path)
    configs = derive_configs(read_header(path))  # a file of another kind fails here, before it is hashed
    digest = content_hash(path)
    dest = cache_root() / "single_file" / digest[:24]
    if not (dest / "model_index.json").is_file():
        print(f"converting {path} into a model folder at {dest} (once; later runs read it from there)", file=sys.stderr)
        convert(path, dest, configs, digest)
    return dest


# -- writing a bundle as a single file ---------------------------------------------------------------------------
# The reverse of diffusers' converters. The renaming follows diffusers'
# scripts/convert_diffusers_to_original_stable_diffusion.py (Apache-2.0, (c) The HuggingFace Team), which
# spells it out for SD 1.x/2.x's four levels of two resnets; here the same rules for any number of levels
# and resnets per level, read off the config.

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
                ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def _renamed(state: dict, prefixes: list[tuple[str, str, list]], what: str) -> dict:
    """Each key's longest matching diffusers prefix replaced by its LDM one, then that prefix's inner renames."""
    prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
    out = {}
    for key, value in state.items():
        for old, new, inner in prefixes:
            if key.startswith(old):
                rest = key[len(old):]
                for a, b in inner:
                    rest = rest.replace(a, b)
                out[new + rest] = value
                break
        else:
            raise SingleFileError(f"the {what}'s tensor {key} has no place in the single-file layout")
    return out


def unet_to_ldm(state: dict, config) -> dict:
    """A UNet2DConditionModel's state dict in the original layout (without the ``model.diffusion_model.`` prefix)."""
    L, n = config["layers_per_block"], len(config["block_out_channels"])
    if not isinstance(L, int):
        raise SingleFileError(f"the U-Net's layers_per_block={L!r} differ by level; the single-file layout needs one number")
    p = [("time_embedding.linear_1.", "time_embed.0.", []), ("time_embedding.linear_2.", "time_embed.2.", []),
         ("conv_in.", "input_blocks.0.0.", []), ("conv_norm_out.", "out.0.", []), ("conv_out.", "out.2.", []),
         ("mid_block.attentions.0.", "middle_block.1.", [])]
    p += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", _UNET_RESNET) for j in range(2)]
    for i in range(n):
        for j in range(L):
            k = (L + 1) * i + j + 1
            p += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", _UNET_RESNET),
                  (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", [])]
        p.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op.", []))
        for j in range(L + 1):
            k = (L + 1) * i + j
            p += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", _UNET_RESNET),
                  (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", [])]
        has_attention = config["up_block_types"][i].startswith("CrossAttn")
        p.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(L + 1) * i + L}.{2 if has_attention else 1}.", []))
    return _renamed(state, p, "U-Net")


def vae_to_ldm(state: dict, config) -> dict:
    """An AutoencoderKL's state dict in the original layout (without ``first_stage_model.``); its attention's
    linear weights become the 1x1 convolutions of LDM's AttnBlock."""
    n = len(config["block_out_channels"])
    p = [(f"{s}.conv_norm_out.", f"{s}.norm_out.", []) for s in ("encoder", "decoder")]
    p += [(f"{s}.{name}.", f"{s}.{name}.", []) for s in ("encoder", "decoder") for name in ("conv_in", "conv_out")]
    p += [(f"{name}.", f"{name}.", []) for name in ("quant_conv", "post_quant_conv")]
    for s in ("encoder", "decoder"):
        p += [(f"{s}.mid_block.resnets.{j}.", f"{s}.mid.block_{j + 1}.", [("conv_shortcut", "nin_shortcut")]) for j in range(2)]
        p.append((f"{s}.mid_block.attentions.0.", f"{s}.mid.attn_1.", _VAE_ATTENTION))
    for i in range(n):
        p.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", [("conv_shortcut", "nin_shortcut")]))
        p.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", []))
        p.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.", [("conv_shortcut", "nin_shortcut")]))
        p.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", []))
    out = _renamed(state, p, "autoencoder")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
    return out


def clip_to_ldm(state: dict) -> dict:
    """A transformers CLIPTextModel's state dict as SD 1 holds it (without ``cond_stage_model.transformer.``)."""
    return {"text_model." + k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def open_clip_to_ldm(state: dict, add_identity_layer: bool) -> dict:
    """A transformers CLIPTextModel's state dict as SD 2's OpenCLIP text tower (without ``cond_stage_model.model.``):
    q, k, v projections stacked into ``in_proj``. SD 2 reads the penultimate layer; with ``add_identity_layer``
    (a model read at its last layer, as diffusers' SD 2 text encoder is) a last block that adds nothing is
    appended, so its penultimate output is the model's last, and reading the last gives the same."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias")}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    inner = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("self_attn.out_proj", "attn.out_proj")]
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state.pop(src + f"self_attn.{q}_proj.{kind}") for q in "qkv"])
        for a, b in inner:
            for kind in ("weight", "bias"):
                out[dst + f"{b}.{kind}"] = state.pop(src + f"{a}.{kind}")
    if state:
        raise SingleFileError(f"the text encoder's tensor {next(iter(state))} has no place in the OpenCLIP layout")
    if add_identity_layer:
        first, last = "transformer.resblocks.0.", f"transformer.resblocks.{len(layers)}."
        for key in [k for k in out if k.startswith(first)]:
            value = out[key]
            out[last + key[len(first):]] = torch.ones_like(value) if ".ln_" in key and key.endswith("weight") else torch.zeros_like(value)
    width = out["token_embedding.weight"].shape[1]
    out["text_projection"] = torch.eye(width, dtype=out["token_embedding.weight"].dtype)  # unused by SD; OpenCLIP has one
    return out


# Config fields that do not change what a model computes in float32, left out of ``config_differences``.
UNCOMPARED = {"_name_or_path", "_diffusers_version", "_class_name", "_use_default_values", "force_upcast"}
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "hidden_act", "layer_norm_eps")


def config_differences(configs: SingleFileConfigs, unet, vae, text_encoder, schedule) -> list[str]:
    """``part.field: derived != actual`` for every field that matters where ``configs`` (derived from a file)
    differ from the loaded parts of a bundle (U-Net, diffusers autoencoder, ``conditioning`` text encoder,
    (NoiseSchedule, SamplingConfig)): every field of the U-Net's and autoencoder's configs but ``UNCOMPARED``;
    the text model's ``TEXT_FIELDS``, its context layer and tokenizer; the schedule and its conventions."""
    from accelerate import init_empty_weights

    from conditioning.bpe import clip_bpe_vocab
    from ldm.bundle import scheduler_config, schedule_from_config

    out = []
    for part, actual in (("unet", unet), ("vae", vae)):
        derived = getattr(configs, part)
        keys = set(derived)
        try:
            with init_empty_weights():
                derived = type(actual)(**derived).config  # every field, defaults filled in
            keys |= set(derived) | set(actual.config)
        except (ValueError, RuntimeError):  # a model that cannot be built (e.g. 32 groups of 8 channels)
            pass
        for key in sorted(keys - UNCOMPARED):
            a, b = derived.get(key), actual.config.get(key)
            if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
                out.append(f"{part}.{key}: {a!r} != {b!r}")
    from transformers import CLIPTextConfig

    model_config, derived_text = text_encoder.model.config, CLIPTextConfig(**configs.text_encoder)
    # the penultimate layer of N, then the final layer norm, is the last layer of the first N - 1
    skipped = 1 if text_encoder.layer == "penultimate" else 0
    for key in TEXT_FIELDS:
        a, b = getattr(derived_text, key), getattr(model_config, key)
        b = b - skipped if key == "num_hidden_layers" else b
        if a != b:
            out.append(f"text_encoder.{key}: {a!r} != {b!r}")
    tok = text_encoder.tokenizer
    if tok.get_vocab() != clip_bpe_vocab(configs.num_merges)[0]:
        out.append("tokenizer: not CLIP's BPE vocabulary" + (f" with its first {configs.num_merges} merges" if configs.num_merges else ""))
    if tok.pad_token != configs.pad_token:
        out.append(f"tokenizer.pad_token: {configs.pad_token!r} != {tok.pad_token!r}")
    if text_encoder.max_length != min(77, configs.text_encoder["max_position_embeddings"]):
        out.append(f"tokenizer.model_max_length: 77 != {tok.model_max_length!r}")
    derived_schedule = scheduler_config(*schedule_from_config(configs.scheduler))
    actual_schedule = scheduler_config(*schedule)
    out += [f"scheduler.{k}: {derived_schedule[k]!r} != {actual_schedule[k]!r}" for k in derived_schedule
            if derived_schedule[k] != actual_schedule[k]]
    return out


def single_file_state(bundle: PathLike, progress: Callable[[str], None] = lambda what: None) -> tuple[dict, dict]:
    """(state dict in the original layout, METADATA_KEY's fields) of a bundle with an AutoencoderKL and a
    transformers CLIPTextModel; a bundle the layout cannot express is a SingleFileError saying what it needs.
    A LoRA in the bundle's ``unet_lora/`` is fused into the U-Net's weights."""
    import conditioning
    import vae as vae_package
    from conditioning.encoders import detect_backend
    from ldm.bundle import check_bundle, load_schedule, load_unet, read_config, scheduler_config

    root = check_bundle(bundle)
    vae_class = read_config(root / "vae" / "config.json").get("_class_name")
    if vae_class != "AutoencoderKL":
        raise SingleFileError(f"{root}: its autoencoder is a {vae_class}; a single file holds a KL autoencoder "
                              "(AutoencoderKL, as Stable Diffusion's), so this bundle cannot be written as one")
    if detect_backend(root / "text_encoder") != "transformers":
        raise SingleFileError(f"{root}: its text encoder is open_clip's ({root / 'text_encoder'}); a single file holds a "
                              "transformers CLIPTextModel (text_encoder/config.json, as Stable Diffusion's)")
    encoder = conditioning.load_text_encoder(root)
    model = encoder.model
    if type(model).__name__ != "CLIPTextModel":
        raise SingleFileError(f"{root}: its text encoder is a {type(model).__name__}; a single file holds a CLIPTextModel")
    act = model.config.hidden_act
    if act not in ("quick_gelu", "gelu"):
        raise SingleFileError(f"{root}: its text encoder uses hidden_act={act!r}; a single file holds OpenAI's CLIP "
                              "(quick_gelu, SD 1) or OpenCLIP (gelu, SD 2)")
    version = "sd2" if act == "gelu" else "sd1"
    if version == "sd1" and encoder.layer != "final":
        raise SingleFileError(f"{root}: its text encoder is read at the {encoder.layer} layer; an SD 1 single file "
                              "is read at the last layer (A1111's 'clip skip' is a setting of the reader, not of the file)")
    progress("loading the U-Net and the autoencoder")
    unet = load_unet(root)
    autoencoder = vae_package.load_autoencoder(root / "vae").model
    state = {UNET + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    state.update({VAE + k: v for k, v in vae_to_ldm(autoencoder.state_dict(), autoencoder.config).items()})
    if version == "sd2":
        text = open_clip_to_ldm(model.state_dict(), add_identity_layer=encoder.layer == "final")
        state.update({OPEN_CLIP + k: v for k, v in text.items()})
    else:
        state.update({CLIP + k: v for k, v in clip_to_ldm(model.state_dict()).items()})
    schedule = load_schedule(root)
    sched = scheduler_config(*schedule)
    meta = {"unet": {k: unet.config[k] for k in METADATA_FIELDS["unet"]},
            "vae": {k: autoencoder.config[k] for k in METADATA_FIELDS["vae"]},
            "text_encoder": {"num_attention_heads": model.config.num_attention_heads},
            "scheduler": {k: sched[k] for k in METADATA_FIELDS["scheduler"] if k in sched}}
    meta["unet"]["attention_head_dim"] = _plain(meta["unet"]["attention_head_dim"])
    header = Header(root, {k: tuple(v.shape) for k, v in state.items()}, {METADATA_KEY: json.dumps(meta)})
    try:
        configs = derive_configs(header)
    except SingleFileError as exc:
        raise SingleFileError(f"{root} cannot be written as a single file: {exc}") from None
    differences = config_differences(configs, unet, autoencoder, encoder, schedule)
    if differences:
        raise SingleFileError(f"{root} cannot be written as a single file: read back it would have "
                              f"{'; '.join(differences[:3])} (derived != the bundle's)")
    return state, meta


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def export_single_file(bundle: PathLike, out: PathLike, *, half: bool = False,
                       progress: Callable[[str], None] = lambda what: None) -> Path:
    """Write ``bundle`` to ``out`` as one .safetensors in the original layout (float16 with ``half``);
    ``progress(what)`` is told each stage as it starts."""
    import torch
    from safetensors.torch import save_file

    from ldm_io import atomic_path

    state, meta = single_file_state(bundle, progress)
    progress(f"writing {out}")
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    return Path(out)


def written_by_export(path: PathLike) -> bool:
    """Whether ``path`` is a single file ``export_single_file`` wrote (it carries METADATA_KEY)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001  (not a safetensors file: not ours)
        return False
