"""Autoencoder losses: our LPIPS built from local files agrees with the lpips package (the reference), PatchGAN shape,
hinge losses and VQGAN's adaptive weight by hand."""

import warnings
from pathlib import Path
from types import SimpleNamespace

import lpips
import pytest
import torch
import torchvision
from torch import nn

from vae.config import LossConfig
from vae.losses import (PatchDiscriminator, adaptive_weight, build_discriminator, gan_active, hinge_d_loss,
                        hinge_g_loss, reconstruction_loss)
from vae.lpips import LPIPS

LPIPS_LIN = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"  # ships with the lpips package


def vgg16_features_state(path):
    """A torchvision vgg16 state dict (features only; random weights stand in for the ImageNet ones)."""
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).eval()
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return SimpleNamespace(features=features)


def test_lpips_from_local_files_matches_the_lpips_package(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vgg = vgg16_features_state(tmp_path / "vgg16.pth")
    # the reference: lpips' own LPIPS(vgg) with its shipped linear layers, built around this very vgg16
    monkeypatch.setattr(lpips.pretrained_networks.tv, "vgg16", lambda *a, **k: vgg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="vgg", model_path=str(LPIPS_LIN), verbose=False).eval()
    monkeypatch.undo()
    ours = LPIPS(str(LPIPS_LIN), str(tmp_path / "vgg16.pth"))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), reference(x, y))
        assert ours(x, y).min() > 0 and ours(x, x).abs().max() < 1e-6
    assert not any(p.requires_grad for p in ours.parameters())


def test_lpips_weight_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LPIPS(str(tmp_path / "missing.pth"), str(tmp_path / "vgg.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="expected keys"):
        LPIPS(str(tmp_path / "bad.pth"), str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="not a torchvision vgg16 state dict"):
        LPIPS(str(LPIPS_LIN), str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="given together"):
        LossConfig(lpips_weights=str(LPIPS_LIN))


def test_reconstruction_loss_weights_l1_and_l2():
    x, y = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert reconstruction_loss(x, y, LossConfig(l1_weight=1.0, l2_weight=0.0)).item() == pytest.approx(0.5)
    assert reconstruction_loss(x, y, LossConfig(l1_weight=0.0, l2_weight=2.0)).item() == pytest.approx(0.5)
    assert reconstruction_loss(x, y, LossConfig(l1_weight=1.0, l2_weight=1.0)).item() == pytest.approx(0.75)


def test_patchgan_and_hinge_losses():
    d = PatchDiscriminator(3, channels=8, layers=3)
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # pix2pix 70x70 PatchGAN geometry
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    assert build_discriminator(LossConfig()) is None
    cfg = LossConfig(disc_weight=0.5, disc_start=10)
    assert isinstance(build_discriminator(cfg), PatchDiscriminator)
    assert (gan_active(cfg, 9), gan_active(cfg, 10), gan_active(LossConfig(disc_start=0), 5)) == (False, True, False)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    out = layer(torch.randn(5, 4))
    rec = out.square().mean()
    gan = -(out * torch.randn(5, 3)).mean()
    w = adaptive_weight(rec, gan, layer.weight)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    assert w.item() == pytest.approx((g_rec.norm() / (g_gan.norm() + 1e-4)).item(), rel=1e-6)
    assert not w.requires_grad
