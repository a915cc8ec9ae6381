"""The config of ``ldm train-vae``: one YAML file with sections model, quantizer, loss, data, train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vae.config import AutoencoderConfig, LossConfig, QuantizerConfig, check_choice

MIXED_PRECISION = ("fp32", "bf16", "fp16")


@dataclass
class DataConfig:
    """Where the training images are (an imagefolder with metadata.jsonl)."""

    path: str = "/work/data/emoji"  # folder with metadata.jsonl (file_name, text, optional split)
    split: str = "train"  # rows whose split is this (rows without a split count as "train")
    flip: bool = True  # random horizontal flips
    max_images: int = 0  # use at most this many images (0: all)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    out_dir: str = "runs/vae"  # run folder: checkpoints/, log.txt, vae/ (the final autoencoder)
    batch_size: int = 32  # images per step (per process)
    grad_accum: int = 1  # steps accumulated per optimiser update
    lr: float = 4.0e-4  # Adam learning rate of the autoencoder
    lr_min: float = 4.0e-5  # cosine decay from lr to this over max_steps (after warmup)
    warmup_steps: int = 100  # linear warmup
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    max_steps: int = 5000  # optimiser updates
    max_minutes: float = 0.0  # also stop (with a checkpoint) after this much wall time; 0: no limit
    mixed_precision: str = "fp32"  # "fp32", "bf16" (autocast; CPU AMX or GPU) or "fp16" (autocast; GPU)
    channels_last: bool = False  # NHWC memory format for the convolutions
    seed: int = 0
    log_every: int = 50  # steps between log lines
    checkpoint_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    scaling_images: int = 1024  # training images used to compute the latent scaling factor at the end
    num_threads: int = 0  # torch CPU threads (0: torch's default)

    def __post_init__(self) -> None:
        check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if len(self.adam_betas) != 2:
            raise ValueError(f"train.adam_betas must have two values; got {self.adam_betas}")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1; got {getattr(self, name)}")


@dataclass
class VAETrainingConfig:
    """Everything ``ldm train-vae`` needs; saved as config.yaml in the run folder."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    description: Optional[str] = None  # free text: what this recipe is for
