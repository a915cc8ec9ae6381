"""Training a small CLIP: open_clip's architecture and contrastive loss, through accelerate.

The model is ``open_clip.CLIP`` built from ``ClipModelConfig`` (a tiny ViT or
ResNet image tower, a small causal text transformer over CLIP's BPE tokens,
context length 77); the loss is open_clip's ``ClipLoss`` (symmetric
cross-entropy over the batch's image-text similarities, learned temperature
clamped at 100 as open_clip's trainer does). The loop uses accelerate's
``prepare``, ``accumulate``, ``backward``, ``autocast`` and ``unwrap_model``.

Determinism and resume: the model is initialised from ``run.seed``; epoch e
visits the training pairs in a permutation drawn from ``(seed, e)``; random
augmentation of micro-batch i draws from ``(seed, i)``. A checkpoint (weights,
optimizer, step and position in the data) therefore resumes to the same
weights as a run that never stopped. Contrastive negatives are those of the
micro-batch on its own process (no gather across processes).

At the end the run folder is also a bundle: ``text_encoder/`` (the whole CLIP,
image tower included) and ``tokenizer/``, loadable with
``conditioning.load_text_encoder`` and ``conditioning.load_clip_scorer``;
``metrics.json`` holds held-out retrieval accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from conditioning.clip_model import CLIP_MEAN, CLIP_STD, build_open_clip_model
from conditioning.files import atomic_path
from conditioning.open_clip_backend import OpenCLIPTextEncoder
from train.run.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from train.clip.config import ClipOptimConfig, ClipTrainConfig
from train.clip.data import PairSet, augment, epoch_order, load_pair_sets
from train.clip.eval import retrieval_metrics
from train.run.config import save_config


# --------------------------------------------------------------------------------------------------
# Model pieces used in training
# --------------------------------------------------------------------------------------------------


def encode_text_trimmed(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (B, E), computed on the columns up to the batch's last end token.

    The text transformer is causal, so the states at and before each prompt's end token do not
    depend on the padding after it: cutting the padding is exact and saves most of the work
    (captions are ~10 tokens of 77).
    """
    from open_clip.transformer import text_global_pool

    n = int(tokens.argmax(dim=1).max()) + 1  # the end token has the highest id
    t = tokens[:, :n]  # (B, n)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)  # (B, n, D)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])  # (B, n, D)
    x = model.ln_final(x)  # (B, n, D)
    x = text_global_pool(x, t, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))  # (B, D)
    return model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection


class ContrastivePair(nn.Module):
    """The trained module: (images, tokens) -> (image features, text features, temperature).

    Wrapping the CLIP gives accelerate (DDP, autocast) one forward to wrap.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std  # (B, 3, S, S), images in [0, 1]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        image_features = F.normalize(self.clip.encode_image(self.normalize(images)), dim=-1)  # (B, E)
        text_features = F.normalize(encode_text_trimmed(self.clip, tokens), dim=-1)  # (B, E)
        return image_features, text_features, self.clip.logit_scale.exp()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and convolutions only, as open_clip's trainer does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "embedding" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, config: ClipOptimConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to 0 at max_steps (step counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(module: ContrastivePair, pairs: PairSet, batch_size: int, autocast) -> dict[str, float]:
    """Held-out retrieval metrics (``train.clip.eval``) of the module's CLIP on ``pairs``."""
    if not len(pairs):
        return {}
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    texts, images = [], []
    for start in range(0, len(pairs), batch_size):
        index = torch.arange(start, min(start + batch_size, len(pairs)))
        x = pairs.images[index].to(device).float() / 255  # (b, 3, S, S)
        t = pairs.tokens(index).to(device)  # (b, L), each image's first caption
        with autocast():
            image_features, text_features, _ = module(x, t)
        images.append(image_features.float().cpu())
        texts.append(text_features.float().cpu())
    module.train(was_training)
    return retrieval_metrics(torch.cat(texts), torch.cat(images), pairs.first_captions())


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class _CsvLog:
    def __init__(self, path: Path, columns: Sequence[str]):
        self.path, self.columns = path, list(columns)
        if not path.exists():
            path.write_text(",".join(self.columns) + "\n", encoding="utf-8")

    def write(self, **values) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(",".join(f"{values[c]:.6g}" if isinstance(values[c], float) else str(values[c]) for c in self.columns) + "\n")


