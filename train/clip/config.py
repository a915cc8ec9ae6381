"""The ``ldm train-clip`` config: the run core's sections (``train``, ``optim``, ``checkpoint``) plus
the CLIP's own (``model``, ``data``, ``validation``), loaded from YAML.

``load_train_config(path, ["optim.lr=5e-4", ...])`` reads a YAML file through ``train.run.config``
(unknown keys and wrong types are errors, keys of the old dialect name their new key) and applies
``key=value`` overrides. The model section is ``conditioning.ClipModelConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence

from conditioning.clip_model import ClipModelConfig
from train.run.config import load_config
from train.run.sections import CheckpointConfig, OptimConfig, RunConfig


@dataclasses.dataclass
class ClipDataConfig:
    """The captioned image set."""

    # A captioned image set in any layout train.data reads (e.g. an image folder with metadata.jsonl
    # rows {"file_name", "text", "split"}); required.
    path: str = ""
    # Held-out share when the data has no test split (train.data.split: the rows every trainer holds out).
    holdout_fraction: float = 0.05
    # Random horizontal flips in training (off by default: flips break "left"/"right" captions).
    flip: bool = False
    # Random resized crops in training: each crop keeps at least this fraction of the image area
    # (aspect ratio kept), resized back to the input size. 1.0 turns it off.
    min_crop_scale: float = 1.0
    # Train on at most this many pairs (0: all), for quick experiments.
    max_images: int = 0
    # Read images outside the data set's folder (absolute paths, "..", symlinks out of it); off, such rows are skipped.
    allow_outside_paths: bool = False

    def __post_init__(self):
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"data.holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"data.min_crop_scale={self.min_crop_scale} must be in (0, 1]")
        if self.max_images < 0:
            raise ValueError(f"data.max_images={self.max_images} must be >= 0 (0: all)")


@dataclasses.dataclass
class ClipRunConfig(RunConfig):
    """The loop (``train``): the shared settings plus what the CLIP's trainer adds."""

    output_dir: str = "runs/clip"  # checkpoints/, logs/, config.yaml; at the end text_encoder/, tokenizer/, metrics.json
    batch_size: int = 128  # pairs per process per micro-batch: the contrastive negatives + 1 (>= 2)
    max_steps: int = 2000  # optimizer steps (the learning-rate schedule's length)
    log_every: int = 10
    # Stop after this step with a checkpoint, to continue later with --resume (0: run to max_steps).
    stop_at: int = 0
    # Which text layer the saved text encoder gives as context: "final" or "penultimate" (SD 2).
    context_layer: Literal["final", "penultimate"] = "final"
    cpu: bool = False  # train on the CPU even when a GPU is present
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 2:
            raise ValueError(f"train.batch_size={self.batch_size} must be >= 2 (a contrastive batch needs negatives)")
        if self.stop_at < 0:
            raise ValueError(f"train.stop_at={self.stop_at} must be >= 0 (0: run to train.max_steps)")


@dataclasses.dataclass
class ClipOptimConfig(OptimConfig):
    """AdamW with linear warm-up and cosine decay to 0, as open_clip's trainer. Weight decay applies
    to weight matrices only (not to gains, biases, embeddings or the temperature)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)  # open_clip's defaults for ViT models
    weight_decay: float = 0.1
    eps: float = 1e-6
    max_grad_norm: Optional[float] = 1.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_steps: int = 100
    lr_min: float = 0.0


@dataclasses.dataclass
class ClipCheckpointConfig(CheckpointConfig):
    every: int = 500
    keep_last: int = 2


@dataclasses.dataclass
class ClipValidationConfig:
    """Held-out retrieval (train.clip.eval) on the held-out rows of train.data.split."""

    every: int = 500  # optimizer steps between evaluations (and one at the end); 0 = only at the end

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"validation.every={self.every} must be >= 0 (0: only at the end)")


@dataclasses.dataclass
class ClipTrainConfig:
    """``ldm train-clip`` config."""

    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)
    data: ClipDataConfig = dataclasses.field(default_factory=ClipDataConfig)
    train: ClipRunConfig = dataclasses.field(default_factory=ClipRunConfig)
    optim: ClipOptimConfig = dataclasses.field(default_factory=ClipOptimConfig)
    checkpoint: ClipCheckpointConfig = dataclasses.field(default_factory=ClipCheckpointConfig)
    validation: ClipValidationConfig = dataclasses.field(default_factory=ClipValidationConfig)


def load_train_config(path: Optional[str], overrides: Sequence[str] = ()) -> ClipTrainConfig:
    config = load_config(ClipTrainConfig, path, overrides)
    if not config.data.path:
        raise ValueError("data.path is not set; give the captioned image set in the config or as data.path=DIR")
    return config
