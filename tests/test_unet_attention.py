"""FP32AttentionProcessor: diffusers' attention in float32, its product in float32 under bf16 autocast."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ldm import testing
from ldm.unet import FP32AttentionProcessor


def forward_backward(unet, processor, dtype=None):
    """(output, gradient of every parameter) of one U-Net call with ``processor`` in all attention blocks."""
    unet.set_attn_processor(processor)
    unet.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    z, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 16, generator=g)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = unet(z, torch.tensor([1, 500, 999]), encoder_hidden_states=ctx).sample
    out.float().pow(2).mean().backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_float32_output_and_gradients_equal_diffusers():
    unet = testing.unet().train()
    ref_out, ref_grads = forward_backward(unet, AttnProcessor2_0())
    out, grads = forward_backward(unet, FP32AttentionProcessor())
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("attn2.to_k" in n for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_under_bf16_autocast_only_the_product_is_float32(monkeypatch):
    unet = testing.unet().train()
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(q.dtype) or real(q, k, v, **kw))
    projections = []
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.register_forward_hook(
        lambda m, i, o: projections.append(o.dtype))
    bf16_out, _ = forward_backward(unet, FP32AttentionProcessor(), torch.bfloat16)
    assert seen and set(seen) == {torch.float32}
    assert projections == [torch.bfloat16]
    fp32_out, _ = forward_backward(unet, FP32AttentionProcessor())
    assert 0 < (bf16_out - fp32_out).abs().max() < 0.1 * fp32_out.abs().max()  # bf16 precision, not another function


@pytest.mark.parametrize("kind", ["mask", "group_norm"])
def test_features_it_does_not_implement_go_to_diffusers(kind):
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, norm_num_groups=4 if kind == "group_norm" else None)
    x = torch.randn(2, 6, 16)
    mask = torch.zeros(2, 6, 6).masked_fill(torch.rand(2, 6, 6) < 0.3, -1e4) if kind == "mask" else None
    attn.set_processor(AttnProcessor2_0())
    expected = attn(x, attention_mask=mask)
    attn.set_processor(FP32AttentionProcessor())
    torch.testing.assert_close(attn(x, attention_mask=mask), expected)
    if kind == "mask":  # the mask matters, so the comparison has teeth
        assert (attn(x) - expected).abs().max() > 1e-3
