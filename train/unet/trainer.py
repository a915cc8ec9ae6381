"""The latent diffusion training loop (accelerate), shared by ``ldm train`` and ``ldm finetune``.

    trainer = LDMTrainer(config, unet=unet, autoencoder=ae, text_encoder=te, schedule=s, sampling=sc,
                         output_dir="runs/x")
    result = trainer.fit(resume="latest")      # -> TrainResult(step, bundle, ...)

The frozen autoencoder and text encoder build the cache (``train.unet.cache``) and draw validation
images; every training step reads only the cache. One optimizer step is
``gradient_accumulation_steps`` micro-batches of ``batch_size`` per process (accelerate's
``accumulate`` / ``backward`` / ``clip_grad_norm_``).

Data order: each epoch is a permutation of the training rows drawn from (seed, epoch) alone,
cut into global batches of ``num_processes * batch_size``; process r takes the r-th slice of
each, so processes see disjoint shards. With aspect-ratio buckets (``data.buckets``) every
micro-batch comes from one bucket (``train.run.order.BucketOrder``: a bucket's last, smaller batch
is kept). The position (epoch, micro-batch) is part of the checkpoint, and so is every random
state (python, numpy, torch, CUDA, and the step generator that draws t, the noise and the caption
dropout), so a resumed run continues exactly where the stopped one was.

A non-finite loss (any process) or gradient norm skips the optimizer step on every process and
is counted; ``max_consecutive_nonfinite`` of them in a row raise ``TrainingDiverged``. Skipped
steps leave the weights untouched, and no checkpoint is written during a run of them (one that
falls due waits for the next good step), so the latest checkpoint is from before the trouble. Nor is
one written from weights that are not sane (``train.run.checkpoint.weights_problem``: non-finite, or
huge, as weights that grew for a while before the loss overflowed): it is skipped with a warning.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import conditioning
from ldm_io import save_image
from ldm.pipeline import SamplingConfig, Text2ImagePipeline
from ldm.schedule import NoiseSchedule
from ldm.sweep_report import labelled_grid
from ldm.unet import FP32AttentionProcessor
from train.run import checkpoint as ckpt
from train.run.lr import build_lr_scheduler, build_optimizer
from train.run.order import BucketOrder, DataOrder
from train.run.resume import OptimizerSettings
from train.run.start import make_accelerator, open_run_folder, start_run
from train.run.config import save_config
from train.unet.cache import LatentCache, build_cache
from train.run.ema import build_ema, ema_state, load_ema_state
from train.unet.config import TrainingSections
from train.unet.objective import noised_batch, weighted_mse
from train.run.log import RunLog
from train.unet.validation import clip_score, heldout_loss, sample_images


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    epoch: int
    skipped_steps: int  # steps skipped for a non-finite loss or gradient
    bundle: Optional[Path]  # the model bundle written at the end (None when stopped early)
    checkpoint: Optional[Path]  # the last checkpoint written
    seen: list[int] = field(default_factory=list)  # cache rows this process trained on, in order


class LDMTrainer:
    """Trains ``unet`` (all of its parameters that require grad) on the cached data set.

    Args:
        config: the training sections (data, cache, objective, optim, train, ema, checkpoint, validation).
        unet: a diffusers UNet2DConditionModel (possibly carrying LoRA adapters).
        autoencoder, text_encoder: the frozen encoders (``vae.Autoencoder``, ``conditioning.TextEncoder``).
        schedule, sampling: the noise schedule and the conventions written to the bundle;
            ``sampling.prediction`` is the training objective's prediction type.
        output_dir: the run folder (checkpoints/, logs/, samples/, bundle/, config.json).
        saved_config: what to write as the run's config (defaults to ``config``).
        lora: whether ``unet`` carries a peft LoRA adapter; the bundle then stores it (pytorch_lora_weights.safetensors)
            next to the untouched base weights (``ldm.lora.AdapterBase``: read from ``unet`` itself, no copy).
        base: the bundle the model came from (fine-tuning): parts the bundle would store unchanged are
            copied from it as stored (``ldm.bundle.save_bundle``).
        scorer: a CLIP (``conditioning.ClipScorer``) that scores the validation images: ``clip_score`` of the
            validation prompts and ``base_clip_score`` of ``validation.base_prompts`` (fine-tuning) in val.csv.
    """

    def __init__(self, config: TrainingSections, *, unet, autoencoder, text_encoder, schedule: NoiseSchedule,
                 sampling: SamplingConfig, output_dir, saved_config=None, lora: bool = False, base=None,
                 scorer=None):
        if sampling.prediction not in ("eps", "v"):
            raise ValueError(f"prediction={sampling.prediction!r}; the trainer supports: eps, v")
        self.config = config
        self.unet, self.autoencoder, self.text_encoder = unet, autoencoder, text_encoder
        self.schedule, self.sampling = schedule, sampling
        self.output_dir = Path(output_dir)
        self.saved_config = saved_config if saved_config is not None else config
        self.lora, self.base = lora, base
        self.scorer = scorer
        self.notes: list[str] = []  # lines for the run log's start (a subclass's findings about the data)

    # -- setup ---------------------------------------------------------------------------------

    def _setup(self):
        cfg = self.config
        acc = self.accelerator = make_accelerator(cfg.train)
        self.device = acc.device
        for m in (self.autoencoder, self.text_encoder):
            if isinstance(m, torch.nn.Module):
                m.requires_grad_(False).eval().to(self.device)

        # the cache: built once by the main process, then read by all; bucket sides are multiples of what the U-Net takes
        granularity = Text2ImagePipeline(self.unet, self.autoencoder, self.text_encoder, self.schedule, self.sampling).granularity
        with acc.main_process_first():
            folder, built = build_cache(cfg.cache, cfg.data, self.autoencoder, self.text_encoder, self.device,
                                        progress=acc.is_main_process, granularity=granularity)
        self.cache = LatentCache(folder)
        self.cache_built = built
        self.empty = self.cache.empty.to(self.device)  # (1, L, D)

        unet = self.unet.to(self.device)
        if cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.train.channels_last:
            unet.to(memory_format=torch.channels_last)
        fp32_attention = cfg.train.fp32_attention
        if fp32_attention is None:
            fp32_attention = acc.precision == "bf16" and self.device.type == "cpu"
        if fp32_attention:
            unet.set_attn_processor(FP32AttentionProcessor())
        if cfg.train.compile:  # in place: the module keeps its parameter names (checkpoints, EMA, the bundle)
            from ldm.backends import compile_in_place

            compile_in_place(unet, self.device)
        unet.train()
        self.extra = self._extra_parameters()  # name -> parameter trained beside the U-Net (none here)
        self.param_names = [n for n, p in unet.named_parameters() if p.requires_grad] + list(self.extra)
        params = [p for p in unet.parameters() if p.requires_grad]
        if not params and not self.extra:
            raise ValueError("the U-Net has no trainable parameters")
        optimizer = build_optimizer([{"params": params}] + self._extra_groups(), cfg.optim)
        self.lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.model, self.optimizer = acc.prepare(unet, optimizer)  # the LR scheduler is stepped by hand, once per step
        self.params = [p for p in acc.unwrap_model(self.model).parameters() if p.requires_grad] + list(self.extra.values())
        self.ema = build_ema(cfg.ema, self.params) if cfg.ema.enabled else None
        self.generator = torch.Generator(self.device).manual_seed(cfg.train.seed * 1_000_003 + 7919 * acc.process_index + 1)
        order = DataOrder if self.cache.buckets is None else BucketOrder  # every micro-batch from one bucket
        rows = self.cache.train_indices if self.cache.buckets is None else self.cache.groups(self.cache.train_indices)
        self.order = order(rows, cfg.train.batch_size, acc.num_processes, acc.process_index, cfg.train.seed)

    def _extra_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Parameters trained beside the U-Net's, by checkpoint name (a subclass's: fine-tuning's text encoder)."""
        return {}

    def _extra_groups(self) -> list[dict]:
        """Optimizer param groups of ``self.extra`` (their own lr or weight decay)."""
        return [{"params": list(self.extra.values())}] if self.extra else []

    def _named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.accelerator.unwrap_model(self.model).named_parameters()) | self.extra

    def _contexts(self, rows: np.ndarray, epoch: int) -> torch.Tensor:
        """(B, L, D) the contexts of cache rows ``rows``' captions (the cached ones: a frozen text encoder)."""
        return self.cache.contexts(rows, epoch, self.config.train.seed).to(self.device)

    def _weights_changed(self) -> None:
        """The trained weights were swapped (EMA in or out): forget what was computed from the old ones."""
        if self.extra and hasattr(self.text_encoder, "clear_cache"):
            self.text_encoder.clear_cache()  # its cached empty-prompt context

    def _empty_context(self) -> torch.Tensor:
        """(1, L, D) the empty prompt's context, for caption dropout."""
        return self.empty

    # -- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def _save_checkpoint(self, pos: dict) -> Optional[Path]:
        from accelerate.utils import gather_object

        acc = self.accelerator
        rngs = gather_object([ckpt.rng_state({"step": self.generator})])  # one per process, in rank order
        path = None
        if acc.is_main_process:
            named = self._named_trainable()
            state = dict(pos, lr_scheduler=self.lr_scheduler.state_dict(), rng=rngs, num_processes=acc.num_processes,
                         batch_size=self.config.train.batch_size,
                         gradient_accumulation_steps=self.config.train.gradient_accumulation_steps)
            extra = {}
            if self.ema is not None:
                extra["ema"], state["ema"] = ema_state(self.ema, self.param_names)
            if acc.scaler is not None:  # fp16: the loss scale and its growth count, so a resumed run scales as this one
                state["grad_scaler"] = acc.scaler.state_dict()
            path = ckpt.save_checkpoint(self.checkpoint_root, pos["step"], {n: named[n] for n in self.param_names},
                                        self.optimizer, state, self.config.checkpoint.keep_last, extra=extra,
                                        log=self.log)  # None (with a warning) for weights not worth keeping
        acc.wait_for_everyone()
        return path

    def _load_checkpoint(self, path: Path) -> dict:
        """Weights, optimizer (with this config's hyperparameters), EMA, LR schedule and random states from
        ``path``; returns the position. What differs from the checkpoint goes to ``self.resume_notes``."""
        acc = self.accelerator
        state = json.loads((path / "state.json").read_text())
        run = self.config.train
        saved = (state["num_processes"], state["batch_size"], state["gradient_accumulation_steps"])
        if saved != (acc.num_processes, run.batch_size, run.gradient_accumulation_steps):
            raise ValueError(
                f"checkpoint {path} was written with (processes, batch_size, gradient_accumulation_steps) = {saved}, "
                f"this run has {(acc.num_processes, run.batch_size, run.gradient_accumulation_steps)}; "
                "resume with the same settings (the data order and the result depend on them)"
            )
        named = self._named_trainable()
        weights = ckpt.load_tensors(path / "model.safetensors")
        missing = [n for n in self.param_names if n not in weights]
        if missing:
            raise ValueError(f"checkpoint {path} lacks weights for {missing[0]} (and {len(missing) - 1} more); was it saved from another model?")
        with torch.no_grad():
            for n in self.param_names:
                named[n].copy_(weights[n])
        settings = OptimizerSettings(self.optimizer, self.lr_scheduler)
        ckpt.load_optimizer(path, self.optimizer)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.resume_notes = settings.reapply(path)
        if self.ema is not None:
            if not (path / "ema.safetensors").is_file():
                raise ValueError(f"checkpoint {path} has no EMA weights (ema.safetensors) but ema.enabled is true")
            load_ema_state(self.ema, self.param_names, ckpt.load_tensors(path / "ema.safetensors"), state["ema"])
        if acc.scaler is not None and "grad_scaler" in state:
            acc.scaler.load_state_dict(state["grad_scaler"])
        rng = ckpt.rng_warning(path, ckpt.set_rng_state(state["rng"][acc.process_index], {"step": self.generator}))
        self.resume_notes += [rng] if rng else []
        return {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "skipped_steps", "nonfinite_streak")}

    # -- validation ------------------------------------------------------------------------------

    def _pipeline(self) -> Text2ImagePipeline:
        unwrapped = self.accelerator.unwrap_model(self.model)
        pipe = Text2ImagePipeline(unwrapped, self.autoencoder, self.text_encoder, self.schedule, self.sampling,
                                  sample_size=self.cache.sample_size)
        pipe.device = self.device
        return pipe

    @torch.no_grad()
    def _validate(self, step: int, log: RunLog) -> dict:
        """Held-out loss (raw and EMA weights), the EMA sample grid and, with a scorer, the CLIP scores of the
        validation prompts and of the base prompts (one line in the log); main process only."""
        cfg, acc = self.config, self.accelerator
        unwrapped = acc.unwrap_model(self.model)
        unwrapped.eval()

        def model(z, t, ctx):
            return unwrapped(z, t, encoder_hidden_states=ctx).sample

        loss_kw = dict(prediction=self.sampling.prediction, batch_size=cfg.train.batch_size,
                       max_batches=cfg.validation.heldout_batches, device=self.device, autocast=acc.autocast)
        if self.extra:  # a text encoder in training: contexts from its current weights
            loss_kw["contexts"] = lambda rows: self._contexts(rows, 0)
        values = {"loss": heldout_loss(model, self.cache, self.cache.heldout_indices, self.schedule, **loss_kw)}
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        self._weights_changed()
        try:
            if self.ema is not None:
                values["loss_ema"] = heldout_loss(model, self.cache, self.cache.heldout_indices, self.schedule, **loss_kw)
            grid = None
            v = cfg.validation
            draw = dict(steps=v.steps, guidance=v.guidance, batch_size=v.batch_size)
            if v.prompts:
                result = sample_images(self._pipeline(), v.prompts, v.seeds, **draw)
                grid = labelled_grid(result)
                if self.scorer is not None:
                    values["clip_score"] = clip_score(result, self.scorer)
            base = getattr(v, "base_prompts", None)  # fine-tuning: the base model's own prompts
            if base and self.scorer is not None:
                values["base_clip_score"] = clip_score(sample_images(self._pipeline(), base, v.base_seeds, **draw), self.scorer)
        finally:
            if self.ema is not None:
                self.ema.restore(self.params)
            self._weights_changed()
            unwrapped.train()
        log.scalars("val", step, values)
        log.message(f"validation at step {step}: " + ", ".join(f"{k} {val:.4g}" for k, val in values.items()))
        if grid is not None:
            samples = self.output_dir / "samples"
            samples.mkdir(parents=True, exist_ok=True)
            save_image(grid, samples / f"step-{step:08d}.png")
            log.image("val/samples", step, grid)
        return values

    # -- the bundle ------------------------------------------------------------------------------

    def _save_bundle(self) -> Path:
        from ldm.bundle import save_bundle

        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ema is not None:  # the bundle gets the EMA weights; the trained ones come back afterwards
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        self._weights_changed()
        unwrapped.eval()
        unwrapped.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
        try:
            parts = dict(autoencoder=self.autoencoder, text_encoder=self.text_encoder, schedule=self.schedule,
                         sampling=self.sampling, base=self.base)
            if self.lora:
                from ldm.lora import AdapterBase

                path = save_bundle(self.output_dir / "bundle", unet=AdapterBase(unwrapped), unet_lora=unwrapped, **parts)
            else:
                path = save_bundle(self.output_dir / "bundle", unet=unwrapped, **parts)
            save_config(self.saved_config, path / "training_config.yaml")
        finally:
            if self.ema is not None:
                self.ema.restore(self.params)
            self._weights_changed()
            if self.config.train.channels_last:
                unwrapped.to(memory_format=torch.channels_last)
            unwrapped.train()
        return path

    # -- the loop --------------------------------------------------------------------------------

    def fit(self, resume: Optional[str] = None, stop_at_step: Optional[int] = None, record_rows: bool = False) -> TrainResult:
        """Train to ``train.max_steps`` (or stop after ``stop_at_step``), then write the bundle.

        Args:
            resume: ``"latest"`` or a checkpoint folder; None starts afresh (refused in a folder that
                already holds checkpoints).
            stop_at_step: stop after this optimizer step (its checkpoint written first when due),
                as if the process had been killed there; no bundle is written.
            record_rows: keep the cache rows this process trained on in ``TrainResult.seen``.
        """
        checkpoint = open_run_folder(self.output_dir, resume)
        self._setup()
        acc, run = self.accelerator, self.config.train
        self.log, self.resume_notes = None, []
        pos = self._load_checkpoint(checkpoint) if checkpoint is not None else {
            "step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0, "nonfinite_streak": 0}
        log = self.log = start_run(acc, self.output_dir, self.saved_config, checkpoint, pos["step"], notes=self.notes)
        if acc.is_main_process:
            for note in self.resume_notes:
                ckpt.warn(note, log)
        self.last_checkpoint, self.checkpoint_due = checkpoint, False
        seen: Optional[list[int]] = [] if record_rows else None
        bar = None
        if acc.is_main_process:
            from tqdm import tqdm

            bar = tqdm(total=run.max_steps, initial=pos["step"], desc="train", unit="step")
        if pos["step"] == 0 and self.config.validation.at_start:  # the starting point every later validation is read against
            if acc.is_main_process:
                self._validate(0, log)
            acc.wait_for_everyone()
        sums = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "cpu0": time.process_time(), "images": 0, "steps": 0}
        try:
            with ckpt.resumable_writes(self.checkpoint_root):  # a full disk: one line naming the checkpoint to resume
                while pos["step"] < run.max_steps:
                    problem = self._optimizer_step(pos, sums, seen)
                    self._after_step(pos, problem, sums, log, bar)
                    if stop_at_step is not None and pos["step"] >= stop_at_step:
                        break
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        bundle = None
        if pos["step"] >= run.max_steps:
            if acc.is_main_process:
                with ckpt.resumable_writes(self.checkpoint_root):
                    bundle = self._save_bundle()
            acc.wait_for_everyone()
        return TrainResult(pos["step"], pos["epoch"], pos["skipped_steps"], bundle, self.last_checkpoint, seen or [])

    def _next_rows(self, pos: dict) -> np.ndarray:
        """This process's cache rows for the next micro-batch; advances the position in the data."""
        if pos["batch_in_epoch"] >= self.order.batches_per_epoch:
            pos["epoch"] += 1
            pos["batch_in_epoch"] = 0
        rows = self.order.batch(pos["epoch"], pos["batch_in_epoch"])
        pos["batch_in_epoch"] += 1
        return rows

    def _loss(self, rows: np.ndarray, epoch: int) -> torch.Tensor:
        """The objective on cache rows ``rows``: caption dropout, noise, one U-Net call."""
        cfg, acc = self.config, self.accelerator
        z0 = self.cache.latents(rows).to(self.device)  # (B, C, h, w)
        ctx = self._contexts(rows, epoch)  # (B, L, D)
        if cfg.train.channels_last:
            z0 = z0.contiguous(memory_format=torch.channels_last)
        ctx = conditioning.apply_caption_dropout(ctx, self._empty_context(), cfg.objective.p_uncond, self.generator)  # (B, L, D)
        batch = noised_batch(z0, self.schedule, prediction=self.sampling.prediction,
                             min_snr_gamma=cfg.objective.min_snr_gamma, noise_offset=cfg.objective.noise_offset,
                             generator=self.generator)
        with acc.autocast():
            pred = self.model(batch.z_t, batch.t, encoder_hidden_states=ctx).sample  # (B, C, h, w)
        return weighted_mse(pred, batch)

    def _optimizer_step(self, pos: dict, sums: dict, seen: Optional[list[int]]) -> Optional[str]:
        """One optimizer step: micro-batches until accelerate syncs the gradients, then clip and step.

        Returns None, or what was non-finite ("loss" or "gradient"); then the weights are left as they
        were (under fp16 the GradScaler skips inf gradients itself).
        """
        acc = self.accelerator
        window_bad = False
        while True:
            rows = self._next_rows(pos)
            if seen is not None:
                seen.extend(int(r) for r in rows)
            with acc.accumulate(self.model):
                loss = self._loss(rows, pos["epoch"])
                bad = not bool(torch.isfinite(loss))
                if acc.num_processes > 1:  # every process must take the same branch
                    bad = bool(acc.reduce(torch.tensor([float(bad)], device=self.device), "sum") > 0)
                if bad:
                    window_bad = True
                else:
                    acc.backward(loss)
                    sums["loss"] += float(loss.detach())
                    sums["n"] += 1
                if acc.sync_gradients:
                    grad_norm = float("nan")
                    if acc.num_processes > 1:  # DDP averages the U-Net's gradients; the extra parameters' too
                        for p in self.extra.values():
                            if p.grad is not None:
                                p.grad = acc.reduce(p.grad, "mean")
                    if not window_bad:
                        max_norm = self.config.optim.max_grad_norm or float("inf")
                        grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
                    grads_ok = not window_bad and math.isfinite(grad_norm)
                    if grads_ok or (acc.precision == "fp16" and not window_bad):
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            sums["images"] += len(rows) * acc.num_processes
            if acc.sync_gradients:
                return None if grads_ok else ("loss" if window_bad else "gradient")

    def _after_step(self, pos: dict, problem: Optional[str], sums: dict, log: Optional[RunLog], bar) -> None:
        """Count the step; EMA, the non-finite streak, logging, checkpoints and validation."""
        cfg, acc, run = self.config, self.accelerator, self.config.train
        self.lr_scheduler.step()
        pos["step"] += 1
        sums["steps"] += 1
        step = pos["step"]
        if problem:
            pos["skipped_steps"] += 1
            pos["nonfinite_streak"] += 1
            acc.print(f"step {step}: non-finite {problem}; step skipped "
                      f"({pos['nonfinite_streak']} in a row, {pos['skipped_steps']} in all)")
        else:
            pos["nonfinite_streak"] = 0
            if self.ema is not None:
                self.ema.step(self.params)
        if pos["nonfinite_streak"] >= run.max_consecutive_nonfinite:
            good = (ckpt.list_checkpoints(self.checkpoint_root) or [None])[-1]
            raise TrainingDiverged(
                f"training stopped at step {step}: {pos['nonfinite_streak']} non-finite losses in a row "
                f"(train.max_consecutive_nonfinite={run.max_consecutive_nonfinite}). The last good checkpoint is "
                f"{good if good else '(none written yet)'}; lower optim.lr, set optim.max_grad_norm, or try "
                "train.mixed_precision=fp32, then resume from it."
            )
        if bar is not None:
            bar.update(1)
        if step % run.log_every == 0 or step == run.max_steps:
            self._log_train(step, pos, sums, log, bar)
        busy, busy_cpu = time.perf_counter(), time.process_time()  # checkpoints and validation do not count in the speed
        # a checkpoint due during a run of non-finite steps waits for the next good step
        self.checkpoint_due = self.checkpoint_due or step % cfg.checkpoint.every == 0 or step == run.max_steps
        if self.checkpoint_due and pos["nonfinite_streak"] == 0:
            self.last_checkpoint = self._save_checkpoint(pos) or self.last_checkpoint
            self.checkpoint_due = False
        every = cfg.validation.every
        if (every and step % every == 0) or step == run.max_steps:
            if acc.is_main_process:
                self._validate(step, log)
            acc.wait_for_everyone()
        sums["t0"] += time.perf_counter() - busy
        sums["cpu0"] += time.process_time() - busy_cpu

    def _log_train(self, step: int, pos: dict, sums: dict, log: Optional[RunLog], bar) -> None:
        acc = self.accelerator
        stats = torch.tensor([sums["loss"], float(sums["n"])], device=self.device)
        if acc.num_processes > 1:
            stats = acc.reduce(stats, "sum")
        elapsed, cpu = time.perf_counter() - sums["t0"], time.process_time() - sums["cpu0"]
        loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
        values = {"loss": loss, "lr": self.lr_scheduler.get_last_lr()[0], "epoch": pos["epoch"],
                  "images_per_s": sums["images"] / elapsed if elapsed > 0 else float("nan"),
                  "step_s": elapsed / sums["steps"],  # wall-clock seconds per optimizer step
                  "cpu_s": cpu / sums["steps"],  # this process's CPU seconds per step, all its threads
                  "skipped_steps": pos["skipped_steps"]}
        if log is not None:
            log.scalars("train", step, values)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{values['images_per_s']:.1f}")
        sums.update(loss=0.0, n=0, t0=time.perf_counter(), cpu0=time.process_time(), images=0, steps=0)


