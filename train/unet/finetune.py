"""Fine-tuning a bundle (ours, or a Stable Diffusion folder in diffusers layout) on new captioned images.

    result = finetune("path/to/bundle", config)      # config: FinetuneConfig, config.data.path set

Two methods (``lora.method``):

* ``lora`` (default): the U-Net is frozen and peft LoRA adapters of rank r are trained on its
  attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), W + (alpha / r) B A with
  B = 0 at the start, so step 0 is the base model. The output bundle keeps the base U-Net in
  ``unet/`` as the base stores it and the adapter in ``pytorch_lora_weights.safetensors`` (diffusers'
  layout, ``ldm.lora``); ``Text2ImagePipeline.from_pretrained`` merges it.
* ``full``: every U-Net weight is trained; the bundle's ``unet/`` holds the new (EMA) weights.

The autoencoder, the text encoder and the noise schedule are the bundle's, frozen and unchanged.

Prior preservation (``prior.data``, DreamBooth's ``with_prior_preservation``, sd-scripts' ``reg_data_dir``):
round(prior.share x batch_size) rows of every batch come from a second imagefolder (cached as the data is),
the rest from the data; loss = mean of the data rows + prior.weight x mean of the prior rows, in one U-Net call.

Validation (``FinetuneValidationConfig``) starts at step 0, draws its prompts from the user's held-out
captions plus two of the base model's own prompts, and scores the base model's prompts with the
bundle's CLIP (``base_clip_score`` in logs/val.csv and the log): its fall from step 0 is what the
fine-tune made the model forget. Caption words whose tokens the text encoder cannot tell apart (a
packed bundle's table keeps only its training captions' tokens; every other token shares one row)
are listed at the start: to the frozen encoder they all read as the same word.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import conditioning
from ldm.pipeline import Text2ImagePipeline
from train.data.split import caption_index
from train.run.order import DataOrder
from train.unet.cache import LatentCache, build_cache
from train.unet.config import FinetuneConfig
from train.unet.objective import noised_batch
from train.unet.trainer import LDMTrainer, TrainResult
from train.unet.validation import draw_prompts


def add_lora(unet, config, seed: int) -> None:
    """Freeze ``unet`` and give it a trainable LoRA adapter on ``config.target_modules``.

    peft draws the A matrices from torch's global generator; they are drawn here under ``seed`` (the
    caller's state left as it was), so that two runs of one config start from the same adapter."""
    from peft import LoraConfig

    if config.rank < 1:
        raise ValueError(f"lora.rank={config.rank} must be >= 1")
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                    target_modules=list(config.target_modules), init_lora_weights=True))


def shared_token_ids(text_encoder) -> set[int]:
    """Token ids that share one row of the encoder's token table (a packed table's fallback row: the tokens
    its training captions lacked); empty for a table whose rows all differ."""
    table = next(t for n, t in text_encoder.state_dict().items() if n.endswith("token_embedding.weight"))  # (V, D)
    rows, inverse, counts = torch.unique(table.detach().cpu(), dim=0, return_inverse=True, return_counts=True)
    top = int(counts.argmax())
    return set(torch.nonzero(inverse == top).flatten().tolist()) if counts[top] > 1 else set()


def unknown_words(text_encoder, captions: Sequence[str]) -> Counter:
    """Caption words (lower case) with a token in ``shared_token_ids``, and in how many captions each occurs."""
    shared = shared_token_ids(text_encoder)
    found: Counter = Counter()
    if not shared:
        return found
    words = sorted({w for c in captions for w in re.findall(r"[\w'-]+", c.lower())})
    ids = text_encoder.tokenize(words) if words else torch.zeros(0, 1, dtype=torch.long)  # (W, L) one word each
    unknown = {w for w, row in zip(words, ids) if any(int(i) in shared for i in row[1:] if int(i) != text_encoder.pad_token_id)
               and int(row[1]) != text_encoder.eos_token_id}
    for c in captions:
        found.update(set(re.findall(r"[\w'-]+", c.lower())) & unknown)
    return found


def base_model_prompts(root: Path) -> list[str]:
    """The validation prompts in a bundle's training_config.yaml (the captions it was trained on), or []."""
    import yaml

    path = root / "training_config.yaml"
    if not path.is_file():
        return []
    prompts = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("validation", {}).get("prompts") or []
    return [p for p in prompts if isinstance(p, str)]


