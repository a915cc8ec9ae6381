"""Packing a bundle for shipping: fp16 storage and a compact token table load back into the same
pipeline, give the same contexts for kept tokens and nearly the same images, and take less space."""

import json

import pytest
import torch
from PIL import Image

from conditioning.clip_model import FALLBACK, KEPT_IDS, TOKEN_TABLE, compact_token_table, expand_token_table
from ldm.cli import main
from ldm.pack import pack_bundle
from ldm.pipeline import Text2ImagePipeline
from ldm.testing import build_bundle

CAPTIONS = ["a koala, twemoji style", "red apple, noto style", "grinning face"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


def test_compact_token_table_round_trip():
    table = torch.randn(50, 4)
    state = {TOKEN_TABLE: table, "other": torch.ones(3)}
    compact = compact_token_table(state, [7, 3, 3, 49])
    assert compact[TOKEN_TABLE].shape == (3, 4) and compact[KEPT_IDS].tolist() == [3, 7, 49]
    full = expand_token_table(compact, 50)
    assert set(full) == {TOKEN_TABLE, "other"}
    torch.testing.assert_close(full[TOKEN_TABLE][[3, 7, 49]], table[[3, 7, 49]], rtol=0, atol=0)
    dropped = [i for i in range(50) if i not in (3, 7, 49)]
    mean = table[dropped].mean(0)
    torch.testing.assert_close(full[TOKEN_TABLE][dropped], mean.expand(len(dropped), -1))
    torch.testing.assert_close(compact[FALLBACK], mean)
    assert expand_token_table(state) is state  # a full table passes through
    with pytest.raises(ValueError, match="keep_ids"):
        compact_token_table(state, [50])


def test_packed_bundle_is_smaller_and_generates_nearly_the_same_images(bundle, tmp_path):
    packed = tmp_path / "packed"
    sizes = pack_bundle(bundle, packed, keep_captions=CAPTIONS)
    for part in ("unet", "vae", "text_encoder"):
        assert sizes[f"{part} after"] < 0.6 * sizes[f"{part} before"], part
    assert sizes["text_encoder after"] < 0.1 * sizes["text_encoder before"]  # 49,408 rows -> a few dozen

    ours, theirs = Text2ImagePipeline.from_pretrained(bundle), Text2ImagePipeline.from_pretrained(packed)
    assert next(theirs.unet.parameters()).dtype == torch.float32  # cast back on load
    # contexts of kept prompts: the fp16 rounding of the weights, nothing more
    a, _ = ours.text_encoder(CAPTIONS)
    b, _ = theirs.text_encoder(CAPTIONS)
    assert (a - b).abs().max() < 2e-2 * a.abs().max()
    # a token outside the kept vocabulary now gets the shared row: a different context
    c, _ = ours.text_encoder(["zebra"])
    d, _ = theirs.text_encoder(["zebra"])
    assert (c - d).abs().max() > 10 * (a - b).abs().max()
    x = ours(CAPTIONS[:2], steps=4, guidance=3.0, seed=0, output="tensor")  # (2, 3, 32, 32) in [-1, 1]
    y = theirs(CAPTIONS[:2], steps=4, guidance=3.0, seed=0, output="tensor")
    assert (x - y).abs().mean() * 127.5 < 1.0  # mean pixel difference under 1/255


def test_pack_cli_reads_the_vocabulary_from_a_data_set(bundle, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(data / "images" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"images/{i}.png", "text": caption}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["pack", str(bundle), "--out", str(tmp_path / "packed"), "--vocab-from", str(data)]) == 0
    out = capsys.readouterr().out
    assert "text_encoder" in out and "total" in out
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "packed" / "text_encoder" / "model.safetensors"))
    encoder = Text2ImagePipeline.from_pretrained(bundle).text_encoder
    expected = set(encoder.tokenize(CAPTIONS).unique().tolist()) | set(encoder.tokenize([""]).unique().tolist())
    assert set(state[KEPT_IDS].tolist()) == expected
    assert state[TOKEN_TABLE].dtype == torch.float16
    assert main(["pack", str(bundle), "--out", str(bundle)]) == 2
    assert "is the source bundle" in capsys.readouterr().err


def test_text_encoder_graph_of_a_packed_table_stores_shared_rows_once(tmp_path, monkeypatch):
    import onnxruntime as ort

    from ldm import testing
    from ldm.onnx_backend import OnnxGraphs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where graphs of a bundle-less model go
    te = testing.text_encoder()
    embedding = te.model.token_embedding
    kept = list(range(0, 2000, 3))
    state = expand_token_table(compact_token_table({TOKEN_TABLE: embedding.weight.detach()}, kept))
    with torch.no_grad():
        embedding.weight.copy_(state[TOKEN_TABLE])
    sizes = {}
    for name, table in (("packed", state[TOKEN_TABLE]), ("full", None)):
        if table is None:  # distinct rows everywhere: nothing to share
            with torch.no_grad():
                embedding.weight.copy_(torch.randn_like(embedding.weight))
        path = OnnxGraphs(None, None, (77, 16), None, name).text_encoder_graph(te)
        assert te.model.token_embedding is embedding  # the live model keeps its table
        sizes[name] = path.stat().st_size
        tokens = torch.tensor([[49406, 0, 3, 5, 1999, 40000, 49407] + [0] * 70,
                               [49406, 6, 300, 2001, 12, 49407] + [0] * 71])  # kept and shared ids
        got = ort.InferenceSession(str(path)).run(None, {"tokens": tokens.numpy()})[0]
        with torch.no_grad():
            expected = te._encode_tokens(tokens)[0]
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)
    # 49,408 x 16 float32 rows (3.2 MB) against 667 kept + 1 shared row and an int64 index (0.4 MB)
    assert sizes["packed"] < sizes["full"] / 3


def test_a_fine_tuned_text_encoder_of_a_packed_base_is_saved_packed_and_exact(bundle, tmp_path):
    """A fine-tune that learns rows for new words (text.train=new_words) changes the text encoder of a packed
    base: the bundle keeps it packed (the packed rows plus the learned ones), losslessly, not 49,408 rows."""
    from safetensors.torch import load_file

    from ldm.bundle import load_parts, save_bundle

    packed = tmp_path / "packed"
    pack_bundle(bundle, packed, keep_captions=CAPTIONS)
    parts = load_parts(packed)
    table = parts.text_encoder.model.state_dict()[TOKEN_TABLE]
    kept = set(load_file(str(packed / "text_encoder" / "model.safetensors"))[KEPT_IDS].tolist())
    new = [i for i in range(100, 400) if i not in kept][:2]  # two ids on the shared row, as a new word's are
    with torch.no_grad():
        table[new] = torch.randn(2, table.shape[1])
    out = save_bundle(tmp_path / "ft", unet=parts.unet, autoencoder=parts.autoencoder, text_encoder=parts.text_encoder,
                      schedule=parts.schedule, sampling=parts.sampling, base=packed)
    stored = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert set(stored[KEPT_IDS].tolist()) == kept | set(new)
    again = load_parts(out).text_encoder.model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in parts.text_encoder.model.state_dict().items())
