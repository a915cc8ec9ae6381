"""The model bundle on disk: a folder in diffusers' layout, so each part also loads with diffusers.

    model_index.json                 which class sits in each folder
    unet/                            UNet2DConditionModel: config.json + diffusion_pytorch_model.safetensors
    vae/                             VQModel or AutoencoderKL (config has scaling_factor)
    text_encoder/, tokenizer/        open_clip (config + safetensors) or transformers CLIP
    scheduler/scheduler_config.json  num_train_timesteps, beta_schedule, beta_start, beta_end, prediction_type, ...

A Stable Diffusion 1.x/2.x folder in diffusers layout is a bundle too. The scheduler config is
written as diffusers' DDIMScheduler reads it; reading accepts any diffusers scheduler config
(Stable Diffusion ships PNDMScheduler's) and keeps only the schedule and the conventions.

A fine-tuned bundle may hold a LoRA for ``unet/`` at its top level, ``pytorch_lora_weights.safetensors`` in
diffusers' layout (``ldm.lora``; bundles made before kept it in ``unet_lora/``): ``load_unet`` merges it, and
diffusers' ``StableDiffusionPipeline.load_lora_weights(bundle)`` reads it as it is. A bundle written from a
``base`` bundle copies the parts whose weights did not change as they are stored there (fp16, a packed
token table), so a LoRA fine-tune of a packed model is the packed model plus its adapter.

This module reads and writes the folder; ``Text2ImagePipeline.from_pretrained`` puts the parts
``load_parts`` returns together (so this module never imports the pipeline).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from ldm_io import atomic_directory

if TYPE_CHECKING:  # ldm.schedule imports torch; the torch-free runner (ldm.runtime) reads bundles through this module
    from ldm.schedule import NoiseSchedule, SamplingConfig

PathLike = Union[str, os.PathLike]
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LORA_DIR = "unet_lora"  # bundles made before: their LoRA for unet/ (ldm.lora.OLD_LORA_DIR); read, no longer written
SCHEDULER_CONFIG = "scheduler_config.json"
DEFAULT_BUNDLE = Path(__file__).parent / "default_model"
# Models shipped in the package, by the name `--model` accepts: the emoji model and the shapes model
# (both trained by scripts/train_default_model.sh).
PACKAGED_MODELS = {"default": DEFAULT_BUNDLE, "shapes": Path(__file__).parent / "shapes_model"}


class BundleError(FileNotFoundError):
    """A bundle folder is missing or lacks a part; the message says which and what was expected."""


def check_bundle(path: PathLike) -> Path:
    """The bundle folder as a Path, after checking that every part is there. (A Stable Diffusion single file is
    turned into its bundle before this, by ``ldm.single_file.cached_bundle``.)"""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"model folder {root} does not exist; give --model a bundle folder (model_index.json, "
                          f"{', '.join(PARTS)}) or a Stable Diffusion single .safetensors file")
    missing = [p for p in PARTS if not (root / p).is_dir()]
    if not (root / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise BundleError(f"model folder {root} lacks {', '.join(missing)}; a bundle holds model_index.json and {', '.join(PARTS)}/")
    return root


# -- scheduler config <-> schedule -----------------------------------------------------------


def scheduler_config(schedule: NoiseSchedule, sampling: SamplingConfig) -> dict:
    """A DDIMScheduler config (diffusers names) for our schedule and sampling conventions."""
    from ldm.schedule import DIFFUSERS_BETA_SCHEDULE, DIFFUSERS_PREDICTION

    beta = DIFFUSERS_BETA_SCHEDULE.get(schedule.beta_schedule, "scaled_linear")  # quadratic is that curve
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_schedule": beta,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "prediction_type": DIFFUSERS_PREDICTION[sampling.prediction],
        "timestep_spacing": sampling.timestep_spacing,
        "steps_offset": sampling.steps_offset,
        "clip_sample": sampling.clip_x0 is not None,
        "clip_sample_range": sampling.clip_x0 or 1.0,
        "set_alpha_to_one": True,
    }


def schedule_from_config(config: dict) -> tuple[NoiseSchedule, SamplingConfig]:
    """Our schedule and sampling conventions from any diffusers scheduler config."""
    from ldm.schedule import DIFFUSERS_BETA_SCHEDULE, DIFFUSERS_PREDICTION, NoiseSchedule, SamplingConfig

    from_diffusers_beta = {v: k for k, v in DIFFUSERS_BETA_SCHEDULE.items()}
    from_diffusers_pred = {v: k for k, v in DIFFUSERS_PREDICTION.items()}
    beta = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler config gives trained_betas; only named beta schedules are supported")
    if beta not in from_diffusers_beta:
        raise ValueError(f"scheduler beta_schedule={beta!r} is not supported; allowed: {', '.join(from_diffusers_beta)}")
    pred = config.get("prediction_type", "epsilon")
    if pred not in from_diffusers_pred:
        raise ValueError(f"scheduler prediction_type={pred!r} is not supported; allowed: {', '.join(from_diffusers_pred)}")
    schedule = NoiseSchedule(
        from_diffusers_beta[beta],
        int(config.get("num_train_timesteps", 1000)),
        float(config.get("beta_start", 1e-4)),
        float(config.get("beta_end", 0.02)),
    )
    sampling = SamplingConfig(
        prediction=from_diffusers_pred[pred],
        timestep_spacing=config.get("timestep_spacing", "leading"),
        steps_offset=int(config.get("steps_offset", 0)),
        clip_x0=float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None,
    )
    return schedule, sampling


# -- saving ------------------------------------------------------------------------------------


def _library_entries(root: Path) -> dict:
    """model_index.json's [library, class] for each part, read off what was written."""
    vae_class = read_config(root / "vae" / "config.json").get("_class_name", "VQModel")
    te_config = root / "text_encoder" / "config.json"
    if te_config.is_file():
        text = {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    else:
        text = {"text_encoder": ["open_clip", "CLIP"], "tokenizer": ["open_clip", "SimpleTokenizer"]}
    return {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", vae_class], **text,
            "scheduler": ["diffusers", "DDIMScheduler"]}


def _stored_as(state: dict, folder: Path, stem: str) -> bool:
    """Whether the weights ``state`` (a module's ``state_dict()``) are exactly what ``folder``'s safetensors hold:
    every stored tensor, cast to the module's dtype, equal to the module's (a compact token table expanded
    first, ``conditioning.clip_model``), and no tensor more or less. Read one tensor at a time."""
    import torch
    from safetensors import safe_open

    from conditioning.clip_model import FALLBACK, KEPT_IDS, TOKEN_TABLE, expand_token_table
    from ldm_io.weights import find_weights

    try:
        weights = find_weights(folder, stem)
    except (OSError, ValueError):
        return False
    if not weights.safetensors:
        return False
    seen = set()
    for file in weights.files:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in keys - {KEPT_IDS, FALLBACK}:
                if key not in state:
                    return False
                ref, stored = state[key].detach(), f.get_tensor(key)
                if key == TOKEN_TABLE and KEPT_IDS in keys:
                    compact = {key: stored, KEPT_IDS: f.get_tensor(KEPT_IDS), FALLBACK: f.get_tensor(FALLBACK)}
                    stored = expand_token_table(compact, ref.shape[0])[key]
                if stored.shape != ref.shape or not torch.equal(stored.to(ref.dtype), ref.cpu()):
                    return False
                seen.add(key)
    return seen == set(state)


def _copy_unchanged(base: Optional[Path], tmp: Path, part: str, module, stem: str, also: tuple[str, ...] = ()) -> bool:
    """Copy ``base/part`` (its configs and the weight files ``find_weights`` picks; ``also``: whole sibling
    folders that go with it) into ``tmp`` when ``module``'s weights are what it stores; False otherwise."""
    from ldm_io.weights import find_weights

    if base is None or not callable(getattr(module, "state_dict", None)):
        return False
    if not _stored_as(module.state_dict(), base / part, stem):
        return False
    weights = find_weights(base / part, stem)
    variant = f".{weights.variant}" if weights.variant else ""
    index = base / part / f"{stem}{variant}.safetensors.index.json"
    (tmp / part).mkdir()
    for f in sorted((base / part).iterdir()):
        if f in weights.files or f == index or (f.is_file() and f.suffix == ".json" and not f.name.endswith(".index.json")):
            shutil.copy2(f, tmp / part / f.name)
    for sibling in also:
        shutil.copytree(base / sibling, tmp / sibling)
    return True


def _pack_like(base: Path, saved: Path) -> None:
    """When ``base``'s token table is packed (``ldm pack``), store the one just saved in ``saved`` packed too,
    losslessly: the rows that differ from the shared one (the packed rows and any a fine-tune learned) are kept,
    so a text encoder trained on new words stays near its packed size rather than growing to 49,408 rows."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from conditioning.clip_model import KEPT_IDS, TOKEN_TABLE, compact_losslessly
    from ldm_io import atomic_path
    from ldm_io.weights import find_weights

    try:
        stored, mine = find_weights(base, "model"), find_weights(saved, "model")
    except (OSError, ValueError):
        return
    for file in stored.files if stored.safetensors else []:
        with safe_open(str(file), framework="pt") as f:
            if KEPT_IDS in f.keys():
                kept = set(f.get_tensor(KEPT_IDS).tolist())
                break
    else:
        return
    for file in mine.files:
        state = load_file(str(file))
        if TOKEN_TABLE in state:
            fallback_id = next(i for i in range(state[TOKEN_TABLE].shape[0]) if i not in kept)
            with atomic_path(file) as tmp:
                save_file(compact_losslessly(state, fallback_id), str(tmp), metadata={"format": "pt"})


def save_bundle(path: PathLike, *, unet, autoencoder, text_encoder, schedule: NoiseSchedule, sampling: SamplingConfig,
                unet_lora=None, base: Optional[PathLike] = None) -> Path:
    """Write a bundle atomically: everything goes to a temporary folder beside ``path``, renamed at the end.

    ``unet_lora``: a U-Net carrying a peft LoRA adapter (``add_adapter``); its adapter weights go to
    ``pytorch_lora_weights.safetensors`` in diffusers' layout (``ldm.lora.save_lora``) beside the base
    weights of ``unet``. Loading merges it.
    ``base``: the bundle the parts were loaded from. A part whose weights are exactly what ``base`` stores
    (a LoRA fine-tune's U-Net, the frozen autoencoder and text encoder) is copied from there as stored,
    fp16 or with a packed token table, rather than written again in float32.
    """
    from ldm import __version__

    base = Path(base) if base is not None else None
    with atomic_directory(path) as tmp:
        if not _copy_unchanged(base, tmp, "unet", unet, "diffusion_pytorch_model"):
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
        if unet_lora is not None:
            from ldm.lora import save_lora

            save_lora(tmp, unet_lora)
        if not _copy_unchanged(base, tmp, "vae", getattr(autoencoder, "model", None), "diffusion_pytorch_model"):
            autoencoder.save_pretrained(tmp / "vae")
        if not _copy_unchanged(base, tmp, "text_encoder", getattr(text_encoder, "model", None), "model", also=("tokenizer",)):
            text_encoder.save_pretrained(tmp)  # writes text_encoder/ and tokenizer/
            if base is not None:
                _pack_like(base / "text_encoder", tmp / "text_encoder")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / SCHEDULER_CONFIG).write_text(json.dumps(scheduler_config(schedule, sampling), indent=2))
        index = {"_class_name": "Text2ImagePipeline", "_ldm_toolkit_version": __version__, **_library_entries(tmp)}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    return Path(path)


# -- loading -----------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    """A part's JSON config; a missing, unreadable or malformed file is an error naming it."""
    if not path.is_file():
        raise BundleError(f"{path} is missing; copy or download the model folder again")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); copy or download the model folder again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; copy or download the model folder again")
    return config


def load_schedule(root: PathLike) -> tuple[NoiseSchedule, SamplingConfig]:
    config_path = Path(root) / "scheduler" / SCHEDULER_CONFIG
    if not config_path.is_file():
        raise BundleError(f"{config_path} is missing; expected a diffusers scheduler config")
    return schedule_from_config(read_config(config_path))


@dataclass(frozen=True)
class Geometry:
    """What a bundle's configs say about the sizes it works at, read without loading any weights
    (``read_geometry``): enough to check a request and estimate its memory before anything runs."""

    factor: int  # the autoencoder's downsampling f (image side / latent side)
    unet_factor: int  # the U-Net's downsampling: 2 ** (resolutions - 1)
    latent_channels: int
    sample_size: int  # the latent side the U-Net was trained at (default image side: sample_size * f)
    unet_channels: tuple[int, ...]  # block_out_channels, finest first
    layers_per_block: int
    vae_channels: tuple[int, ...]  # the autoencoder's block_out_channels, finest first
    num_train_timesteps: int
    weights_bytes: int  # every part's weights in float32

    @property
    def granularity(self) -> int:
        """Image sides must be multiples of this: f times the U-Net's downsampling."""
        return self.factor * self.unet_factor


def read_geometry(path: PathLike) -> Geometry:
    """The ``Geometry`` of a bundle folder (ours or Stable Diffusion's); its weight files are found and
    checked (``ldm_io.weights``) but not read, so a corrupt file is reported here, before any loading."""
    from ldm_io.weights import find_weights

    root = check_bundle(path)
    unet, ae = read_config(root / "unet" / "config.json"), read_config(root / "vae" / "config.json")
    scheduler = read_config(root / "scheduler" / SCHEDULER_CONFIG)
    found = [find_weights(root / "unet", "diffusion_pytorch_model"), find_weights(root / "vae", "diffusion_pytorch_model"),
             find_weights(root / "text_encoder", "model", "pytorch_model")]
    weights_bytes = sum(f.stat().st_size * (2 if w.variant in ("fp16", "bf16") else 1) for w in found for f in w.files)
    try:
        unet_channels = tuple(int(c) for c in unet["block_out_channels"])
        vae_channels = tuple(int(c) for c in ae["block_out_channels"])
        layers = unet.get("layers_per_block", 2)
        size = unet.get("sample_size", 64)
        return Geometry(
            factor=2 ** (len(vae_channels) - 1), unet_factor=2 ** (len(unet_channels) - 1),
            latent_channels=int(ae.get("vq_embed_dim") or ae.get("latent_channels", 4)),
            sample_size=int(size[0] if isinstance(size, (list, tuple)) else size), unet_channels=unet_channels,
            layers_per_block=int(max(layers) if isinstance(layers, (list, tuple)) else layers), vae_channels=vae_channels,
            num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)), weights_bytes=weights_bytes)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{root}: unet/config.json or vae/config.json is not a diffusers config "
                         f"({type(exc).__name__}: {exc}); copy or download the model folder again") from None


