"""The ``ldm train-clip`` config: typed sections model, data, optim and run, loaded from YAML.

``load_train_config(path, ["optim.lr=5e-4", ...])`` reads a YAML file through
``train.run.config`` (unknown keys and wrong types are errors) and applies
``key=value`` overrides. The model section is ``conditioning.ClipModelConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence

from conditioning.clip_model import ClipModelConfig
from train.run.config import load_config


@dataclasses.dataclass
class ClipDataConfig:
    """The captioned image set."""

    # A captioned image set in any layout train.data reads (e.g. an image folder with metadata.jsonl
    # rows {"file_name", "text", "split"}). Its "test" split is held out for retrieval.
    folder: str = ""
    # Held-out fraction when the data has no train/test split (rows chosen by a hash of their index).
    test_fraction: float = 0.05
    # Random horizontal flips in training (off by default: flips break "left"/"right" captions).
    hflip: bool = False
    # Random resized crops in training: each crop keeps at least this fraction of the image area
    # (aspect ratio kept), resized back to the input size. 1.0 turns it off.
    min_crop_scale: float = 1.0
    # Use at most this many training pairs (0: all), for quick experiments.
    max_train: int = 0

    def __post_init__(self):
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"data.test_fraction={self.test_fraction} must be in [0, 1)")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"data.min_crop_scale={self.min_crop_scale} must be in (0, 1]")


@dataclasses.dataclass
class ClipOptimConfig:
    """AdamW with linear warm-up and cosine decay, as open_clip's trainer."""

    # Peak learning rate.
    lr: float = 1e-3
    # Decoupled weight decay, on weight matrices only (not on gains, biases, embeddings or the temperature).
    weight_decay: float = 0.1
    # AdamW betas and eps (open_clip's defaults for ViT models).
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    # Linear warm-up steps, then cosine decay to zero at max_steps.
    warmup_steps: int = 100
    # Pairs per micro-batch per process (also the number of contrastive negatives + 1).
    batch_size: int = 128
    # Micro-batches per optimizer step.
    grad_accum: int = 1
    # Optimizer steps in the whole run (the learning-rate schedule's length).
    max_steps: int = 2000
    # Clip the gradient norm to this value (0: off).
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 2 or self.grad_accum < 1 or self.max_steps < 1 or self.warmup_steps < 0:
            raise ValueError("optim needs lr > 0, batch_size >= 2, grad_accum >= 1, max_steps >= 1, warmup_steps >= 0")


@dataclasses.dataclass
class ClipRunConfig:
    """Where the run writes, how often, and at what precision."""

    # Run folder: checkpoints/, logs, config.yaml, and at the end the bundle parts text_encoder/ + tokenizer/.
    output_dir: str = "runs/clip"
    # Seed of the initial weights, the data order and the augmentation.
    seed: int = 0
    # accelerate mixed precision: "no" (fp32), "bf16" (CPU and GPU autocast) or "fp16" (GPU).
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # Force the CPU even when a GPU is present.
    cpu: bool = False
    # Checkpoint every N optimizer steps (and always at the end), keeping the newest keep_checkpoints.
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # Held-out retrieval every N steps (0: only at the end).
    eval_every: int = 500
    # Log a line to train_log.csv every N steps.
    log_every: int = 10
    # Stop after this step with a checkpoint, to continue later with --resume (0: run to max_steps).
    stop_at: int = 0
    # Which text layer the saved text encoder gives as context: "final" or "penultimate" (SD 2).
    context_layer: Literal["final", "penultimate"] = "final"
    # torch CPU threads (0: torch's default).
    threads: int = 0
    # Show a progress bar.
    progress: bool = True

    def __post_init__(self):
        if self.checkpoint_every < 1 or self.log_every < 1 or self.eval_every < 0 or self.stop_at < 0:
            raise ValueError("run needs checkpoint_every >= 1, log_every >= 1, eval_every >= 0, stop_at >= 0")


@dataclasses.dataclass
class ClipTrainConfig:
    """``ldm train-clip`` config: model, data, optimizer, run."""

    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)
    data: ClipDataConfig = dataclasses.field(default_factory=ClipDataConfig)
    optim: ClipOptimConfig = dataclasses.field(default_factory=ClipOptimConfig)
    run: ClipRunConfig = dataclasses.field(default_factory=ClipRunConfig)


def load_train_config(path: Optional[str], overrides: Sequence[str] = ()) -> ClipTrainConfig:
    config = load_config(ClipTrainConfig, path, overrides)
    if not config.data.folder:
        raise ValueError("data.folder is not set; give the captioned image folder in the config or as data.folder=DIR")
    return config
