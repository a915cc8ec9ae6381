"""Embedding cache: computed once, reused by a later run without calling the encoder, recomputed when
the encoder's weights change; the stored contexts are the encoder's and the file is plain safetensors."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from conditioning import ClipModelConfig, EmbeddingCache, TextTowerConfig, VisionTowerConfig, build_text_encoder

CAPTIONS = ["a red circle", "a blue square", "a red circle", "koala, twemoji style", "a green triangle"]


@pytest.fixture()
def encoder():
    torch.manual_seed(0)
    cfg = ClipModelConfig(embed_dim=16, vision=VisionTowerConfig(image_size=32, width=16, layers=1, patch_size=16, head_width=16),
                          text=TextTowerConfig(width=16, heads=2, layers=2))
    return build_text_encoder({"model_cfg": cfg.to_open_clip()})


class Counting:
    """Counts the encoder's forward passes over token batches."""

    def __init__(self, encoder):
        self.prompts = 0
        inner = encoder._encode_tokens

        def counted(tokens):
            self.prompts += tokens.shape[0]
            return inner(tokens)

        encoder._encode_tokens = counted


def test_contexts_are_computed_once_and_equal_the_encoders(encoder, tmp_path):
    calls = Counting(encoder)
    emb = EmbeddingCache(tmp_path, encoder, batch_size=2, progress=False).get(CAPTIONS)
    assert emb.computed and calls.prompts == 4  # the 4 distinct captions, once each
    context, pooled = emb.batch(range(len(CAPTIONS)))
    ref_context, ref_pooled = encoder(CAPTIONS)
    # the cache encoded batches of 2, the reference one batch of 5: other GEMM blockings and kernels give
    # float32 results a few ulps apart (1.1e-6 seen on values ~3), so float tolerances scaled to |values| ~ 1-3
    torch.testing.assert_close(context, ref_context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    c3, p3 = emb[3]
    assert c3.shape == (77, 16) and torch.allclose(c3, ref_context[3], rtol=1e-5, atol=1e-5)
    stored = load_file(emb.path)  # a plain safetensors file
    assert stored["context"].shape == (4, 77, 16) and stored["pooled"].shape == (4, 16)


def test_a_later_run_reuses_the_file_without_encoding(encoder, tmp_path):
    first = EmbeddingCache(tmp_path, encoder, progress=False).get(CAPTIONS)
    reloaded = copy.deepcopy(encoder)  # "another run": a fresh encoder object with the same weights
    calls = Counting(reloaded)
    again = EmbeddingCache(tmp_path, reloaded, progress=False).get(list(reversed(CAPTIONS)) + ["a blue square"])
    assert not again.computed and calls.prompts == 0
    assert again.path == first.path
    assert torch.equal(again.batch([0])[0], first.batch([len(CAPTIONS) - 1])[0])  # rows follow the caption list


def test_changed_weights_or_captions_recompute(encoder, tmp_path):
    cache = EmbeddingCache(tmp_path, encoder, progress=False)
    first = cache.get(CAPTIONS)
    with torch.no_grad():
        encoder.model.token_embedding.weight.mul_(1.5)
    encoder.clear_cache()
    changed = cache.get(CAPTIONS)
    assert changed.computed and changed.path != first.path
    # a batch of 4 distinct captions against a batch of 1: equal up to float32 rounding
    torch.testing.assert_close(changed.batch([0])[0], encoder(CAPTIONS[:1])[0], rtol=1e-5, atol=1e-5)
    assert cache.get(CAPTIONS + ["a new caption"]).computed
    assert len(list(tmp_path.glob("*.safetensors"))) == 3 and not list(tmp_path.glob(".*"))


def test_half_precision_storage_and_bad_input(encoder, tmp_path):
    emb = EmbeddingCache(tmp_path, encoder, store_dtype=torch.float16, progress=False).get(CAPTIONS)
    context, _ = emb.batch([1])
    assert context.dtype == torch.float16
    torch.testing.assert_close(context.float(), encoder(CAPTIONS[1:2])[0], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="empty list"):
        EmbeddingCache(tmp_path, encoder).get([])
    with pytest.raises(ValueError, match="TextEncoder"):
        EmbeddingCache(tmp_path, object())