def load_unet(root: PathLike):
    """The U-Net of ``root/unet`` (float32): its weights as ``ldm_io.weights.find_weights`` finds and checks
    them (safetensors, an fp16 variant, or .bin read with ``weights_only=True``), the bundle's LoRA merged in."""
    import torch
    from diffusers import UNet2DConditionModel

    from ldm_io.weights import find_weights, refused_pickle

    folder = Path(root) / "unet"
    weights = find_weights(folder, "diffusion_pytorch_model")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=weights.safetensors, variant=weights.variant,
                                                    torch_dtype=torch.float32).eval()
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        if weights.safetensors:
            raise
        raise refused_pickle(weights.files[0], exc) from None
    lora = bundle_lora(root)
    if lora is not None:
        from ldm.lora import merge_loras, read_lora

        merge_loras(unet, [(read_lora(lora), 1.0)])  # W + (alpha / r) B A: a plain U-Net again
    return unet


def bundle_lora(root: PathLike) -> Optional[Path]:
    """The bundle's own LoRA file for unet/ (top level, or unet_lora/ in a bundle made before), or None."""
    from ldm.lora import LORA_FILE

    for candidate in (Path(root) / LORA_FILE, Path(root) / LORA_DIR / LORA_FILE):
        if candidate.is_file():
            return candidate
    return None


