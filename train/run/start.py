"""Starting a run, the same for every trainer: the accelerator (device, precision, threads), the
run folder (a fresh one, or the checkpoint to resume from), its config.yaml and its log.

    accelerator = make_accelerator(config.train, log=print)
    checkpoint = open_run_folder(config.train.output_dir, resume, accelerator.is_main_process)
    ...                                            # build the models; load ``checkpoint``: its step
    log = start_run(accelerator, config.train.output_dir, config, checkpoint, step)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from train.run import checkpoint as ckpt
from train.run.config import save_config
from train.run.log import RunLog
from train.run.sections import RunConfig


def make_accelerator(run: RunConfig, *, log: Callable[[str], None] = print, cpu: bool = False):
    """accelerate's Accelerator for ``run``: precision resolved (``auto`` probed once), threads set,
    TF32 on Ampere+ GPUs as ``run.allow_tf32`` says. Several processes without a GPU run gloo on the CPU.

    Refuses what the checkpoints cannot hold (DeepSpeed, FSDP: sharded optimizer states) and fp16
    on a CPU (loss scaling needs a GPU).
    """
    from accelerate import Accelerator

    from train.run.precision import resolve_mixed_precision

    if run.num_threads is not None:
        torch.set_num_threads(run.num_threads)
    # several processes and no GPU (torchrun, or accelerate launch --multi_gpu on a CPU machine): gloo on CPU
    cpu = cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    precision = resolve_mixed_precision(run.mixed_precision, device, log=log)
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("train.mixed_precision=fp16 needs a GPU (loss scaling); on a CPU use auto, bf16 or fp32")
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision),
                              gradient_accumulation_steps=run.gradient_accumulation_steps, cpu=cpu)
    kind = accelerator.distributed_type.value
    if kind != "NO" and not kind.startswith("MULTI_"):  # DEEPSPEED, FSDP, XLA, MEGATRON_LM
        raise ValueError(
            f"accelerate's {kind} is not supported: the checkpoints hold full, unsharded "
            "optimizer states; launch plain data parallel instead (accelerate launch --multi_gpu)"
        )
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = run.allow_tf32
        torch.backends.cudnn.allow_tf32 = run.allow_tf32
    accelerator.precision = precision  # what "auto" became: "fp32", "bf16" or "fp16"
    return accelerator


def open_run_folder(output_dir: str | os.PathLike, resume: Optional[str], is_main_process: bool = True) -> Optional[Path]:
    """The checkpoint to resume from (None for a fresh run), after clearing what a killed process left.

    A fresh run into a folder that already holds checkpoints is refused: it would mix two runs.
    """
    root = Path(output_dir) / "checkpoints"
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(f"train.output_dir={output_dir} is a file; give a folder for the run")
    if is_main_process:
        ckpt.remove_partial(root)
    if resume is None:
        if ckpt.list_checkpoints(root):
            raise ValueError(f"{output_dir} already holds checkpoints of a run; continue it with --resume latest "
                             "or choose another train.output_dir")
        return None
    return ckpt.resolve_resume(resume, root)


def start_run(accelerator, output_dir: str | os.PathLike, config, checkpoint: Optional[Path], step: int, *,
              show: bool = True, notes: Sequence[str] = ()) -> Optional[RunLog]:
    """The run folder made, the config the run uses written into it as config.yaml, and its log opened
    (truncated after ``step`` when resuming from ``checkpoint``) with ``notes`` and the resume in it.
    The log on the main process, None on the others; every process waits until the folder is there."""
    log = None
    if accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_config(config, Path(output_dir) / "config.yaml")
        log = RunLog(Path(output_dir) / "logs", resume_step=step if checkpoint is not None else None, show=show)
        for note in notes:
            log.message(note)
        if checkpoint is not None:
            log.message(f"resumed from {checkpoint} at step {step}")
    accelerator.wait_for_everyone()
    return log
