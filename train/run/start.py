"""Starting a run, the same for every trainer: the accelerator (device, precision, threads), the
run folder (a fresh one, or the checkpoint to resume from), its config.yaml and its log.

    accelerator = make_accelerator(config.train, log=print)
    checkpoint = open_run_folder(config.train.output_dir, resume, accelerator.is_main_process)
    ...                                            # build the models; load ``checkpoint``: its step
    log = start_run(accelerator, config.train.output_dir, config, checkpoint, step)
"""

from __future__ import annotations

import os
import re
import shutil
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


# What the trainers write into a run folder (start_run, the checkpoints, each stage's result): an earlier
# run holding these names and nothing else is what --overwrite may replace.
RUN_ENTRIES = ("config.yaml", "logs", "checkpoints", "samples", "bundle", "vae", "text_encoder", "tokenizer",
               "metrics.json", "eval-vae.png")
OPTION = "train.output_dir"
STARTED_ONLY = ("config.yaml", "logs", "checkpoints")  # no complete checkpoint (checked first), no result


def check_run_folder(output_dir: str | os.PathLike, resume: Optional[str], *, command: str = "the trainer",
                     overwrite: bool = False, inputs: Sequence[Optional[str | os.PathLike]] = (),
                     models: Sequence[Optional[str | os.PathLike]] = ()) -> bool:
    """Whether ``output_dir`` may hold this run; raises ValueError (one line) when not. True when it holds
    an earlier run that ``overwrite`` replaces.

    A fresh run needs a new or empty folder, or one where a run stopped before its first checkpoint and
    result (only its config.yaml and logs); one holding a run needs ``resume`` (continue) or ``overwrite``
    (replace: only a folder that holds nothing but a run's files, and no input). A folder of other files
    is refused either way; so is an output folder that is an input (``inputs``: data, cache; ``models``:
    encoders, the bundle fine-tuned, which may not hold it either), or holds one when replaced, a
    file where the folder should be, and a place that cannot be written (tried, not guessed).
    """
    from ldm_io.outputs import check_inputs, check_location, check_replaceable, earlier_output, entries

    out = Path(output_dir)
    if resume is not None and overwrite:
        raise ValueError(f"--resume continues the run in {out} and --overwrite replaces it; give one of them")
    check_location(out, option=OPTION, folder=True)
    check_inputs(out, inputs, option=OPTION, holding=not overwrite, sealed=models)
    if not out.is_dir() or not entries(out):
        return False
    if resume is not None:
        if resume != "latest" and not (out / "config.yaml").is_file() and not (out / "checkpoints").is_dir():
            raise ValueError(f"{OPTION}={out} is not empty and holds no run to continue; "
                             f"choose a new or empty {OPTION}")
        return False  # latest: the folder's checkpoints say (resolve_resume names a folder without any)
    if ckpt.list_checkpoints(out / "checkpoints") and not overwrite:
        raise ValueError(f"{out} already holds checkpoints of a run; continue it with --resume latest, "
                         f"replace it with --overwrite, or choose another {OPTION}")
    ours, why = earlier_output(out, command=command, known=RUN_ENTRIES, signature=("config.yaml",))
    if not ours:
        raise ValueError(f"{OPTION}={out} {why}")
    if set(entries(out)) <= set(STARTED_ONLY):
        return False  # a run that stopped before its first checkpoint (an error in the data, say): started again
    if not overwrite:
        raise ValueError(f"{OPTION}={out} holds an earlier run (no checkpoint left to resume); "
                         f"replace it with --overwrite, or choose another {OPTION}")
    check_replaceable(out, option=OPTION)
    return True


def claim_run_folder(output_dir: str | os.PathLike, resume: Optional[str], *, command: str, overwrite: bool = False,
                     inputs: Sequence[Optional[str | os.PathLike]] = (),
                     models: Sequence[Optional[str | os.PathLike]] = ()) -> None:
    """The CLIs' check of ``train.output_dir`` before anything is loaded (``check_run_folder``); with
    ``overwrite``, an earlier run there is removed now. Only on the first process of a distributed launch."""
    from ldm_io.outputs import is_main_process, remove_output

    if is_main_process() and check_run_folder(output_dir, resume, command=command, overwrite=overwrite,
                                                 inputs=inputs, models=models):
        remove_output(output_dir)


def open_run_folder(output_dir: str | os.PathLike, resume: Optional[str], is_main_process: bool = True) -> Optional[Path]:
    """The checkpoint to resume from (None for a fresh run), after clearing what a killed process left.

    The folder is checked first (``check_run_folder``, on the main process): a fresh run into a folder
    that already holds a run, or other files, is refused: it would mix two runs or replace files.
    """
    from ldm_io.outputs import is_main_process as first_process

    root = Path(output_dir) / "checkpoints"
    if is_main_process and first_process():
        check_run_folder(output_dir, resume)
        ckpt.remove_partial(root)
        remove_leftovers(output_dir)
    if resume is None:
        return None
    return ckpt.resolve_resume(resume, root)


# What a process killed while writing a run's product leaves beside it: ldm_io's temporary and set-aside
# folders and files (.bundle.<8 hex>.tmp, .vae.<8 hex>.old, .config.yaml.<8 hex>.tmp, ...).
_LEFTOVER = re.compile(r"^\.(bundle|vae|text_encoder|tokenizer|samples|config\.yaml|metrics\.json)\.[0-9a-f]{8}\.(tmp|old)$")


def remove_leftovers(output_dir: str | os.PathLike) -> None:
    """Delete the temporary files and folders of writes into the run folder that a killed process left."""
    folder = Path(output_dir)
    for p in (folder.iterdir() if folder.is_dir() else ()):
        if not _LEFTOVER.match(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


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
