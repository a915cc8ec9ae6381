"""The autoencoder training loop (``ldm train-vae``) on the run core (``train.run``): reconstruction,
codebook, perceptual and GAN losses, codebook health, and the final ``vae/`` folder with its scaling factor.

    folder = train_vae(config, resume="latest")       # -> the vae/ folder (None when stopped early)

Run folder (``train.output_dir``):

    config.yaml                 the resolved config of the run
    logs/train.csv              step, loss, psnr, codebook_usage, perplexity, lr, restarted_codes, steps_per_s,
                                elapsed_s (every ``train.log_every`` steps); TensorBoard events beside it
    logs/log.txt                messages: the data, LPIPS and discriminator on or off, resumes, the scaling factor
    checkpoints/step-NNNNNNNN/  the one checkpoint format (``train.run.checkpoint``): model.safetensors (the
                                autoencoder), optimizer.safetensors, codebook.safetensors (VQ: the codebook
                                trainer's buffers), discriminator.safetensors and discriminator_optimizer.safetensors
                                (GAN on), state.json (step, position in the data, RNG states, LR schedule, config)
    vae/                        the final autoencoder, diffusers layout, scaling_factor set

Data: the training rows of ``train.data.split`` (the held-out rule every trainer shares), decoded once into
a uint8 tensor. Each epoch is the U-Net trainer's ``DataOrder``: a permutation drawn from (seed, epoch),
process r taking the r-th slice of each global batch. Micro-batch m draws its flips, and the codebook's
k-means init and restarts, from a generator seeded by (seed, m); the position m and every global RNG
state are in the checkpoint, so a resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from train.run import checkpoint as ckpt
from train.run.config import to_dict
from train.run.log import RunLog
from train.run.lr import build_lr_scheduler, build_optimizer
from train.run.order import DataOrder
from train.run.resume import OptimizerSettings
from train.run.start import make_accelerator, open_run_folder, start_run
from train.vae.config import VAETrainingConfig
from train.vae.images import load_vae_split, pixels, to_model_range
from vae.autoencoder import Autoencoder, build_autoencoder, compute_scaling_factor
from vae.losses import adaptive_weight, build_discriminator, gan_active, hinge_d_loss, hinge_g_loss, reconstruction_loss
from vae.lpips import LPIPS
from vae.metrics import psnr, to_unit
from vae.vq import CodebookTrainer

CODEBOOK = "codebook"  # <name>.safetensors in a checkpoint
DISCRIMINATOR = "discriminator"
DISCRIMINATOR_OPTIMIZER = "discriminator_optimizer"

# Config keys that change the shapes or the set of tensors in a checkpoint, or the data order.
_STATE_KEYS = {"quantizer": ("update",), "loss": ("disc_weight", "disc_layers", "disc_channels"),
               "train": ("batch_size", "gradient_accumulation_steps")}


def check_compatible(checkpoint: Path, config: VAETrainingConfig, num_processes: int = 1) -> dict:
    """The checkpoint's state.json, after checking it was written for the same architecture (every model
    key but scaling_factor), codebook update, discriminator, batch settings and number of processes."""
    state = json.loads((checkpoint / "state.json").read_text())
    saved, ours = state.get("config", {}), to_dict(config)
    keys = {"model": [k for k in ours["model"] if k != "scaling_factor"], **_STATE_KEYS}
    diff = [f"{section}.{k} is {saved.get(section, {}).get(k)!r} there but {ours[section][k]!r} here"
            for section, names in keys.items() for k in names if saved.get(section, {}).get(k) != ours[section][k]]
    if state.get("num_processes") != num_processes:
        diff.append(f"num_processes is {state.get('num_processes')!r} there but {num_processes} here")
    if diff:
        raise ValueError(f"checkpoint {checkpoint / 'state.json'} was written for a different setup: " + "; ".join(diff))
    return state


def expected_files(config: VAETrainingConfig) -> list[str]:
    """The files a checkpoint of ``config``'s run holds."""
    names = ["model", "optimizer"] + ([CODEBOOK] if config.model.kind == "vq" else [])
    names += [DISCRIMINATOR, DISCRIMINATOR_OPTIMIZER] if build_discriminator(config.loss) is not None else []
    return [f"{name}.safetensors" for name in names] + ["state.json"]


