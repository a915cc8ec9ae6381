"""The config sections every trainer shares: ``train`` (the loop), ``optim`` (AdamW and its
learning-rate rule) and ``checkpoint``, and ``ema`` for a trainer that keeps an EMA of its weights. A stage's config is these plus its own sections (model,
data, loss, ...); a stage that needs more loop settings subclasses ``RunConfig``.

One dialect for every stage: the run folder is ``train.output_dir``, full precision is ``fp32``,
the learning rate is ``optim.lr`` under ``optim.lr_scheduler``, checkpoints are ``checkpoint.every``
and ``checkpoint.keep_last``. Keys of the older per-trainer dialects are errors that name their new
key (``RENAMED``, read by ``train.run.config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


# Keys of the three trainers' earlier dialects -> the key that replaced them.
RENAMED = {
    "train.out_dir": "train.output_dir",
    "train.grad_accum": "train.gradient_accumulation_steps",
    "train.lr": "optim.lr",
    "train.lr_min": "optim.lr_min",
    "train.warmup_steps": "optim.warmup_steps",
    "train.adam_betas": "optim.betas",
    "train.weight_decay": "optim.weight_decay",
    "train.checkpoint_every": "checkpoint.every",
    "train.keep_checkpoints": "checkpoint.keep_last",
    "run": "train (the loop's section; run.output_dir is train.output_dir)",
    "run.output_dir": "train.output_dir",
    "run.seed": "train.seed",
    "run.mixed_precision": "train.mixed_precision (fp32 for no)",
    "run.threads": "train.num_threads",
    "run.checkpoint_every": "checkpoint.every",
    "run.keep_checkpoints": "checkpoint.keep_last",
    "run.eval_every": "validation.every",
    "run.log_every": "train.log_every",
    "run.stop_at": "train.stop_at",
    "run.context_layer": "train.context_layer",
    "run.cpu": "train.cpu",
    "run.progress": "train.progress",
    "optim.batch_size": "train.batch_size",
    "optim.grad_accum": "train.gradient_accumulation_steps",
    "optim.max_steps": "train.max_steps",
    "optim.grad_clip": "optim.max_grad_norm",
    "optim.beta1": "optim.betas",
    "optim.beta2": "optim.betas",
    "data.folder": "data.path",
    "data.test_fraction": "data.holdout_fraction",
    "data.hflip": "data.flip",
    "data.max_train": "data.max_images",
    "data.split": "data.holdout_fraction (every trainer holds out the same rows: train.data.split)",
}


MAX_STEPS = 10**8 - 1  # checkpoint folders are step-NNNNNNNN (train.run.checkpoint): eight digits


@dataclass
class RunConfig:
    """The loop: where it writes, batch, length, precision, threads, logging."""

    output_dir: str = "runs/run"  # the run folder: config.yaml, checkpoints/, logs/, and the trained model
    batch_size: int = 32  # samples per process per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 10000  # optimizer steps
    seed: int = 0  # initial weights, data order, augmentation and noise all follow from it
    # autocast: fp32 (none), bf16, fp16 (GPU only, with loss scaling), or auto: bf16 on GPUs that have it
    # (else fp16), and on a CPU whichever of bf16 and fp32 a probe measures faster (train.run.precision)
    mixed_precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # NHWC memory layout for the convolutions
    num_threads: Optional[int] = None  # CPU threads per process for torch (torch.set_num_threads); null = torch's default
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (no effect on a CPU)
    log_every: int = 10  # optimizer steps between log rows (averaged over them)

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.max_steps > MAX_STEPS:
            days = self.max_steps / 10 / 86400
            raise ValueError(f"train.max_steps={self.max_steps} is more steps than a run can count: checkpoints are "
                             f"named step-NNNNNNNN, so at most {MAX_STEPS} (and at 10 steps a second it would take "
                             f"{days:.0f} days); give fewer steps")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"train.num_threads={self.num_threads} must be >= 1 or null (torch's default)")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate rule (``train.run.lr``)."""

    lr: float = 1e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0  # clip the global gradient norm; null = no clipping
    # after warmup_steps of linear warm-up: constant, linear decay to lr_min, or cosine decay to lr_min
    # at train.max_steps ("constant" has no warm-up)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 500  # optimizer steps of linear warm-up
    lr_min: float = 0.0  # where linear and cosine decay end
    # AdamW kernel: fused (one kernel for all parameters), foreach (batched ops) or for-loop (per parameter).
    # Same maths; bench/bench_train.py measures them (fused is the fastest here and on GPUs).
    implementation: Literal["fused", "foreach", "for-loop"] = "fused"

    def __post_init__(self):
        if not self.lr > 0 or self.warmup_steps < 0 or not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"optim needs lr > 0, warmup_steps >= 0 and 0 <= lr_min <= lr; got lr={self.lr}, "
                             f"warmup_steps={self.warmup_steps}, lr_min={self.lr_min}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"optim.max_grad_norm={self.max_grad_norm} must be > 0 or null (no clipping)")


@dataclass
class CheckpointConfig:
    """Atomic training checkpoints (``train.run.checkpoint``): weights, optimizer, LR schedule, data
    position, RNG states."""

    every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3  # older checkpoints are deleted once a newer one is complete

    def __post_init__(self):
        if self.every < 1 or self.keep_last < 1:
            raise ValueError(f"checkpoint.every={self.every} and checkpoint.keep_last={self.keep_last} must be >= 1")


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights (diffusers' EMAModel); the bundle gets these."""

    enabled: bool = True
    decay: float = 0.9999  # the largest decay
    min_decay: float = 0.0
    update_after_step: int = 0  # optimizer steps before the average starts to move
    # warm-up: decay_n = 1 - (1 + n / inv_gamma) ** -power (on) or (1 + n) / (10 + n) (off), capped at decay
    warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 0.75  # 3/4 reaches 0.999 at 10k steps; 2/3 at 31.6k steps

    def __post_init__(self):
        if not 0 <= self.min_decay <= self.decay <= 1:
            raise ValueError(f"need 0 <= ema.min_decay <= ema.decay <= 1; got {self.min_decay}, {self.decay}")