def train(config: ClipTrainConfig, resume: Optional[str] = None) -> dict[str, float]:
    """Run (or continue) a training run; returns the final held-out retrieval metrics."""
    from accelerate import Accelerator
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    out = Path(config.run.output_dir)
    ckpt_dir = out / "checkpoints"
    if resume is None and list_checkpoints(ckpt_dir):
        raise ValueError(f"{out} already holds checkpoints; continue it with --resume latest or pick another run.output_dir")
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    accelerator = Accelerator(mixed_precision=config.run.mixed_precision, cpu=config.run.cpu,
                              gradient_accumulation_steps=config.optim.grad_accum)
    opt = config.optim

    torch.manual_seed(config.run.seed)
    model_cfg = config.model.to_open_clip()
    clip = build_open_clip_model(model_cfg)
    module = ContrastivePair(clip)
    optimizer = torch.optim.AdamW(param_groups(module, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)

    step, micro, elapsed = 0, 0, 0.0
    if resume is not None:
        state = load_checkpoint(resolve_resume(resume, ckpt_dir), module, optimizer)
        step, micro, elapsed = state["step"], state["micro"], state.get("elapsed_s", 0.0)
    module, optimizer = accelerator.prepare(module, optimizer)
    unwrapped = accelerator.unwrap_model(module)

    tokenizer = OpenCLIPTextEncoder(clip, model_cfg)  # tokenizes exactly as the saved encoder will
    train_set, test_set = load_pair_sets(config, tokenizer.tokenize, progress=config.run.progress and accelerator.is_main_process,
                                         log=accelerator.print)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        n_params = sum(p.numel() for p in clip.parameters())
        accelerator.print(f"train-clip: {len(train_set)} training pairs, {len(test_set)} held out; "
                          f"{n_params / 1e6:.2f}M parameters; step {step} of {opt.max_steps}")
    log = _CsvLog(out / "train_log.csv", ["step", "loss", "lr", "logit_scale", "pairs_per_s", "elapsed_s"])
    loss_fn = ClipLoss()

    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = len(train_set) // opt.batch_size // world  # micro-batches per epoch on each process
    if per_process < 1:
        raise ValueError(f"{len(train_set)} training pairs cannot fill one batch of {opt.batch_size} "
                         f"on each of {world} processes")
    stop = min(opt.max_steps, config.run.stop_at or opt.max_steps)
    bar = tqdm(total=opt.max_steps, initial=step, desc="train-clip", unit="step",
               disable=not (config.run.progress and accelerator.is_local_main_process))
    started, window_loss, window_n, window_t = time.time() - elapsed, 0.0, 0, time.time()
    module.train()

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(ckpt_dir, step, unwrapped, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                            {"micro": micro, "elapsed_s": time.time() - started, "config": dataclasses.asdict(config)},
                            keep_last=config.run.keep_checkpoints)

    def run_eval() -> dict[str, float]:
        metrics = evaluate(unwrapped, test_set, opt.batch_size, accelerator.autocast)
        if metrics and accelerator.is_main_process:
            with open(out / "eval_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            bar.write(f"step {step}: held-out text->image top-1 {metrics['text_to_image_top1']:.3f} "
                      f"(chance {metrics['chance_text_to_image_top1']:.3f}), top-5 {metrics['text_to_image_top5']:.3f} "
                      f"(chance {metrics['chance_text_to_image_top5']:.3f}), n={int(metrics['n'])}")
        return metrics

    while step < stop:
        epoch, index = divmod(micro, per_process)
        batch = index * world + rank  # this process's batch within the epoch's permutation
        rows = epoch_order(len(train_set), config.run.seed, epoch)[batch * opt.batch_size : (batch + 1) * opt.batch_size]
        generator = torch.Generator().manual_seed(config.run.seed * 1_000_003 + micro * world + rank)
        images = augment(train_set.images[rows].float() / 255, config.data, generator).to(accelerator.device)  # (B, 3, S, S)
        tokens = train_set.tokens(rows, epoch).to(accelerator.device)  # (B, L)
        with accelerator.accumulate(module):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, opt)
            with accelerator.autocast():
                image_features, text_features, logit_scale = module(images, tokens)
                loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients and opt.grad_clip > 0:
                accelerator.clip_grad_norm_(module.parameters(), opt.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        window_loss, window_n = window_loss + loss.item(), window_n + 1
        if not accelerator.sync_gradients:
            continue
        with torch.no_grad():
            unwrapped.clip.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)
        if step % config.run.log_every == 0 or step == stop:
            now = time.time()
            mean_loss = window_loss / window_n
            rate = window_n * opt.batch_size * world / max(now - window_t, 1e-9)
            bar.set_postfix(loss=f"{mean_loss:.3f}", T=f"{unwrapped.clip.logit_scale.exp().item():.1f}", pairs_s=f"{rate:.0f}")
            if accelerator.is_main_process:
                log.write(step=step, loss=mean_loss, lr=lr_at(step - 1, opt), logit_scale=unwrapped.clip.logit_scale.exp().item(),
                          pairs_per_s=rate, elapsed_s=now - started)
            window_loss, window_n, window_t = 0.0, 0, now
        if config.run.eval_every and step % config.run.eval_every == 0 and step < stop:
            run_eval()
        if step % config.run.checkpoint_every == 0 or step == stop:
            checkpoint()
    bar.close()

    if step < opt.max_steps:
        accelerator.print(f"train-clip: stopped at step {step} of {opt.max_steps} (run.stop_at); continue with --resume latest")
        return {}
    metrics = run_eval()
    if accelerator.is_main_process:
        encoder = OpenCLIPTextEncoder(unwrapped.clip, model_cfg, layer=config.run.context_layer)
        encoder.save_pretrained(out)
        summary = {"step": step, "parameters": sum(p.numel() for p in unwrapped.clip.parameters()),
                   "train_seconds": round(time.time() - started, 1), **metrics}
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        accelerator.print(f"train-clip: wrote {out / 'text_encoder'} and {out / 'tokenizer'}")
    return metrics