def train_from_config(config, *, resume: Optional[str] = None, autoencoder=None, text_encoder=None,
                      stop_at_step: Optional[int] = None, record_rows: bool = False) -> TrainResult:
    """``ldm train``: a fresh U-Net from ``config.model`` on the frozen encoders of ``config.encoders``
    (or the ``autoencoder`` / ``text_encoder`` objects given), trained by ``LDMTrainer``."""
    trainer = build_trainer(config, autoencoder=autoencoder, text_encoder=text_encoder)
    return trainer.fit(resume=resume, stop_at_step=stop_at_step, record_rows=record_rows)


def build_trainer(config, *, autoencoder=None, text_encoder=None) -> LDMTrainer:
    """The trainer of ``train_from_config``: encoders loaded, U-Net built from ``config.model``."""
    from accelerate.utils import set_seed

    from ldm.unet import build_unet

    if autoencoder is None:
        import vae

        if not config.encoders.autoencoder:
            raise ValueError("encoders.autoencoder is empty; give the folder of a trained autoencoder, e.g. encoders.autoencoder=runs/vae/final")
        autoencoder = vae.load_autoencoder(config.encoders.autoencoder)
    if text_encoder is None:
        if not config.encoders.text_encoder:
            raise ValueError("encoders.text_encoder is empty; give a folder holding text_encoder/ and tokenizer/, e.g. encoders.text_encoder=runs/clip/final")
        text_encoder = conditioning.load_text_encoder(config.encoders.text_encoder)
    f = autoencoder.downsample_factor
    if config.data.resolution == 0 or config.data.resolution % f:
        raise ValueError(f"data.resolution={config.data.resolution} must be a multiple of the autoencoder's downsampling factor {f}")
    set_seed(config.train.seed)  # the U-Net's initial weights
    unet = build_unet(config.model, latent_channels=autoencoder.latent_channels, sample_size=config.data.resolution // f,
                      cross_attention_dim=text_encoder.context_dim)
    schedule = NoiseSchedule(**asdict(config.schedule))
    sampling = SamplingConfig(prediction=config.objective.prediction or "eps")
    return LDMTrainer(config, unet=unet, autoencoder=autoencoder, text_encoder=text_encoder, schedule=schedule,
                      sampling=sampling, output_dir=config.train.output_dir)
