"""Autoencoder training losses: L1/L2 reconstruction, PatchGAN with hinge loss, and the VQGAN paper's
adaptive weight (Esser et al. 2021, eq. 7; CompVis taming-transformers
``vqperceptual.py``, latent-diffusion ``contperceptual.py``). LPIPS is ``vae.lpips``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vae.config import LossConfig


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """l1_weight * mean |x - x_rec| + l2_weight * mean (x - x_rec)^2, computed in float32."""
    diff = x.float() - x_rec.float()  # (B, 3, H, W)
    loss = torch.zeros((), device=x.device)
    if config.l1_weight:
        loss = loss + config.l1_weight * diff.abs().mean()
    if config.l2_weight:
        loss = loss + config.l2_weight * diff.square().mean()
    return loss


# --- PatchGAN ---------------------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix as used by VQGAN (taming ``NLayerDiscriminator``, BatchNorm):
    images (B, 3, H, W) -> patch logits (B, 1, H', W')."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)  # (B, 1, H', W')


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss against a hinge discriminator: -mean D(x_rec)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN eq. 7: lambda = ||grad_L rec|| / (||grad_L gan|| + 1e-4) at the decoder's last layer L,
    clamped to [0, 1e4] and detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def gan_active(config: LossConfig, step: int) -> bool:
    """Whether the discriminator and its loss are on at ``step`` (VQGAN's ``adopt_weight`` threshold)."""
    return config.disc_weight > 0 and step >= config.disc_start


def build_discriminator(config: LossConfig, in_channels: int = 3) -> Optional[PatchDiscriminator]:
    """The PatchGAN ``config`` asks for, or None when ``disc_weight`` is 0."""
    if config.disc_weight <= 0:
        return None
    return PatchDiscriminator(in_channels, config.disc_channels, config.disc_layers)
