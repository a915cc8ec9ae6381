"""open_clip text encoder: agreement with open_clip itself, SD2's penultimate layer, the empty prompt,
truncation warnings, save/load round trips and clear errors on bad input."""

import copy
import json

import open_clip
import pytest
import torch

from conditioning import (
    EMPTY_PROMPT,
    ClipModelConfig,
    TextEncoderConfig,
    TextTowerConfig,
    VisionTowerConfig,
    apply_caption_dropout,
    build_text_encoder,
    load_text_encoder,
    unconditional_context,
)
from conditioning.clip_model import build_open_clip_model, resolve_model_cfg

PROMPTS = ["koala, twemoji style", "a small red circle at the top left", "", "Grinning Face!!"]


def tiny_model_cfg(text_layers=3):
    return ClipModelConfig(
        embed_dim=24,
        vision=VisionTowerConfig(image_size=32, width=32, layers=1, patch_size=16, head_width=16),
        text=TextTowerConfig(width=32, heads=2, layers=text_layers),
    ).to_open_clip()


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_text_encoder(TextEncoderConfig(model_cfg=tiny_model_cfg()))


def test_context_and_pooled_agree_with_open_clip(encoder):
    tokens = open_clip.tokenize(PROMPTS)  # (B, 77), open_clip's own tokenizer
    assert torch.equal(encoder.tokenize(PROMPTS), tokens)
    context, pooled = encoder(PROMPTS)
    assert context.shape == (4, 77, 32) and pooled.shape == (4, 24)
    assert (encoder.max_length, encoder.context_dim, encoder.pooled_dim) == (77, 32, 24)
    with torch.no_grad():
        ref = encoder.model.forward_intermediates(text=tokens, text_indices=2, normalize_intermediates=True)
        ref_pooled = encoder.model.encode_text(tokens)
    torch.testing.assert_close(context, ref["text_intermediates"][-1], rtol=0, atol=1e-6)  # final block + ln_final
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)


def test_penultimate_is_sd2_layer_with_final_layer_norm(encoder):
    penult = copy.deepcopy(encoder)
    penult.layer = "penultimate"
    context, pooled = penult(PROMPTS)
    tokens = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        ref = encoder.model.forward_intermediates(text=tokens, text_indices=2, normalize_intermediates=True)
        # SD2 checkpoints in diffusers drop the last block: the same model with one block fewer
        shorter = copy.deepcopy(encoder.model)
        shorter.transformer.resblocks = shorter.transformer.resblocks[:-1]
        x = shorter.token_embedding(tokens) + shorter.positional_embedding
        ref_shorter = shorter.ln_final(shorter.transformer(x, attn_mask=shorter.attn_mask))
    torch.testing.assert_close(context, ref["text_intermediates"][-2], rtol=0, atol=1e-6)
    torch.testing.assert_close(context, ref_shorter, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, encoder(PROMPTS)[1])  # pooled always from the final layer
    assert not torch.allclose(context, encoder(PROMPTS)[0])
    encoder.empty_context(1)  # cached for "final" ...
    switched = copy.deepcopy(encoder)
    switched.layer = "penultimate"  # ... and dropped when the layer changes
    # PROMPTS[2] is "": a batch of 1 against row 2 of a batch of 4, equal up to float32 rounding (the final
    # layer's context, which the cache must not return, is O(1) away)
    torch.testing.assert_close(switched.empty_context(1), context[2:3], rtol=1e-5, atol=1e-5)


def test_empty_context_is_the_encoders_output_for_empty_prompt_computed_once(encoder):
    assert EMPTY_PROMPT == ""
    e = encoder.empty_context(3)
    assert e.shape == (3, 77, 32)
    torch.testing.assert_close(e, encoder([""])[0].expand(3, -1, -1), rtol=0, atol=0)
    assert encoder.empty_context(5).data_ptr() == e.data_ptr()  # cached, not recomputed
    moved = copy.deepcopy(encoder).to(torch.float64)
    assert moved.empty_context(1).dtype == torch.float64  # the cache follows .to()


def test_caption_dropout_replaces_whole_rows_by_the_empty_context(encoder):
    context, _ = encoder(["a"] * 400)
    empty = encoder.empty_context(1)
    assert torch.equal(apply_caption_dropout(context, empty, 0.0), context)
    assert torch.equal(apply_caption_dropout(context, empty, 1.0), empty.expand(400, -1, -1))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    out = apply_caption_dropout(context, empty, 0.25, g())
    is_empty = (out == empty).all(dim=(1, 2))
    is_kept = (out == context).all(dim=(1, 2))
    assert bool((is_empty | is_kept).all())
    assert 0.18 < is_empty.float().mean().item() < 0.32  # 400 coin flips with p = 0.25
    assert torch.equal(apply_caption_dropout(context, empty, 0.25, g()), out)  # reproducible
    with pytest.raises(ValueError, match="p_uncond"):
        apply_caption_dropout(context, empty, 1.5)


def test_negative_prompt_replaces_the_empty_context_at_sampling(encoder):
    assert torch.equal(unconditional_context(encoder, 2), encoder.empty_context(2))
    assert torch.equal(unconditional_context(encoder, 2, ""), encoder.empty_context(2))
    neg = unconditional_context(encoder, 2, "blurry")
    assert neg.shape == (2, 77, 32)
    torch.testing.assert_close(neg[1], encoder(["blurry"])[0][0])


