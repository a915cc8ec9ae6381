"""Training-time quantisation: same codes as diffusers, straight-through gradients, VQ-VAE losses,
EMA updates, k-means init and dead-code restarts, checked against hand computations."""

import pytest
import torch
from diffusers.models.autoencoders.vae import VectorQuantizer
from torch import nn

from vae.config import QuantizerConfig
from vae.vq import CodebookTrainer, kmeans, nearest_codes


def codebook_trainer(k=8, d=4, **kw):
    emb = nn.Embedding(k, d)
    kw = {"kmeans_init": False, "dead_code_threshold": 0.0, **kw}
    return emb, CodebookTrainer(emb, QuantizerConfig(**kw))


def test_codes_and_quantised_values_match_diffusers_vector_quantizer():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4, beta=0.25)
    vq.embedding.weight.data.normal_()
    _, ours = codebook_trainer(32, 4, update="loss")
    ours.embedding = [vq.embedding]
    z = torch.randn(2, 4, 5, 6)
    z_q, _, (_, _, idx) = vq(z)
    out = ours.eval()(z)
    assert torch.equal(out.indices.flatten(), idx.flatten())
    torch.testing.assert_close(out.z_q, z_q)
    assert torch.equal(nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, 4), vq.embedding.weight), idx.flatten())


def test_straight_through_gradient_and_vq_vae_losses():
    emb, cb = codebook_trainer(update="loss", beta=0.5)
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    out = cb(z)
    e = emb.weight[out.indices.flatten()].detach()  # (9, 4)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    assert out.codebook_loss.item() == pytest.approx(((flat - e) ** 2).mean().item(), rel=1e-6)
    assert out.commitment_loss.item() == pytest.approx(0.5 * ((flat - e) ** 2).mean().item(), rel=1e-6)
    upstream = torch.randn_like(out.z_q)
    (out.z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # identity gradient through the quantiser
    out.codebook_loss.backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0  # "loss" mode learns the codebook


def test_ema_update_follows_the_formula():
    emb, cb = codebook_trainer(k=3, d=2, update="ema", ema_decay=0.9)
    emb.weight.data = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]])
    cb.ema_count.fill_(1.0)
    cb.ema_sum.copy_(emb.weight.data)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]).view(1, 3, 1, 2).permute(0, 3, 1, 2)  # (1, 2, 1, 3)
    out = cb(z)
    assert out.indices.flatten().tolist() == [0, 0, 1]
    assert emb.weight.requires_grad is False and out.codebook_loss.item() == 0.0
    n = torch.tensor([0.9 + 0.1 * 2, 0.9 + 0.1 * 1, 0.9])
    m = torch.tensor([[0.1 * 1, 0.1 * 1], [9.0 + 0.9, 9.0 + 0.9], [-9.0, 4.5]])
    torch.testing.assert_close(cb.ema_count, n)
    smoothed = (n + 1e-5) / (n.sum() + 3e-5) * n.sum()
    torch.testing.assert_close(emb.weight.data, m / smoothed[:, None])


def test_dead_codes_restart_on_encoder_outputs():
    torch.manual_seed(0)
    emb, cb = codebook_trainer(k=6, d=2, update="ema", dead_code_threshold=0.5)
    emb.weight.data = torch.tensor([[0.0, 0.0]] + [[100.0, 100.0]] * 5)  # one live code, five far away
    cb.ema_count.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    cb.ema_sum.copy_(emb.weight.data * cb.ema_count[:, None])
    z = torch.randn(1, 2, 4, 4)
    cb(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert int(cb.restarted) == 5
    for code in emb.weight.data[1:]:  # each restarted code is one of this batch's encoder outputs
        assert (flat - code).abs().sum(1).min() < 1e-6
    assert cb(z).indices.unique().numel() > 1  # and now gets used


def test_kmeans_finds_separated_clusters_and_initialises_the_codebook():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = kmeans(x, 3, iters=20, generator=g)
    # every true centre has a centroid near it
    assert torch.cdist(centres, found).min(1).values.max() < 0.1
    emb, cb = codebook_trainer(k=3, d=2, kmeans_init=True, kmeans_iters=20)
    cb(x.view(1, 150, 1, 2).permute(0, 3, 1, 2))
    assert bool(cb.initialised)
    assert torch.cdist(centres, emb.weight.data).min(1).values.max() < 0.2


def test_usage_window_reports_fraction_and_perplexity():
    emb, cb = codebook_trainer(k=4, d=1, update="loss", usage_window=2)
    emb.weight.data = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    z = torch.tensor([0.0, 0.1, 1.0, 1.1]).view(1, 1, 1, 4)  # codes 0, 0, 1, 1
    cb(z)
    assert cb.usage() == (0.5, pytest.approx(2.0))
    cb(z)
    assert float(cb.last_usage) == 0.5 and int(cb.window_steps) == 0
    cb.eval()(torch.full((1, 1, 1, 4), 3.0))  # eval mode: no counting
    assert cb.usage() == (0.5, pytest.approx(2.0))
