"""Training a small CLIP: open_clip's architecture and contrastive loss, on the run core.

    metrics = ClipTrainer(config).fit(resume="latest")     # or train(config, resume=...)

The model is ``open_clip.CLIP`` built from ``ClipModelConfig`` (a tiny ViT or ResNet image tower, a
small causal text transformer over CLIP's BPE tokens, context length 77) inside
``train.clip.model.ContrastivePair``; the loss is open_clip's ``ClipLoss`` (symmetric cross-entropy
over the batch's image-text similarities, learned temperature clamped at 100 as open_clip's trainer
does). Contrastive negatives are those of the micro-batch on its own process (no gather across
processes).

Everything else is the run core's, as in ``ldm train``: ``make_accelerator`` (precision, threads),
``open_run_folder``, AdamW with open_clip's weight-decay groups (``build_optimizer``) under the one
LR rule (``build_lr_scheduler``), the held-out rows of ``train.data.split`` (the same rows the VAE
and the U-Net of the data set hold out), the U-Net trainer's ``DataOrder`` (epoch e is a
permutation drawn from (seed, e); process r takes the r-th slice of each global batch), atomic
checkpoints (``train.run.checkpoint``: weights, optimizer, LR schedule, data position, every RNG
state incl. the augmentation generator, so a resumed run ends bitwise where an uninterrupted one
does) and the run log (logs/train.csv, logs/val.csv for held-out retrieval, logs/log.txt).

At the end the run folder is also a bundle: ``text_encoder/`` (the whole CLIP, image tower
included) and ``tokenizer/``, loadable with ``conditioning.load_text_encoder`` and
``conditioning.load_clip_scorer``; ``metrics.json`` holds held-out retrieval accuracy.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from conditioning.clip_model import build_open_clip_model
from conditioning.open_clip_backend import OpenCLIPTextEncoder
from train.clip.config import ClipTrainConfig
from train.clip.data import augment, load_pair_sets
from train.clip.eval import evaluate
from train.clip.model import ContrastivePair, param_groups
from ldm_io import write_text
from train.run import checkpoint as ckpt
from train.run.log import RunLog
from train.run.lr import build_lr_scheduler, build_optimizer
from train.run.order import DataOrder
from train.run.resume import OptimizerSettings
from train.run.start import make_accelerator, open_run_folder, start_run


class ClipTrainer:
    """Trains a CLIP from ``config.model`` on ``config.data``, writing into ``config.train.output_dir``."""

    def __init__(self, config: ClipTrainConfig):
        self.config = config
        self.output_dir = Path(config.train.output_dir)
        self.notes: list[str] = []  # messages from before the run log is open

    # -- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        from open_clip.loss import ClipLoss

        cfg, run = self.config, self.config.train
        acc = self.accelerator = make_accelerator(run, log=self.notes.append, cpu=run.cpu)
        torch.manual_seed(run.seed)  # the initial weights
        self.model_cfg = cfg.model.to_open_clip()
        clip = build_open_clip_model(self.model_cfg)
        module = ContrastivePair(clip)
        if run.channels_last:  # the image tower's patch (or ResNet) convolutions in NHWC
            module.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(param_groups(module, cfg.optim.weight_decay), cfg.optim)
        self.lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, run.max_steps)
        self.module, self.optimizer = acc.prepare(module, optimizer)  # the LR scheduler is stepped by hand
        self.unwrapped = acc.unwrap_model(self.module)
        self.loss_fn = ClipLoss()

        tokenizer = OpenCLIPTextEncoder(clip, self.model_cfg)  # tokenizes exactly as the saved encoder will
        self.train_set, self.heldout = load_pair_sets(cfg, tokenizer.tokenize, log=self.notes.append,
                                                      progress=run.progress and acc.is_main_process)
        self.order = DataOrder(np.arange(len(self.train_set)), run.batch_size, acc.num_processes, acc.process_index, run.seed)
        self.generator = torch.Generator().manual_seed(run.seed * 1_000_003 + 7919 * acc.process_index + 1)  # augmentation
        self.notes.append(f"train-clip: {len(self.train_set)} training pairs, {len(self.heldout)} held out; "
                          f"{sum(p.numel() for p in clip.parameters()) / 1e6:.2f}M parameters; "
                          f"precision {acc.precision}")

    # -- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def _batch_settings(self) -> dict:
        run = self.config.train
        return {"num_processes": self.accelerator.num_processes, "batch_size": run.batch_size,
                "gradient_accumulation_steps": run.gradient_accumulation_steps}

    def _save_checkpoint(self, pos: dict) -> None:
        from accelerate.utils import gather_object

        acc = self.accelerator
        rngs = gather_object([ckpt.rng_state({"augment": self.generator})])  # one per process, in rank order
        if acc.is_main_process:
            state = dict(pos, elapsed_s=time.time() - self.started, lr_scheduler=self.lr_scheduler.state_dict(),
                         rng=rngs, **self._batch_settings())
            ckpt.save_checkpoint(self.checkpoint_root, pos["step"], self.unwrapped, self.optimizer, state,
                                 keep_last=self.config.checkpoint.keep_last, log=self.log)  # skipped: weights not sane
        acc.wait_for_everyone()

    def _load_checkpoint(self, path: Path) -> dict:
        """Weights, optimizer (with this config's hyperparameters), LR schedule and random states from
        ``path``; returns the position. What differs from the checkpoint goes to ``self.resume_notes``."""
        settings = OptimizerSettings(self.optimizer, self.lr_scheduler)
        state = ckpt.load_checkpoint(path, self.unwrapped, self.optimizer)
        saved = {k: state.get(k) for k in self._batch_settings()}
        if saved != self._batch_settings():
            raise ValueError(f"checkpoint {path} was written with {saved}, this run has {self._batch_settings()}; "
                             "resume with the same settings (the data order and the result depend on them)")
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.resume_notes = settings.reapply(path)
        rng = ckpt.set_rng_state(state["rng"][self.accelerator.process_index], {"augment": self.generator})
        self.resume_notes += [ckpt.rng_warning(path, rng)] if rng else []
        return {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "elapsed_s")}

    # -- the loop --------------------------------------------------------------------------------

    def fit(self, resume: Optional[str] = None) -> dict[str, float]:
        """Train to ``train.max_steps`` (or stop after ``train.stop_at`` with a checkpoint), then write
        the text encoder, tokenizer and metrics.json; returns the final held-out retrieval metrics
        ({} when stopped early, and on processes other than the main one)."""
        from tqdm.auto import tqdm

        run = self.config.train
        checkpoint = open_run_folder(self.output_dir, resume)
        self._setup()
        acc = self.accelerator
        self.log, self.resume_notes = None, []
        pos = self._load_checkpoint(checkpoint) if checkpoint is not None else {
            "step": 0, "epoch": 0, "batch_in_epoch": 0, "elapsed_s": 0.0}
        self.started = time.time() - pos["elapsed_s"]
        log = self.log = start_run(acc, self.output_dir, self.config, checkpoint, pos["step"], show=run.progress,
                                   notes=self.notes)
        if acc.is_main_process:
            for note in self.resume_notes:
                ckpt.warn(note, log)
        stop = min(run.max_steps, run.stop_at or run.max_steps)
        bar = tqdm(total=run.max_steps, initial=pos["step"], desc="train-clip", unit="step",
                   disable=not (run.progress and acc.is_main_process))
        window = _new_window()
        self.module.train()
        try:
            with ckpt.resumable_writes(self.checkpoint_root):  # a full disk: one line naming the checkpoint to resume
                while pos["step"] < stop:
                    lr = self._optimizer_step(pos, window)
                    self._after_step(pos, lr, stop, window, log, bar)
                if pos["step"] < run.max_steps:
                    if log is not None:
                        log.message(f"train-clip: stopped at step {pos['step']} of {run.max_steps} (train.stop_at); "
                                    "continue with --resume latest")
                    return {}
                return self._finish(pos["step"], log)
        finally:
            bar.close()
            if log is not None:
                log.close()

    def _next_rows(self, pos: dict) -> torch.Tensor:
        """This process's training pairs for the next micro-batch; advances the position in the data."""
        if pos["batch_in_epoch"] >= self.order.batches_per_epoch:
            pos["epoch"], pos["batch_in_epoch"] = pos["epoch"] + 1, 0
        pos["batch_in_epoch"] += 1
        return torch.from_numpy(self.order.batch(pos["epoch"], pos["batch_in_epoch"] - 1))

    def _batch(self, rows: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented images (B, 3, S, S) in [0, 1] and the token ids (B, L) of their captions for ``epoch``."""
        acc, cfg = self.accelerator, self.config
        images = augment(self.train_set.images[rows].float() / 255, cfg.data, self.generator).to(acc.device)  # (B, 3, S, S)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, self.train_set.tokens(rows, epoch).to(acc.device)  # (B, L)

    def _optimizer_step(self, pos: dict, window: dict) -> float:
        """One optimizer step (micro-batches until accelerate syncs the gradients); returns its learning rate."""
        acc, cfg = self.accelerator, self.config
        lr = self.lr_scheduler.get_last_lr()[0]
        while True:
            rows = self._next_rows(pos)
            images, tokens = self._batch(rows, pos["epoch"])
            with acc.accumulate(self.module):
                with acc.autocast():
                    image_features, text_features, logit_scale = self.module(images, tokens)
                    loss = self.loss_fn(image_features.float(), text_features.float(), logit_scale.float())
                acc.backward(loss)
                if acc.sync_gradients and cfg.optim.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.module.parameters(), cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window["loss"] += loss.item()
            window["n"] += 1
            window["pairs"] += len(rows) * acc.num_processes
            if acc.sync_gradients:
                return lr

    def _after_step(self, pos: dict, lr: float, stop: int, window: dict, log: Optional[RunLog], bar) -> None:
        """Clamp the temperature, step the LR rule; logging, held-out retrieval and checkpoints when due."""
        cfg = self.config
        with torch.no_grad():
            self.unwrapped.clip.logit_scale.clamp_(0, math.log(100))
        self.lr_scheduler.step()
        pos["step"] += 1
        step = pos["step"]
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == stop:
            self._log_train(step, lr, window, log, bar)
        every = cfg.validation.every
        if every and step % every == 0 and step < cfg.train.max_steps:  # the final one is _finish's
            self._validate(step, log)
        if step % cfg.checkpoint.every == 0 or step == stop:
            self._save_checkpoint(pos)

    def _log_train(self, step: int, lr: float, window: dict, log: Optional[RunLog], bar) -> None:
        acc = self.accelerator
        stats = torch.tensor([window["loss"], float(window["n"])], device=acc.device)
        if acc.num_processes > 1:
            stats = acc.reduce(stats, "sum")
        now = time.time()
        loss, scale = float(stats[0] / stats[1]), self.unwrapped.clip.logit_scale.exp().item()
        rate = window["pairs"] / max(now - window["t0"], 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", T=f"{scale:.1f}", pairs_s=f"{rate:.0f}")
        if log is not None:
            log.scalars("train", step, {"loss": loss, "lr": lr, "logit_scale": scale, "pairs_per_s": rate,
                                        "elapsed_s": now - self.started})
        window.update(_new_window())

    # -- held-out retrieval and the end ------------------------------------------------------------

    def _validate(self, step: int, log: Optional[RunLog]) -> dict[str, float]:
        """Held-out retrieval (main process) -> logs/val.csv and a line in logs/log.txt."""
        acc = self.accelerator
        metrics: dict[str, float] = {}
        if acc.is_main_process:
            metrics = evaluate(self.unwrapped, self.heldout, self.config.train.batch_size, acc.autocast)
            if metrics:
                log.scalars("val", step, metrics)
                log.message(f"step {step}: held-out text->image top-1 {metrics['text_to_image_top1']:.3f} "
                            f"(chance {metrics['chance_text_to_image_top1']:.3f}), top-5 {metrics['text_to_image_top5']:.3f} "
                            f"(chance {metrics['chance_text_to_image_top5']:.3f}), n={int(metrics['n'])}")
        acc.wait_for_everyone()
        return metrics

    def _finish(self, step: int, log: Optional[RunLog]) -> dict[str, float]:
        """The final held-out retrieval; the run folder becomes a text encoder + tokenizer with metrics.json."""
        metrics = self._validate(step, log)
        if self.accelerator.is_main_process:
            encoder = OpenCLIPTextEncoder(self.unwrapped.clip, self.model_cfg, layer=self.config.train.context_layer)
            encoder.save_pretrained(self.output_dir)
            summary = {"step": step, "parameters": sum(p.numel() for p in self.unwrapped.clip.parameters()),
                       "train_seconds": round(time.time() - self.started, 1), **metrics}
            write_text(self.output_dir / "metrics.json", json.dumps(summary, indent=2))
            log.message(f"train-clip: wrote {self.output_dir / 'text_encoder'} and {self.output_dir / 'tokenizer'}")
        self.accelerator.wait_for_everyone()
        return metrics


def _new_window() -> dict:
    return {"loss": 0.0, "n": 0, "pairs": 0, "t0": time.time()}


def train(config: ClipTrainConfig, resume: Optional[str] = None) -> dict[str, float]:
    """Run (or continue) a training run; returns the final held-out retrieval metrics."""
    return ClipTrainer(config).fit(resume=resume)
