"""Tiny stand-ins for the autoencoder and text encoder, for pipeline tests that are about the
pipeline's own logic (batching, seeds, guidance, shapes), with a real tiny diffusers U-Net."""

import hashlib

import torch

from ldm import testing

CONTEXT_DIM = 16
LENGTH = 5


def tiny_unet(sample_size=8, seed=0):
    return testing.unet((8, 16), 1, CONTEXT_DIM, sample_size, seed)


class FakeTextEncoder(torch.nn.Module):
    """A prompt's context is a fixed pseudo-random function of its text."""

    context_dim, max_length = CONTEXT_DIM, LENGTH

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, prompts):
        self.calls.append(list(prompts))
        rows = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little")
            rows.append(torch.randn(LENGTH, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows), torch.stack(rows).mean(1)  # (B, L, D), (B, D)

    def empty_context(self, batch_size):
        return self([""])[0].expand(batch_size, -1, -1)


class FakeAutoencoder(torch.nn.Module):
    """decode: a fixed 1x1 conv to RGB, then nearest upsampling by f."""

    downsample_factor, latent_channels = 4, 4

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Conv2d(4, 3, 1)

    def decode(self, z):  # (B, 4, h, w) -> (B, 3, 4h, 4w)
        return torch.tanh(torch.nn.functional.interpolate(self.proj(z), scale_factor=self.downsample_factor))


# -- guidance: a conditional model that records its calls ------------------------------------------------


class CountingModel:
    """A conditional 'model' whose output depends non-linearly on x, t and the context; records every call."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, context):  # x (B, C, H, W), t (B,), context (B, L, D)
        assert x.shape[0] == t.shape[0] == context.shape[0]
        self.batches.append(x.shape[0])
        c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return torch.sin(x + 3 * c) * (1 + t.view(-1, 1, 1, 1).float() / 1000) + c


def contexts(batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 7, 16, generator=g), torch.randn(batch, 7, 16, generator=g)  # cond, uncond