class VAETrainer:
    """Trains the autoencoder ``config`` describes; ``fit`` runs it."""

    def __init__(self, config: VAETrainingConfig, progress: bool = True):
        self.config, self.progress = config, progress
        self.output_dir = Path(config.train.output_dir)
        self.log: Optional[RunLog] = None

    def message(self, text: str) -> None:
        if self.log is not None:
            self.log.message(text)

    # -- setup ---------------------------------------------------------------------------------

    def _open(self, resume: Optional[str]) -> tuple[Optional[Path], Optional[dict]]:
        """Accelerator, run folder, config.yaml and the run log; the checkpoint to resume and its state."""
        cfg = self.config
        quiet = not self.progress
        acc = self.accelerator = make_accelerator(cfg.train, log=(lambda _: None) if quiet else print)
        checkpoint = open_run_folder(self.output_dir, resume, acc.is_main_process)
        state = check_compatible(checkpoint, cfg, acc.num_processes) if checkpoint is not None else None
        self.log = start_run(acc, self.output_dir, cfg, checkpoint, state["step"] if state else 0, show=not quiet)
        return checkpoint, state

    def _setup_data(self) -> None:
        """The training rows of the held-out rule, decoded once; their order."""
        cfg, acc = self.config, self.accelerator
        size = cfg.model.resolution if cfg.model.resize_input else None
        split = load_vae_split(cfg.data.path, cfg.data.holdout_fraction, size, progress=self.progress and acc.is_main_process,
                               allow_outside_paths=cfg.data.allow_outside_paths)
        rows = split.train_rows[: cfg.data.max_images or None]
        self.images = pixels(split.train, rows)  # (N, 3, H, W) uint8
        self.order = DataOrder(np.arange(len(self.images)), cfg.train.batch_size, acc.num_processes, acc.process_index,
                               cfg.train.seed)
        self.message(split.summary())

    def _setup_models(self) -> None:
        """Autoencoder, codebook trainer, LPIPS, discriminator, optimizers and the LR schedule."""
        from accelerate.utils import set_seed

        cfg, acc = self.config, self.accelerator
        set_seed(cfg.train.seed)  # the initial weights
        autoencoder = build_autoencoder(cfg.model)
        autoencoder.check_images(self.images[:1].float())  # sizes not divisible by f: a clear error here, not in a conv
        model = autoencoder.model
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        broadcast = (lambda x: torch.distributed.broadcast(x, 0)) if acc.num_processes > 1 else None
        self.reduce = (lambda x: acc.reduce(x, "sum")) if acc.num_processes > 1 else None
        self.codebook = CodebookTrainer(model.quantize.embedding, cfg.quantizer, broadcast) if autoencoder.kind == "vq" else None
        self.lpips = None
        if cfg.loss.lpips_weights:
            self.lpips = LPIPS(cfg.loss.lpips_weights, cfg.loss.vgg_weights).to(acc.device)
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
        self.lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)  # the LR scheduler is stepped by hand, once per step
        self.unwrapped = acc.unwrap_model(self.model)
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        self.discriminator = build_discriminator(cfg.loss)
        if self.discriminator is not None:  # Adam(0.5, 0.9) at a constant loss.disc_lr, as VQGAN's
            d_optim = dataclasses.replace(cfg.optim, lr=cfg.loss.disc_lr, betas=(0.5, 0.9), weight_decay=0.0, lr_min=0.0)
            d_optimizer = build_optimizer(self.discriminator.parameters(), d_optim)
            self.discriminator, self.d_optimizer = acc.prepare(self.discriminator, d_optimizer)
        if self.codebook is not None:
            self.codebook.to(acc.device)
        self._describe(autoencoder)

    def _describe(self, autoencoder: Autoencoder) -> None:
        cfg, acc, t = self.config, self.accelerator, self.config.train
        if self.lpips is not None:
            self.message(f"LPIPS on: weight {cfg.loss.lpips_weight}, weights {cfg.loss.lpips_weights} + {cfg.loss.vgg_weights}")
        else:
            self.message("LPIPS off: loss.lpips_weights / loss.vgg_weights not given (LPIPS needs local weight files)")
        self.message("discriminator " + (f"on from step {cfg.loss.disc_start}, weight {cfg.loss.disc_weight}, adaptive "
                                         f"{cfg.loss.adaptive_weight}" if self.discriminator else "off (loss.disc_weight = 0)"))
        n_params = sum(p.numel() for p in self.unwrapped.parameters())
        self.message(f"{len(self.images)} training images {tuple(self.images.shape[1:])}, {self.order.batches_per_epoch} "
                     f"batches of {t.batch_size} per epoch and process; {autoencoder.kind} autoencoder "
                     f"f={autoencoder.downsample_factor}, {n_params / 1e6:.2f}M parameters; mixed_precision="
                     f"{acc.precision} channels_last={t.channels_last} threads={torch.get_num_threads()}")

    # -- checkpoints -----------------------------------------------------------------------------

    def _save_checkpoint(self, pos: dict) -> Optional[Path]:
        from accelerate.utils import gather_object

        acc, cfg = self.accelerator, self.config
        rngs = gather_object([ckpt.rng_state({})])  # one per process, in rank order
        path = None
        if acc.is_main_process:
            epoch, batch_in_epoch = divmod(pos["micro_batches"], self.order.batches_per_epoch)
            state = dict(pos, epoch=epoch, batch_in_epoch=batch_in_epoch, lr_scheduler=self.lr_scheduler.state_dict(),
                         rng=rngs, num_processes=acc.num_processes, config=to_dict(cfg))
            extra, optimizers = {}, {}
            if self.codebook is not None:
                extra[CODEBOOK] = self.codebook.state_dict()
            if self.discriminator is not None:
                extra[DISCRIMINATOR] = acc.unwrap_model(self.discriminator).state_dict()
                optimizers[DISCRIMINATOR_OPTIMIZER] = self.d_optimizer
            path = ckpt.save_checkpoint(self.output_dir / "checkpoints", pos["step"], self.unwrapped, self.optimizer, state,
                                        cfg.checkpoint.keep_last, extra=extra, extra_optimizers=optimizers, log=self.log)
            if path is not None:  # None: skipped, the weights not sane (a warning says why)
                self.message(f"checkpoint {path}")
        acc.wait_for_everyone()
        return path

    def _load_checkpoint(self, path: Path, state: dict) -> dict:
        """Weights, optimizers (with this config's hyperparameters), codebook, LR schedule and RNG states
        from ``path``; returns the position. What differs from the checkpoint is warned about."""
        acc = self.accelerator
        expected = expected_files(self.config)
        missing = [name for name in expected if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {path} lacks {', '.join(missing)}; expected {', '.join(expected)} "
                                    "as written by ldm train-vae")
        settings = [OptimizerSettings(self.optimizer, self.lr_scheduler)]
        if self.discriminator is not None:
            settings.append(OptimizerSettings(self.d_optimizer, keys={"lr": "loss.disc_lr", "eps": "optim.eps"},
                                              label="discriminator"))
        try:
            ckpt.load_checkpoint(path, self.unwrapped, self.optimizer)
            if self.codebook is not None:
                self.codebook.load_state_dict(ckpt.load_tensors(path / f"{CODEBOOK}.safetensors", device=str(acc.device)))
            if self.discriminator is not None:
                acc.unwrap_model(self.discriminator).load_state_dict(ckpt.load_tensors(path / f"{DISCRIMINATOR}.safetensors"))
                ckpt.load_optimizer(path, self.d_optimizer, DISCRIMINATOR_OPTIMIZER)
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"checkpoint {path} does not match this config's model: {str(exc)[:300]}") from exc
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        notes = [note for s in settings for note in s.reapply(path)]
        notes.append(ckpt.rng_warning(path, ckpt.set_rng_state(state["rng"][acc.process_index], {})))
        if acc.is_main_process:
            for note in filter(None, notes):
                ckpt.warn(note, self.log)
        return {"step": state["step"], "micro_batches": state["micro_batches"]}

    # -- one step --------------------------------------------------------------------------------

    def _next_batch(self, pos: dict) -> tuple[torch.Tensor, torch.Generator]:
        """This process's next micro-batch in [-1, 1], flipped, and the generator of its random choices."""
        cfg, device = self.config, self.accelerator.device
        epoch, i = divmod(pos["micro_batches"], self.order.batches_per_epoch)
        x = to_model_range(self.images[self.order.batch(epoch, i)]).to(device)  # (B, 3, H, W)
        # This micro-batch's own random stream: a resumed run draws exactly what the straight one did.
        rng = torch.Generator(device).manual_seed(cfg.train.seed * 1_000_003 + pos["micro_batches"])
        pos["micro_batches"] += 1
        if cfg.data.flip:
            flip = torch.rand(x.shape[0], device=device, generator=rng) < 0.5  # (B,)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, rng

    def _loss(self, x: torch.Tensor, rng: torch.Generator, use_gan: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the autoencoder's total loss, the reconstruction (B, 3, H, W)) of images ``x`` (B, 3, H, W)."""
        loss_cfg, u = self.config.loss, self.unwrapped
        with self.accelerator.autocast():
            if self.codebook is not None:
                h = u.quant_conv(u.encoder(x))  # (B, D, h, w)
                q = self.codebook(h, self.reduce, rng)
                x_rec = u.decoder(u.post_quant_conv(q.z_q))  # (B, 3, H, W)
                reg = loss_cfg.codebook_weight * (q.codebook_loss + q.commitment_loss)
            else:
                posterior = u.encode(x).latent_dist
                x_rec = u.decode(posterior.sample()).sample  # (B, 3, H, W)
                reg = loss_cfg.kl_weight * posterior.kl().mean()
            rec = reconstruction_loss(x, x_rec, loss_cfg)
            if self.lpips is not None:
                rec = rec + loss_cfg.lpips_weight * self.lpips(x_rec.float(), x.float()).mean()
            loss = rec + reg
            if use_gan:
                g_loss = hinge_g_loss(self.discriminator(x_rec))
                weight = adaptive_weight(rec, g_loss, u.decoder.conv_out.weight) if loss_cfg.adaptive_weight else 1.0
                loss = loss + loss_cfg.disc_weight * weight * g_loss
        return loss, x_rec

    def _optimizer_step(self, pos: dict, window: dict) -> None:
        """One optimizer step: ``gradient_accumulation_steps`` micro-batches (accelerate's ``accumulate``),
        the autoencoder's update, and the discriminator's on each micro-batch once the GAN is on."""
        acc, cfg = self.accelerator, self.config
        models = [self.model] + ([self.discriminator] if self.discriminator is not None else [])
        use_gan = self.discriminator is not None and gan_active(cfg.loss, pos["step"])
        while True:
            x, rng = self._next_batch(pos)
            with acc.accumulate(*models):
                self.model.train()
                loss, x_rec = self._loss(x, rng, use_gan)
                acc.backward(loss)
                if acc.sync_gradients and cfg.optim.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if use_gan:
                    with acc.autocast():
                        d_loss = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(x_rec.detach()))
                    acc.backward(d_loss)
                    self.d_optimizer.step()
                    self.d_optimizer.zero_grad(set_to_none=True)
            window["loss"] += float(loss.detach())
            window["psnr"] += float(psnr(to_unit(x_rec.detach()), to_unit(x)).mean())
            window["n"] += 1
            if acc.sync_gradients:
                return

    # -- after a step: log, checkpoint, stop -----------------------------------------------------

    def _after_step(self, pos: dict, window: dict, bar, stop_at_step: Optional[int]) -> bool:
        """Count the step, log and checkpoint as due; whether to stop."""
        t, acc = self.config.train, self.accelerator
        self.lr_scheduler.step()
        pos["step"] += 1
        step = pos["step"]
        bar.update(1)
        bar.set_postfix(loss=f"{window['loss'] / window['n']:.4f}", psnr=f"{window['psnr'] / window['n']:.2f}", refresh=False)
        if step % t.log_every == 0 or step == t.max_steps:
            self._log_train(step, window)
        out_of_time = t.max_minutes > 0 and time.time() - self.start > 60 * t.max_minutes
        if t.max_minutes > 0 and acc.num_processes > 1:  # every process must stop at the same step
            out_of_time = bool(acc.reduce(torch.tensor([float(out_of_time)], device=acc.device), "sum") > 0)
        if step % self.config.checkpoint.every == 0 or step == t.max_steps or out_of_time:
            self._save_checkpoint(pos)
        if out_of_time:
            self.out_of_time = True
            self.message(f"stopping at step {step}: train.max_minutes={t.max_minutes} reached")
        return out_of_time or step >= t.max_steps or (stop_at_step is not None and step >= stop_at_step)

    def _log_train(self, step: int, window: dict) -> None:
        usage, ppl = self.codebook.usage() if self.codebook is not None else (math.nan, math.nan)
        elapsed = time.time() - self.start
        if self.log is not None:
            self.log.scalars("train", step, {
                "loss": window["loss"] / window["n"], "psnr": window["psnr"] / window["n"], "codebook_usage": usage,
                "perplexity": ppl, "lr": self.lr_scheduler.get_last_lr()[0],
                "restarted_codes": int(self.codebook.restarted) if self.codebook is not None else 0,
                "steps_per_s": (step - self.start_step) / max(elapsed, 1e-9), "elapsed_s": elapsed})
        window.update(loss=0.0, psnr=0.0, n=0)

    # -- the run ---------------------------------------------------------------------------------

    def fit(self, resume: Optional[str] = None, stop_at_step: Optional[int] = None) -> Optional[Path]:
        """Train to ``train.max_steps`` (or ``train.max_minutes``), then write ``vae/``; returns that folder.

        Args:
            resume: ``"latest"`` or a checkpoint folder; None starts afresh (refused in a run folder that
                already holds checkpoints).
            stop_at_step: stop after this optimizer step (its checkpoint written first when due), as if
                the process had been killed there; no ``vae/`` is written and None is returned.
        """
        from tqdm.auto import tqdm

        try:
            pos = self.prepare(resume)
            t, self.out_of_time = self.config.train, False
            self.start, self.start_step = time.time(), pos["step"]
            window = {"loss": 0.0, "psnr": 0.0, "n": 0}
            bar = tqdm(total=t.max_steps, initial=pos["step"], desc="train-vae", dynamic_ncols=True,
                       disable=not (self.progress and self.accelerator.is_main_process))
            with bar, ckpt.resumable_writes(self.output_dir / "checkpoints"):  # a full disk: one line, what to resume
                while pos["step"] < t.max_steps:
                    self._optimizer_step(pos, window)
                    if self._after_step(pos, window, bar, stop_at_step):
                        break
                self.message(f"trained {pos['step'] - self.start_step} steps in {time.time() - self.start:.0f} s")
                return self._finish() if pos["step"] >= t.max_steps or self.out_of_time else None
        finally:
            self.close()

    def prepare(self, resume: Optional[str] = None) -> dict:
        """Run folder, log, data, models and optimizers, restored from ``resume`` when given; returns the
        position (step, micro_batches) to train from. ``fit`` calls it; call ``close`` after it alone."""
        checkpoint, state = self._open(resume)
        self._setup_data()
        self._setup_models()
        return self._load_checkpoint(checkpoint, state) if checkpoint else {"step": 0, "micro_batches": 0}

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def _finish(self) -> Path:
        """Scaling factor over a sample of the training images, then the final ``vae/`` folder."""
        cfg, acc = self.config, self.accelerator
        autoencoder = Autoencoder(self.unwrapped, resize_input=cfg.model.resize_input)
        n = min(len(self.images), cfg.train.scaling_images)
        sample = self.images[torch.randperm(len(self.images), generator=torch.Generator().manual_seed(cfg.train.seed))[:n]]
        autoencoder.eval()
        batches = (to_model_range(sample[i:i + cfg.train.batch_size]).to(acc.device)
                   for i in range(0, n, cfg.train.batch_size))
        factor = compute_scaling_factor(autoencoder, batches, max_images=n)
        self.message(f"scaling_factor = 1 / std(latents) = {factor:.6g} over {n} training images")
        folder = self.output_dir / "vae"
        if acc.is_main_process:
            autoencoder.model.to(memory_format=torch.contiguous_format)
            autoencoder.save_pretrained(folder)
            self.message(f"wrote {folder}")
        acc.wait_for_everyone()
        return folder


def train_vae(config: VAETrainingConfig, resume: Optional[str] = None, progress: bool = True,
              stop_at_step: Optional[int] = None) -> Optional[Path]:
    """Train the autoencoder ``config`` describes; returns the final ``vae/`` folder (see ``VAETrainer.fit``)."""
    return VAETrainer(config, progress).fit(resume, stop_at_step)