def test_long_prompt_is_truncated_with_a_warning_counting_dropped_tokens(encoder):
    long = " ".join(["koala"] * 100)  # 100 word tokens + start + end = 102
    with pytest.warns(UserWarning, match=r"102 tokens long.*last 25 tokens were dropped") as record:
        tokens = encoder.tokenize([long, "short"])
    assert "koala koala" in str(record[0].message)  # names the prompt, shortened
    assert len(str(record[0].message)) < 200
    assert tokens.shape == (2, 77)
    assert tokens[0, -1].item() == encoder.eos_token_id  # the end token is kept
    assert torch.equal(tokens[0], open_clip.tokenize([long])[0])  # as open_clip truncates
    with pytest.warns(UserWarning, match="25 tokens were dropped"):
        context, _ = encoder([long])
    assert context.shape == (1, 77, 32)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ("a koala", "single string"),
        ([], "empty list"),
        (["ok", 3], r"prompts\[1\] is int"),
        ([None], r"prompts\[0\] is NoneType"),
        (("a", b"bytes"), r"prompts\[1\] is bytes"),
    ],
)
def test_bad_prompts_raise_clear_errors(encoder, prompts, message):
    with pytest.raises(ValueError, match=message):
        encoder(prompts)


def test_save_load_round_trip_is_exact(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "bundle")
    assert (tmp_path / "bundle/text_encoder/open_clip_config.json").is_file()
    assert (tmp_path / "bundle/text_encoder/model.safetensors").is_file()
    assert (tmp_path / "bundle/tokenizer/open_clip_tokenizer.json").is_file()
    for path in (tmp_path / "bundle", tmp_path / "bundle/text_encoder"):
        loaded = load_text_encoder(path)
        assert loaded.layer == "final" and loaded.weights_hash() == encoder.weights_hash()
        for a, b in zip(loaded(PROMPTS), encoder(PROMPTS)):
            assert torch.equal(a, b)
    assert not any(p.name.startswith(".") for p in (tmp_path / "bundle").iterdir())  # no temporary leftovers
    penult = load_text_encoder(tmp_path / "bundle", layer="penultimate")
    penult.save_pretrained(tmp_path / "bundle")  # overwrites in place
    assert load_text_encoder(tmp_path / "bundle").layer == "penultimate"


def test_half_precision_bundle_loads_as_float32(encoder, tmp_path):
    copy.deepcopy(encoder).to(torch.float16).save_pretrained(tmp_path)  # half the size on disk
    loaded = load_text_encoder(tmp_path)
    assert loaded.dtype == torch.float32
    half = {k: v.half().float() for k, v in encoder.model.state_dict().items()}
    assert all(torch.equal(v, half[k]) for k, v in loaded.model.state_dict().items())
    torch.testing.assert_close(loaded(PROMPTS)[0], encoder(PROMPTS)[0], rtol=0, atol=2e-2)


def test_open_clip_reads_our_folder_and_weights_file_loads_into_build(encoder, tmp_path):
    encoder.save_pretrained(tmp_path)
    tokens = open_clip.tokenize(PROMPTS)
    theirs = open_clip.create_model(f"local-dir:{tmp_path / 'text_encoder'}")  # open_clip's own loader
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_text(tokens), encoder.model.encode_text(tokens), rtol=0, atol=0)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(encoder.model_cfg))
    rebuilt = build_text_encoder({"model": str(cfg_file), "weights": str(tmp_path / "text_encoder/model.safetensors")})
    assert torch.equal(rebuilt(PROMPTS)[0], encoder(PROMPTS)[0])


def test_weights_hash_follows_the_weights(encoder):
    other = copy.deepcopy(encoder)
    assert other.weights_hash() == encoder.weights_hash()
    with torch.no_grad():
        other.model.ln_final.weight[0] += 1e-3
    assert other.weights_hash() != encoder.weights_hash()
    other.layer = "penultimate"
    assert len(other.weights_hash()) == 16


def test_builtin_config_names_resolve_offline():
    cfg = resolve_model_cfg("ViT-H-14")  # Stable Diffusion 2's text encoder architecture
    assert cfg["text_cfg"]["width"] == 1024 and cfg["text_cfg"]["layers"] == 24
    with pytest.raises(ValueError, match="list_models"):
        resolve_model_cfg("no-such-model")


def test_configs_needing_the_hub_are_refused():
    cfg = tiny_model_cfg()
    cfg["text_cfg"]["hf_model_name"] = "bert-base-uncased"
    with pytest.raises(ValueError, match="offline"):
        build_open_clip_model(cfg)
    with pytest.raises(ValueError, match="exactly one of model"):
        TextEncoderConfig()
    with pytest.raises(ValueError, match="unknown text encoder config key 'layers'"):
        build_text_encoder({"model_cfg": tiny_model_cfg(), "layers": "final"})
    with pytest.raises(ValueError, match="layer='last'.*final, penultimate"):
        TextEncoderConfig(model_cfg=tiny_model_cfg(), layer="last")


def test_folder_without_a_known_encoder_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=r"no known text encoder.*text_encoder/ and tokenizer/.*open_clip_config.json"):
        load_text_encoder(tmp_path)
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder/config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ValueError, match="bert"):
        load_text_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(tmp_path / "missing")
    (tmp_path / "lone/text_encoder").mkdir(parents=True)
    (tmp_path / "lone/text_encoder/open_clip_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer folder"):
        load_text_encoder(tmp_path / "lone/text_encoder")
    (tmp_path / "lone/tokenizer").mkdir()
    with pytest.raises(ValueError, match="has no 'model_cfg'"):
        load_text_encoder(tmp_path / "lone")
