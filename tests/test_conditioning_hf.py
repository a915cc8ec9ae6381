"""transformers backend: a tiny CLIPTextModel and a CLIPTokenizer saved locally in Stable Diffusion's
layout, behind the same interface; the context equals calling CLIPTextModel directly as diffusers does."""

import copy

import open_clip
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from conditioning import load_clip_scorer, load_text_encoder
from conditioning.bpe import EOS_TOKEN, clip_bpe_vocab, write_clip_tokenizer_files
from conditioning.hf_clip_backend import HFCLIPTextEncoder

PROMPTS = ["koala, twemoji style", "a small red circle at the top left", "", "grinning face"]
NUM_MERGES = 3000


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion-style text_encoder/ + tokenizer/ pair."""
    root = tmp_path_factory.mktemp("sd")
    write_clip_tokenizer_files(root / "tokenizer", num_merges=NUM_MERGES)
    vocab, _ = clip_bpe_vocab(NUM_MERGES)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab[EOS_TOKEN],
                            pad_token_id=vocab[EOS_TOKEN])
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


def direct(root, prompts, **kwargs):
    """What diffusers' encode_prompt does: tokenizer to max_length, then the CLIPTextModel."""
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    model = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model, model(ids, **kwargs)


def test_context_equals_clip_text_model_called_directly(sd_folder):
    encoder = load_text_encoder(sd_folder)
    assert isinstance(encoder, HFCLIPTextEncoder)
    assert (encoder.max_length, encoder.context_dim, encoder.pooled_dim) == (77, 32, 32)
    ids, _, out = direct(sd_folder, PROMPTS)
    assert torch.equal(encoder.tokenize(PROMPTS), ids)
    context, pooled = encoder(PROMPTS)
    assert context.shape == (4, 77, 32) and pooled.shape == (4, 32)
    assert torch.equal(context, out.last_hidden_state)
    assert torch.equal(pooled, out.pooler_output)
    # the empty context is encoded alone, the reference as row 2 of 4: equal up to float32 rounding
    torch.testing.assert_close(encoder.empty_context(2), out.last_hidden_state[2:3].expand(2, -1, -1), rtol=1e-5, atol=1e-5)


def test_penultimate_is_hidden_states_minus_2_with_final_layer_norm(sd_folder):
    encoder = load_text_encoder(sd_folder, layer="penultimate")
    ids, model, out = direct(sd_folder, PROMPTS, output_hidden_states=True)
    context, pooled = encoder(PROMPTS)
    torch.testing.assert_close(context, model.final_layer_norm(out.hidden_states[-2]), rtol=0, atol=0)  # diffusers clip_skip=1
    # SD2's diffusers text encoder is the same model with its last layer removed
    shorter_cfg = copy.deepcopy(model.config)
    shorter_cfg.num_hidden_layers -= 1
    shorter = CLIPTextModel(shorter_cfg).eval()
    shorter.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(context, shorter(ids).last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, out.pooler_output)  # pooled from the final layer


def test_save_load_round_trip_keeps_weights_layer_and_tokenizer(sd_folder, tmp_path):
    encoder = load_text_encoder(sd_folder, layer="penultimate")
    encoder.save_pretrained(tmp_path)
    loaded = load_text_encoder(tmp_path / "text_encoder")
    assert loaded.layer == "penultimate"
    assert loaded.weights_hash() == encoder.weights_hash()
    for a, b in zip(loaded(PROMPTS), encoder(PROMPTS)):
        assert torch.equal(a, b)
    assert CLIPTextModel.from_pretrained(tmp_path / "text_encoder") is not None  # still a plain transformers folder


def test_with_projection_gives_projected_pooled(sd_folder, tmp_path):
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(sd_folder / "text_encoder"))
    model.save_pretrained(tmp_path / "text_encoder")
    write_clip_tokenizer_files(tmp_path / "tokenizer", num_merges=NUM_MERGES)
    encoder = load_text_encoder(tmp_path)
    context, pooled = encoder(PROMPTS)
    assert encoder.pooled_dim == 16 and pooled.shape == (4, 16)
    with torch.no_grad():
        out = model.eval()(encoder.tokenize(PROMPTS))
    assert torch.equal(pooled, out.text_embeds) and torch.equal(context, out.last_hidden_state)


def test_long_prompt_warns_and_bad_input_raises(sd_folder):
    encoder = load_text_encoder(sd_folder)
    long = " ".join(["red"] * 90)
    with pytest.warns(UserWarning, match=r"92 tokens long.*last 15 tokens were dropped"):
        tokens = encoder.tokenize([long])
    ids, _, _ = direct(sd_folder, [long])
    assert torch.equal(tokens, ids)  # the same cut as the tokenizer's own truncation
    for bad in (["a", 1.5], [], "a"):
        with pytest.raises(ValueError, match="prompt"):
            encoder(bad)


def test_clip_scorer_needs_an_image_tower(sd_folder):
    with pytest.raises(ValueError, match="without an image tower"):
        load_clip_scorer(sd_folder)


def test_exported_full_vocabulary_tokenizes_like_open_clip(tmp_path):
    write_clip_tokenizer_files(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 49408
    prompts = ["koala, twemoji style", "A small RED circle at the top-left!", "man: curly hair, medium-dark skin tone"]
    ours = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ref = open_clip.tokenize(prompts)
    for a, b in zip(ours, ref):
        n = int(b.argmax()) + 1  # up to the end token; padding differs (end token vs 0)
        assert torch.equal(a[:n], b[:n])
