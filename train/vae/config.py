"""The config of ``ldm train-vae``: the autoencoder's own sections (model, quantizer, loss, data) and the
run core's (train, optim, checkpoint, ``train.run.sections``) with this stage's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from train.run.sections import CheckpointConfig, OptimConfig, RunConfig
from vae.config import AutoencoderConfig, LossConfig, QuantizerConfig


@dataclass
class VAEDataConfig:
    """The training images: any data set ``train.data`` reads, split by its one held-out rule."""

    path: str = ""  # a data set folder or file (e.g. made by `ldm data emoji --out data/emoji`); required
    # share of images held out (for `ldm eval-vae`) when the data set has no test split; the same rows
    # the CLIP and U-Net trainers hold out (train.data.split)
    holdout_fraction: float = 0.05
    flip: bool = True  # random horizontal flips
    max_images: int = 0  # train on at most this many images (0: all training rows)
    # read images outside the data set's folder (absolute paths, "..", symlinks out of it); off, such rows are skipped
    allow_outside_paths: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"data.holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if self.max_images < 0:
            raise ValueError(f"data.max_images={self.max_images} must be >= 0 (0: all)")


@dataclass
class VAERunConfig(RunConfig):
    """The loop (``train``): the shared settings plus what the autoencoder's trainer adds."""

    output_dir: str = "runs/vae"  # config.yaml, checkpoints/, logs/, and vae/ (the final autoencoder)
    max_steps: int = 5000  # optimizer steps
    log_every: int = 50  # optimizer steps between rows of logs/train.csv (averaged over them)
    max_minutes: float = 0.0  # also stop (with a checkpoint) after this much wall time; 0: no limit
    scaling_images: int = 1024  # training images used to compute the latent scaling factor at the end

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_minutes < 0 or self.scaling_images < 1:
            raise ValueError(f"train.max_minutes={self.max_minutes} must be >= 0 and "
                             f"train.scaling_images={self.scaling_images} >= 1")


@dataclass
class VAEOptimConfig(OptimConfig):
    """Adam (AdamW without weight decay) with warm-up and cosine decay to lr_min: this stage's defaults."""

    lr: float = 4.0e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = None  # clip the global gradient norm; null = no clipping
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_steps: int = 100
    lr_min: float = 4.0e-5


@dataclass
class VAECheckpointConfig(CheckpointConfig):
    keep_last: int = 2


@dataclass
class VAETrainingConfig:
    """Everything ``ldm train-vae`` needs; saved as config.yaml in the run folder."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    train: VAERunConfig = field(default_factory=VAERunConfig)
    optim: VAEOptimConfig = field(default_factory=VAEOptimConfig)
    checkpoint: VAECheckpointConfig = field(default_factory=VAECheckpointConfig)
    description: Optional[str] = None  # free text: what this recipe is for
