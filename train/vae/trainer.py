"""The autoencoder training loop (accelerate): reconstruction, codebook, perceptual and GAN losses,
codebook health, atomic checkpoints with resume, and the final ``vae/`` folder with its scaling factor.

Run folder (``train.out_dir``):

    config.yaml            the resolved config of the run
    log.txt                log lines (also shown above the progress bar); metrics.jsonl, one JSON per log line
    checkpoints/step-N/    accelerate state (models, optimisers, scheduler, RNG) + codebook.safetensors
                           + trainer_state.json; written to a temporary folder and renamed into place
    vae/                   the final autoencoder, diffusers layout, scaling_factor set
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from train.vae.data import read_imagefolder, to_model_range
from train.vae.config import VAETrainingConfig
from vae.autoencoder import Autoencoder, build_autoencoder, compute_scaling_factor
from vae.losses import adaptive_weight, build_discriminator, gan_active, hinge_d_loss, hinge_g_loss, reconstruction_loss
from vae.lpips import LPIPS
from vae.metrics import psnr, to_unit
from vae.vq import CodebookTrainer

CHECKPOINT_PREFIX = "step-"
STATE_NAME = "trainer_state.json"
CODEBOOK_NAME = "codebook.safetensors"


class RunLog:
    """Appends lines to log.txt (and shows them) and metrics to metrics.jsonl."""

    def __init__(self, out_dir: Path, show: bool) -> None:
        self.text, self.jsonl, self.show = out_dir / "log.txt", out_dir / "metrics.jsonl", show

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with self.text.open("a") as fh:
            fh.write(line + "\n")
        if self.show:
            from tqdm.auto import tqdm

            tqdm.write(line)

    def metrics(self, record: dict) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


# --- checkpoints -------------------------------------------------------------------------------------------------
def list_checkpoints(out_dir: Union[str, Path]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a folder counts once its trainer_state.json is in it)."""
    folder = Path(out_dir) / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_NAME).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(out_dir: Path, resume: str) -> Path:
    """``latest`` -> the newest complete checkpoint of the run; otherwise a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {out_dir / 'checkpoints'} "
                                    f"(expected folders {CHECKPOINT_PREFIX}N with {STATE_NAME})")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume {resume}: {path / STATE_NAME} not found; expected a checkpoint folder "
                                f"written by ldm train-vae ({CHECKPOINT_PREFIX}N) or 'latest'")
    return path


# Config keys that change the shapes or the set of tensors in a checkpoint.
_STATE_KEYS = {"quantizer": ("update",), "loss": ("disc_weight", "disc_layers", "disc_channels")}


def check_compatible(checkpoint: Path, config: VAETrainingConfig) -> dict:
    """The checkpoint's trainer state, after checking it was written for the same architecture (every model
    key but scaling_factor) and the same codebook update and discriminator."""
    state = json.loads((checkpoint / STATE_NAME).read_text())
    saved = state.get("config", {})
    keys = {"model": [k for k in asdict(config.model) if k != "scaling_factor"], **_STATE_KEYS}
    diff = []
    for section, names in keys.items():
        ours, theirs = asdict(getattr(config, section)), saved.get(section, {})
        diff += [f"{section}.{k} is {theirs.get(k)!r} there but {ours[k]!r} here" for k in names
                 if theirs.get(k) != ours[k]]
    if diff:
        raise ValueError(f"checkpoint {checkpoint / STATE_NAME} was written for a different setup: " + "; ".join(diff))
    return state


def save_checkpoint(accelerator, out_dir: Path, step: int, codebook: Optional[CodebookTrainer],
                    config: VAETrainingConfig, keep: int) -> Path:
    """accelerate's save_state + codebook buffers + trainer state, into a temporary folder renamed into place."""
    from safetensors.torch import save_file

    folder = out_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        if codebook is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in codebook.state_dict().items()}, tmp / CODEBOOK_NAME)
        (tmp / STATE_NAME).write_text(json.dumps({"step": step, "config": asdict(config)}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, codebook: Optional[CodebookTrainer]) -> None:
    """accelerate's load_state (weights_only loads) plus the codebook buffers; a missing or damaged file is
    an error naming it and what was expected."""
    from safetensors.torch import load_file

    expected = ["model.safetensors", "optimizer.bin", "scheduler.bin"] + ([CODEBOOK_NAME] if codebook else [])
    missing = [name for name in expected if not (checkpoint / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {checkpoint} lacks {', '.join(missing)}; expected {', '.join(expected)} "
                                "as written by ldm train-vae")
    try:
        accelerator.load_state(str(checkpoint))
        if codebook is not None:
            codebook.load_state_dict(load_file(checkpoint / CODEBOOK_NAME, device=str(accelerator.device)))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ValueError(f"checkpoint {checkpoint} does not match this config's model: {str(exc)[:300]}") from exc


# --- the loop ----------------------------------------------------------------------------------------------------
def _lr_lambda(config: VAETrainingConfig):
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return (t.lr_min + (t.lr - t.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))) / t.lr

    return factor


def train_vae(config: VAETrainingConfig, resume: Optional[str] = None, progress: bool = True) -> Path:
    """Train the autoencoder ``config`` describes; returns the final ``vae/`` folder."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm

    t = config.train
    out_dir = Path(t.out_dir)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(t.mixed_precision, t.mixed_precision),
                              gradient_accumulation_steps=t.grad_accum,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    checkpoint = resolve_resume(out_dir, resume) if resume else None
    state = check_compatible(checkpoint, config) if checkpoint else {"step": 0}
    set_seed(t.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir, show=progress and accelerator.is_main_process)
    if accelerator.is_main_process:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))

    # data (INTEGRATION: train.data replaces read_imagefolder)
    images = read_imagefolder(config.data.path, config.data.split,
                              size=config.model.resolution if config.model.resize_input else None,
                              max_images=config.data.max_images)  # (N, 3, H, W) uint8
    if len(images) < t.batch_size:
        raise ValueError(f"train.batch_size={t.batch_size} is larger than the {len(images)} images in "
                         f"{config.data.path} ({config.data.split})")
    loader = torch.utils.data.DataLoader(images, batch_size=t.batch_size, shuffle=True, drop_last=True)

    # models and losses
    autoencoder = build_autoencoder(config.model)
    autoencoder.check_images(images[:1].float())  # sizes not divisible by f: a clear error here, not in a conv
    model = autoencoder.model
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    broadcast = (lambda x: torch.distributed.broadcast(x, 0)) if accelerator.num_processes > 1 else None
    codebook = CodebookTrainer(model.quantize.embedding, config.quantizer, broadcast) if autoencoder.kind == "vq" else None
    discriminator = build_discriminator(config.loss)
    if config.loss.lpips_weights:
        lpips = LPIPS(config.loss.lpips_weights, config.loss.vgg_weights).to(accelerator.device)
        log(f"LPIPS on: weight {config.loss.lpips_weight}, weights {config.loss.lpips_weights} + {config.loss.vgg_weights}")
    else:
        lpips = None
        log("LPIPS off: loss.lpips_weights / loss.vgg_weights not given (LPIPS needs local weight files)")
    log("discriminator " + (f"on from step {config.loss.disc_start}, weight {config.loss.disc_weight}, "
                            f"adaptive {config.loss.adaptive_weight}" if discriminator else "off (loss.disc_weight = 0)"))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    if discriminator is not None:
        d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=config.loss.disc_lr, betas=(0.5, 0.9))
        discriminator, d_optimizer = accelerator.prepare(discriminator, d_optimizer)
    if codebook is not None:
        codebook.to(accelerator.device)
    step = int(state["step"])
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, codebook)
        log(f"resumed from {checkpoint} at step {step}")
    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    log(f"{len(images)} images {tuple(images.shape[1:])}, {len(loader)} batches of {t.batch_size} per epoch; "
        f"{autoencoder.kind} autoencoder f={autoencoder.downsample_factor}, {n_params / 1e6:.2f}M parameters; "
        f"{t.mixed_precision=} {t.channels_last=} threads={torch.get_num_threads()}")

    unwrapped = accelerator.unwrap_model(model)
    last_layer = unwrapped.decoder.conv_out.weight
    reduce = (lambda x: accelerator.reduce(x, "sum")) if accelerator.num_processes > 1 else None
    bar = tqdm(total=t.max_steps, initial=step, desc="train-vae", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    micro = step * t.grad_accum  # micro-batches seen
    start, start_step, window = time.time(), step, {"loss": 0.0, "psnr": 0.0, "n": 0}
    while step < t.max_steps:
        epoch, skip = divmod(micro, len(loader))
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            x = to_model_range(batch)  # (B, 3, H, W)
            # This micro-batch's own random stream: a resumed run draws exactly what the straight one did.
            rng = torch.Generator(x.device).manual_seed(t.seed * 1_000_003 + micro)
            if config.data.flip:
                flip = torch.rand(x.shape[0], device=x.device, generator=rng) < 0.5  # (B,)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            use_gan = discriminator is not None and gan_active(config.loss, step)
            with accelerator.accumulate(model):
                model.train()
                with accelerator.autocast():
                    if codebook is not None:
                        h = unwrapped.quant_conv(unwrapped.encoder(x))  # (B, D, h, w)
                        q = codebook(h, reduce, rng)
                        x_rec = unwrapped.decoder(unwrapped.post_quant_conv(q.z_q))  # (B, 3, H, W)
                        reg = config.loss.codebook_weight * (q.codebook_loss + q.commitment_loss)
                    else:
                        posterior = unwrapped.encode(x).latent_dist
                        x_rec = unwrapped.decode(posterior.sample()).sample  # (B, 3, H, W)
                        reg = config.loss.kl_weight * posterior.kl().mean()
                    rec = reconstruction_loss(x, x_rec, config.loss)
                    if lpips is not None:
                        rec = rec + config.loss.lpips_weight * lpips(x_rec.float(), x.float()).mean()
                    loss = rec + reg
                    if use_gan:
                        g_loss = hinge_g_loss(discriminator(x_rec))
                        weight = adaptive_weight(rec, g_loss, last_layer) if config.loss.adaptive_weight else 1.0
                        loss = loss + config.loss.disc_weight * weight * g_loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if use_gan:
                with accelerator.accumulate(discriminator), accelerator.autocast():
                    d_loss = hinge_d_loss(discriminator(x.detach()), discriminator(x_rec.detach()))
                    accelerator.backward(d_loss)
                    d_optimizer.step()
                    d_optimizer.zero_grad(set_to_none=True)
            micro += 1
            window["loss"] += float(loss.detach())
            window["psnr"] += float(psnr(to_unit(x_rec.detach()), to_unit(x)).mean())
            window["n"] += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            usage, ppl = codebook.usage() if codebook is not None else (float("nan"), float("nan"))
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", psnr=f"{window['psnr'] / window['n']:.2f}",
                            usage=f"{usage:.0%}", refresh=False)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.time() - start
                record = {"step": step, "loss": window["loss"] / window["n"], "psnr": window["psnr"] / window["n"],
                          "codebook_usage": usage, "perplexity": ppl, "lr": scheduler.get_last_lr()[0],
                          "restarted_codes": int(codebook.restarted) if codebook is not None else 0,
                          "steps_per_s": (step - start_step) / max(elapsed, 1e-9), "elapsed_s": elapsed}
                if accelerator.is_main_process:
                    log.metrics(record)
                    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                window = {"loss": 0.0, "psnr": 0.0, "n": 0}
            out_of_time = t.max_minutes > 0 and time.time() - start > 60 * t.max_minutes
            if step % t.checkpoint_every == 0 or step == t.max_steps or out_of_time:
                path = save_checkpoint(accelerator, out_dir, step, codebook, config, t.keep_checkpoints)
                log(f"checkpoint {path}")
            if out_of_time:
                log(f"stopping at step {step}: train.max_minutes={t.max_minutes} reached")
                break
            if step >= t.max_steps:
                break
        if t.max_minutes > 0 and time.time() - start > 60 * t.max_minutes:
            break
    bar.close()
    log(f"trained {step - start_step} steps in {time.time() - start:.0f} s")
    return finish(accelerator, Autoencoder(accelerator.unwrap_model(model), resize_input=config.model.resize_input),
                  images, config, log)


def finish(accelerator, autoencoder: Autoencoder, images: torch.Tensor, config: VAETrainingConfig, log) -> Path:
    """Scaling factor over a sample of the training images, then the final ``vae/`` folder."""
    n = min(len(images), config.train.scaling_images)
    sample = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(config.train.seed))[:n]]
    autoencoder.eval()
    batches = (to_model_range(sample[i:i + config.train.batch_size]).to(accelerator.device)
               for i in range(0, n, config.train.batch_size))
    factor = compute_scaling_factor(autoencoder, batches, max_images=n)
    log(f"scaling_factor = 1 / std(latents) = {factor:.6g} over {n} training images")
    folder = Path(config.train.out_dir) / "vae"
    if accelerator.is_main_process:
        autoencoder.model.to(memory_format=torch.contiguous_format)
        autoencoder.save_pretrained(folder)
        log(f"wrote {folder}")
    accelerator.wait_for_everyone()
    return folder