@dataclass
class BundleParts:
    """A bundle's parts, loaded (CPU, fp32, eval mode): what ``Text2ImagePipeline`` is built from."""

    root: Path
    unet: Any  # diffusers UNet2DConditionModel (the bundle's LoRA merged in)
    autoencoder: Any  # vae.Autoencoder
    text_encoder: Any  # conditioning.TextEncoder
    schedule: NoiseSchedule
    sampling: SamplingConfig

    @property
    def sample_size(self) -> int:
        """The latent size the U-Net was trained at."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])


def load_parts(path: PathLike) -> BundleParts:
    """Every part of a bundle folder (ours or Stable Diffusion's in diffusers layout)."""
    import conditioning
    import vae

    root = check_bundle(path)
    schedule, sampling = load_schedule(root)
    unet = load_unet(root)
    autoencoder = vae.load_autoencoder(root / "vae").eval()
    text_encoder = conditioning.load_text_encoder(root)
    if hasattr(text_encoder, "eval"):
        text_encoder.eval()
    return BundleParts(root, unet, autoencoder, text_encoder, schedule, sampling)


def bundle_hash(path: PathLike, length: int = 16) -> str:
    """sha256 over the bundle's configs and weights (file names and contents), as a short hex string."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".txt", ".gz") and "onnx" not in f.relative_to(root).parts:
            h.update(str(f.relative_to(root)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:length]
