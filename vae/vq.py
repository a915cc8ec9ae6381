"""Training-time vector quantisation over a diffusers ``VQModel``'s codebook, with codebook health.

The codebook is the model's own ``quantize.embedding.weight`` (so a saved folder is a plain VQModel);
this module adds what training needs around it:

* nearest-code assignment identical to diffusers' ``VectorQuantizer`` (argmin of the L2 distance),
  the straight-through estimator ``z_q = z + sg[e - z]``, and the VQ-VAE losses
  codebook ``||sg[z] - e||^2`` and commitment ``beta ||z - sg[e]||^2``;
* ``update="ema"``: the codebook is an exponential moving average of the encoder outputs assigned to
  each code (VQ-VAE appendix A.1, VQ-VAE-2): N_k <- d N_k + (1-d) n_k, m_k <- d m_k + (1-d) sum z,
  e_k = m_k / N~_k with Laplace smoothing; the codebook loss is then unused;
* k-means initialisation of the codebook on the first batch of encoder outputs;
* dead-code restarts: a code whose EMA assignment count per step falls below a threshold is moved onto
  a random encoder output of the current batch (as in Jukebox / vector-quantize-pytorch);
* usage counters for the log: the fraction of codes hit and the perplexity exp(H(p)) of code use.

Everything that must survive a resume (EMA counts and sums, the usage window) is a buffer of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vae.config import QuantizerConfig
from vae.metrics import codebook_usage, perplexity

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (identity on one)
Broadcast = Callable[[torch.Tensor], None]  # copies process 0's tensor into every process's, in place


@dataclass
class QuantizeOutput:
    z_q: torch.Tensor  # (B, D, h, w) straight-through quantised latents: forward value e, gradient to z
    indices: torch.Tensor  # (B, h, w) long, chosen codes
    codebook_loss: torch.Tensor  # () ||sg[z] - e||^2 (zero when the codebook is an EMA)
    commitment_loss: torch.Tensor  # () beta * ||z - sg[e]||^2


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (L2) for each row of z (N, D) in codebook (K, D) -> (N,) long.
    Same choice as diffusers' ``VectorQuantizer`` (argmin of ``torch.cdist``), computed in float32."""
    z, codebook = z.float(), codebook.float()
    dist = z.square().sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.square().sum(1)[None]  # (N, K)
    return dist.argmin(1)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Lloyd's k-means on rows of x (N, D) -> centroids (k, D). Starts from k random rows (with
    repetition when N < k); an empty cluster is moved onto a random row."""
    n = x.shape[0]
    pick = torch.randint(n, (k,), generator=generator, device=x.device) if n < k else \
        torch.randperm(n, generator=generator, device=x.device)[:k]
    centroids = x[pick].clone()  # (k, D)
    for _ in range(iters):
        assign = nearest_codes(x, centroids)  # (N,)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (k, D)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            refill = torch.randint(n, (int(empty.sum()),), generator=generator, device=x.device)
            centroids[empty] = x[refill]
    return centroids


class CodebookTrainer(nn.Module):
    """Quantises encoder outputs against ``embedding`` (the VQModel's ``quantize.embedding``) and keeps
    the codebook healthy as ``config`` says. Call ``forward`` once per training step with the
    pre-quantisation latents (after ``quant_conv``)."""

    def __init__(self, embedding: nn.Embedding, config: QuantizerConfig, broadcast: Optional[Broadcast] = None) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list, so the model's parameter is not registered twice
        self.config = config
        self.broadcast = broadcast  # multi-process: k-means init and restarts are random; process 0's win
        k, d = embedding.weight.shape
        if config.update == "ema":
            embedding.weight.requires_grad_(False)
        self.register_buffer("ema_count", torch.zeros(k))  # N_k: EMA of assignments per step
        self.register_buffer("ema_sum", embedding.weight.detach().clone())  # m_k: EMA of assigned sums
        self.register_buffer("initialised", torch.tensor(not config.kmeans_init))
        self.register_buffer("window_hits", torch.zeros(k))  # assignments in the current usage window
        self.register_buffer("window_steps", torch.tensor(0))
        self.register_buffer("last_usage", torch.tensor(0.0))  # usage and perplexity of the last full window
        self.register_buffer("last_perplexity", torch.tensor(0.0))
        self.register_buffer("restarted", torch.tensor(0))  # codes restarted so far

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding[0].weight  # (K, D)

    def forward(self, z: torch.Tensor, reduce: Optional[Reduce] = None,
                generator: Optional[torch.Generator] = None) -> QuantizeOutput:
        """z (B, D, h, w) -> QuantizeOutput. In training mode this also updates the codebook (EMA,
        k-means init, restarts) and the usage counters; ``reduce`` sums statistics over processes and
        ``generator`` drives the random choices of k-means init and restarts."""
        reduce = reduce or (lambda t: t)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        if self.training and not bool(self.initialised):
            self._kmeans_init(flat.detach().float(), generator)
        indices = nearest_codes(flat.detach(), self.codebook)  # (B*h*w,)
        e = F.embedding(indices, self.codebook).to(z.dtype)  # (B*h*w, D)
        if self.training:
            self._update(flat.detach().float(), indices, reduce, generator)
        z_q = (flat + (e - flat).detach()).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
        commitment = self.config.beta * F.mse_loss(flat.float(), e.detach().float())
        if self.config.update == "loss":
            codebook_loss = F.mse_loss(e.float(), flat.detach().float())
        else:
            codebook_loss = torch.zeros((), device=z.device)
        return QuantizeOutput(z_q, indices.view(b, h, w), codebook_loss, commitment)

    # --- codebook updates ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor, generator: Optional[torch.Generator]) -> None:
        centroids = kmeans(flat, self.codebook.shape[0], self.config.kmeans_iters, generator)  # (K, D)
        self.codebook.data.copy_(centroids)
        self.ema_sum.copy_(centroids)
        self.ema_count.fill_(1.0)
        self.initialised.fill_(True)
        self._sync()

    def _sync(self) -> None:
        if self.broadcast is not None:
            for tensor in (self.codebook.data, self.ema_sum, self.ema_count):
                self.broadcast(tensor)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, reduce: Reduce,
                generator: Optional[torch.Generator]) -> None:
        k = self.codebook.shape[0]
        counts = reduce(torch.bincount(indices, minlength=k).float())  # (K,) n_k
        sums = reduce(torch.zeros(k, flat.shape[1], device=flat.device).index_add_(0, indices, flat))  # (K, D)
        decay = self.config.ema_decay
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        if self.config.update == "ema":
            total = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (total + k * 1e-5) * total  # Laplace smoothing of N_k
            self.codebook.data.copy_(self.ema_sum / smoothed[:, None])
        if self.config.dead_code_threshold > 0:
            self._restart_dead(flat, generator)
        self.window_hits.add_(counts)
        self.window_steps.add_(1)
        if int(self.window_steps) >= self.config.usage_window:
            self.last_usage.fill_(codebook_usage(self.window_hits))
            self.last_perplexity.fill_(perplexity(self.window_hits))
            self.window_hits.zero_()
            self.window_steps.zero_()

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, generator: Optional[torch.Generator]) -> None:
        """Move codes whose EMA count is below the threshold onto random encoder outputs of this batch
        (the EMA statistics are summed over processes, so every process finds the same dead codes)."""
        dead = self.ema_count < self.config.dead_code_threshold  # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device, generator=generator)
        new = flat[pick]  # (n_dead, D)
        self.codebook.data[dead] = new
        self.ema_sum[dead] = new * self.config.dead_code_threshold
        self.ema_count[dead] = self.config.dead_code_threshold
        self.restarted.add_(n_dead)
        self._sync()

    # --- log ----------------------------------------------------------------------------------------------
    def usage(self) -> tuple[float, float]:
        """(fraction of codes used, perplexity) over the last full window, or the current one if none yet."""
        if float(self.last_usage) > 0:
            return float(self.last_usage), float(self.last_perplexity)
        return codebook_usage(self.window_hits), perplexity(self.window_hits)