class FinetuneTrainer(LDMTrainer):
    """``LDMTrainer`` plus what a fine-tune knows once the cache is there: validation prompts drawn from the
    user's captions, the caption words the text encoder cannot tell apart, and the text encoder's weights
    that train (``text.train``): then every step encodes its captions afresh instead of reading the cache."""

    def __init__(self, config: FinetuneConfig, *, base_prompts: list[str], **kwargs):
        super().__init__(config, **kwargs)
        self.base_prompts = base_prompts
        self.prior_cache: Optional[LatentCache] = None
        self.prior_order: Optional[DataOrder] = None
        self.prior_rows = np.zeros(0, dtype=np.int64)  # the prior set's rows of the micro-batch _next_rows gave last

    def _setup(self):
        super()._setup()
        self._setup_prior()
        v, cache = self.config.validation, self.cache
        if v.base_prompts is None:
            v.base_prompts = list(self.base_prompts)
        if v.prompts is None:
            rows = cache.heldout_indices if len(cache.heldout_indices) else cache.train_indices
            v.prompts = draw_prompts([cache.captions[int(i)][0] for i in rows], v.base_prompts)

    def _setup_prior(self) -> None:
        """``prior.data``: its cache (latents and contexts, as data.path's), and every batch's rows split between the two
        sets: batch_size - k from data.path, k = round(prior.share x batch_size) from the prior set's train rows."""
        cfg, acc = self.config, self.accelerator
        if not cfg.prior.data:
            return
        data = copy.deepcopy(cfg.data)
        data.path = cfg.prior.data
        granularity = Text2ImagePipeline(self.unet, self.autoencoder, self.text_encoder, self.schedule, self.sampling).granularity
        with acc.main_process_first():
            folder, _ = build_cache(cfg.cache, data, self.autoencoder, self.text_encoder, self.device,
                                    progress=acc.is_main_process, granularity=granularity)
        self.prior_cache = LatentCache(folder)
        if self.cache.buckets is not None or self.prior_cache.buckets is not None:
            raise ValueError("prior.data needs images of one size in both sets (aspect-ratio buckets are not supported "
                             "with a prior set); set data.buckets.enabled=false or give square images")
        if self.prior_cache.latent_shape != self.cache.latent_shape:
            raise ValueError(f"prior.data {cfg.prior.data} gives latents of shape {self.prior_cache.latent_shape}, "
                             f"data.path {self.cache.latent_shape}; both sets must encode to one size")
        batch = cfg.train.batch_size
        k = max(1, round(cfg.prior.share * batch))
        if k >= batch:
            raise ValueError(f"prior.share={cfg.prior.share} of train.batch_size={batch} leaves no row for data.path; "
                             "lower prior.share or raise train.batch_size")
        self.order = DataOrder(self.cache.train_indices, batch - k, acc.num_processes, acc.process_index, cfg.train.seed)
        self.prior_order = DataOrder(self.prior_cache.train_indices, k, acc.num_processes, acc.process_index,
                                     cfg.train.seed + 1)
        self.notes.append(f"prior.data: {len(self.prior_cache.train_indices)} images from {cfg.prior.data}; each batch "
                          f"takes {batch - k} rows of data.path and {k} of the prior set (its loss weighted {cfg.prior.weight})")

    def _next_rows(self, pos: dict) -> np.ndarray:
        rows = super()._next_rows(pos)
        if self.prior_order is not None:  # the prior set's position follows from the data's: nothing more to checkpoint
            n = pos["epoch"] * self.order.batches_per_epoch + pos["batch_in_epoch"] - 1
            per_epoch = self.prior_order.batches_per_epoch
            self.prior_rows = self.prior_order.batch(n // per_epoch, n % per_epoch)
        return rows

    def _loss(self, rows: np.ndarray, epoch: int) -> torch.Tensor:
        """Without a prior set, ``LDMTrainer._loss``. With one: one U-Net call on the data rows and the prior rows
        together; the mean loss of each part, the prior's weighted by prior.weight, summed."""
        if self.prior_cache is None:
            return super()._loss(rows, epoch)
        cfg, acc = self.config, self.accelerator
        prior = self.prior_rows
        z0 = torch.cat([self.cache.latents(rows), self.prior_cache.latents(prior)]).to(self.device)  # (B, C, h, w)
        ctx = torch.cat([self._contexts(rows, epoch), self._contexts_of(self.prior_cache, prior, epoch)])  # (B, L, D)
        if cfg.train.channels_last:
            z0 = z0.contiguous(memory_format=torch.channels_last)
        ctx = conditioning.apply_caption_dropout(ctx, self._empty_context(), cfg.objective.p_uncond, self.generator)
        batch = noised_batch(z0, self.schedule, prediction=self.sampling.prediction,
                             min_snr_gamma=cfg.objective.min_snr_gamma, noise_offset=cfg.objective.noise_offset,
                             generator=self.generator)
        with acc.autocast():
            pred = self.model(batch.z_t, batch.t, encoder_hidden_states=ctx).sample  # (B, C, h, w)
        per_sample = batch.weight * (pred.float() - batch.target.float()).pow(2).flatten(1).mean(1)  # (B,)
        return per_sample[: len(rows)].mean() + cfg.prior.weight * per_sample[len(rows):].mean()

    def _extra_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The text encoder's weights that ``text.train`` trains, by checkpoint name; also notes the unknown words."""
        captions = sorted({c for options in self.cache.captions for c in options})
        words = unknown_words(self.text_encoder, captions)
        mode = self.config.text.train
        if words:
            listed = ", ".join(f"{w} (in {n} captions)" for w, n in sorted(words.items(), key=lambda x: (-x[1], x[0]))[:12]) + (" ..." if len(words) > 12 else "")
            what = {"frozen": "they stay so (text.train=frozen; text.train=new_words learns a row for each)",
                    "new_words": "text.train=new_words learns a row for each", "full": "text.train=full trains the encoder"}[mode]
            self.notes.append(f"{len(words)} caption words are unknown to the text encoder (their tokens share one row "
                              f"of its token table, so the frozen encoder reads them all as one word): {listed}; {what}")
        if mode == "frozen" or (mode == "new_words" and not words):
            return {}
        named = dict(self.text_encoder.named_parameters())
        if mode == "full":
            params = {n: p for n, p in named.items() if not n.startswith("model.visual.") and n != "model.logit_scale"}
        else:
            name = next(n for n in named if n.endswith("token_embedding.weight"))
            table = named[name]  # (V, D)
            used = {int(i) for i in self.text_encoder.tokenize(captions).unique()}
            new = sorted(shared_token_ids(self.text_encoder) & used)
            generator = torch.Generator().manual_seed(self.config.train.seed)
            with torch.no_grad():  # distinct starting rows, near the shared one
                noise = torch.randn(len(new), table.shape[1], generator=generator) * self.config.text.init_std
                table[new] = table[new] + noise.to(table.device, table.dtype)
            mask = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)  # (V, 1)
            mask[new] = 1
            table.requires_grad_(True)
            table.register_hook(lambda grad: grad * mask)  # only the new rows learn; AdamW moves no row without gradient
            self.notes.append(f"text.train=new_words: learning {len(new)} token rows")
            params = {name: table}
        for p in params.values():
            p.requires_grad_(True)
        self.text_encoder.clear_cache()
        return {f"text_encoder.{n}": p for n, p in params.items()}

    def _extra_groups(self) -> list[dict]:
        if not self.extra:
            return []
        return [{"params": list(self.extra.values()), "lr": self.config.text.lr, "weight_decay": 0.0,
                 "stop_step": self.config.text.steps}]

    def _text_trains(self) -> bool:
        """Whether this step's contexts need gradients: text weights train and text.steps has not passed."""
        stop = self.config.text.steps
        return bool(self.extra) and not (stop and self.lr_scheduler.last_epoch >= stop)

    def _contexts(self, rows, epoch: int) -> torch.Tensor:
        return self._contexts_of(self.cache, rows, epoch)

    def _contexts_of(self, cache: LatentCache, rows, epoch: int) -> torch.Tensor:
        """(B, L, D) contexts of ``cache``'s rows: the cached ones, or from the text encoder when it trains."""
        seed = self.config.train.seed
        if not self.extra:
            return cache.contexts(rows, epoch, seed).to(self.device)
        captions = [cache.captions[int(i)][caption_index(len(cache.captions[int(i)]), seed, epoch, cache.keys[int(i)])]
                    for i in rows]  # the caption LatentCache.contexts would pick
        with torch.set_grad_enabled(self._text_trains()):  # no backward through the encoder once its rows stay
            return self.text_encoder(captions)[0].float()  # (B, L, D), with gradients into the trained rows

    def _empty_context(self) -> torch.Tensor:
        if self.config.text.train == "full" and self.extra:
            return self.text_encoder([""])[0].float()  # (1, L, D): the empty prompt's context moves too
        return super()._empty_context()  # new_words: "" is start, end and padding tokens, all known


