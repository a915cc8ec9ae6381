"""LPIPS (Zhang et al. 2018, v0.1, VGG16 backbone) built only from local weight files; nothing is downloaded.

The same computation as the ``lpips`` package's ``LPIPS(net="vgg")`` (checked against it in the tests):
inputs in [-1, 1] are shifted and scaled per channel, VGG16 features are taken at relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3, unit-normalised over channels, their squared differences weighted by a learnt 1x1
convolution per layer, averaged over space and summed over layers.

Weight files: ``lpips_weights``, the linear layers (``lpips/weights/v0.1/vgg.pth`` of the lpips package,
keys ``lin{k}.model.1.weight``); ``vgg_weights``, a torchvision vgg16 state dict (``features.N.*`` keys;
the classifier is ignored). ``.pth`` files are read with ``weights_only=True``; ``.safetensors`` work too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# torchvision vgg16 ``features`` index ranges of the five slices, and each slice's output channels.
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def load_weights(path: str, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a local .pth (weights only) or .safetensors file; ``what`` names the setting."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file {file} not found (LPIPS needs local weights; nothing is downloaded)")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    """Perceptual distance of two image batches (B, 3, H, W) in [-1, 1] -> (B, 1, 1, 1). Frozen."""

    def __init__(self, lpips_weights: str, vgg_weights: str) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        lin = load_weights(lpips_weights, "loss.lpips_weights")
        lin_keys = {f"lin{k}.model.1.weight" for k in range(len(CHANNELS))}
        if set(lin) != lin_keys:
            raise ValueError(f"loss.lpips_weights {lpips_weights}: expected keys {sorted(lin_keys)} "
                             f"(lpips/weights/v0.1/vgg.pth); got {sorted(lin)[:6]}")
        features = make_layers(cfgs["D"])  # vgg16's convolutional part
        vgg = load_weights(vgg_weights, "loss.vgg_weights")
        wanted = {f"features.{k}" for k in features.state_dict()}
        if not wanted <= set(vgg):
            raise ValueError(f"loss.vgg_weights {vgg_weights}: not a torchvision vgg16 state dict "
                             f"(expected keys features.0.weight ... features.28.bias)")
        features.load_state_dict({k[len("features."):]: v for k, v in vgg.items() if k in wanted})
        self.slices = nn.ModuleList(features[lo:hi] for lo, hi in VGG_SLICES)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        for k, conv in enumerate(self.lins):
            conv.weight.data.copy_(lin[f"lin{k}.model.1.weight"])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).float()  # (2B, 3, H, W)
        h = (h - self.shift) / self.scale
        total = 0.0
        for block, lin in zip(self.slices, self.lins):
            h = block(h)  # (2B, C_k, H_k, W_k)
            f = h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10)
            fx, fy = f.chunk(2)
            total = total + lin((fx - fy).square()).mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
        return total