def finetune(model: str | Path, config: FinetuneConfig, *, resume: Optional[str] = None,
             stop_at_step: Optional[int] = None) -> TrainResult:
    import vae
    from ldm.bundle import check_bundle, load_schedule, load_unet

    root = check_bundle(model)
    schedule, sampling = load_schedule(root)
    if config.objective.prediction is not None and config.objective.prediction != sampling.prediction:
        raise ValueError(
            f"objective.prediction={config.objective.prediction} but the model at {root} predicts {sampling.prediction}; "
            "leave objective.prediction null to keep the model's"
        )
    if sampling.prediction not in ("eps", "v"):
        raise ValueError(f"the model at {root} predicts {sampling.prediction!r}; fine-tuning supports eps and v models")
    unet = load_unet(root)
    autoencoder = vae.load_autoencoder(root / "vae")
    text_encoder = conditioning.load_text_encoder(root)
    native = int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0])
    if config.data.resolution == 0:
        config.data.resolution = native * autoencoder.downsample_factor
    scorer = None
    if text_encoder.backend == "open_clip":  # our bundles' CLIP has its image tower: it scores the images too
        from conditioning.scorer import load_clip_scorer

        scorer = load_clip_scorer(root)
    if config.lora.method == "lora":
        add_lora(unet, config.lora, config.train.seed)
    else:
        unet.requires_grad_(True)
    trainer = FinetuneTrainer(config, unet=unet, autoencoder=autoencoder, text_encoder=text_encoder, schedule=schedule,
                              sampling=sampling, output_dir=config.train.output_dir, lora=config.lora.method == "lora",
                              base=root, scorer=scorer, base_prompts=base_model_prompts(root))
    return trainer.fit(resume=resume, stop_at_step=stop_at_step)
