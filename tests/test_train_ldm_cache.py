"""The latent and context cache: computed once, reused, recomputed when an encoder or the data change."""

import json

import torch

from train.cache import LatentCache, build_cache, open_captioned_images
from train_fakes import TrainFakeAutoencoder, TrainFakeTextEncoder, make_imagefolder, tiny_config, one_thread  # noqa: F401  (one_thread: autouse fixture)


def test_cache_holds_what_the_encoders_give(tmp_path):
    config = tiny_config(tmp_path)
    ae, te = TrainFakeAutoencoder(), TrainFakeTextEncoder()
    folder, built = build_cache(config.cache, config.data, ae, te, progress=False)
    cache = LatentCache(folder)
    data = open_captioned_images(config.data)
    assert built and len(cache) == len(data) == 28
    idx = [5, 0, 27]
    images = torch.stack([data[i][0] for i in idx])  # (3, 3, 32, 32)
    torch.testing.assert_close(cache.latents(idx), ae.encode(images))
    torch.testing.assert_close(cache.contexts(idx), te([data.captions[i] for i in idx])[0])
    torch.testing.assert_close(cache.empty, te.empty_context(1))
    assert cache.latent_shape == (4, 8, 8)
    # rows with split "test" are held out: every 7th image
    assert list(cache.heldout_indices) == [6, 13, 20, 27]
    assert len(cache.train_indices) == 24


def test_cache_is_reused_and_keyed_by_encoders_and_data(tmp_path):
    config = tiny_config(tmp_path)
    ae, te = TrainFakeAutoencoder(), TrainFakeTextEncoder()
    first, built = build_cache(config.cache, config.data, ae, te, progress=False)
    assert built and ae.encode_calls > 0 and te.calls
    ae2, te2 = TrainFakeAutoencoder(), TrainFakeTextEncoder()
    again, built = build_cache(config.cache, config.data, ae2, te2, progress=False)
    assert again == first and not built and ae2.encode_calls == 0 and not te2.calls  # nothing encoded

    other_ae, _ = build_cache(config.cache, config.data, TrainFakeAutoencoder(seed=3), te, progress=False)
    other_te, _ = build_cache(config.cache, config.data, ae, TrainFakeTextEncoder(salt="x"), progress=False)
    rows = (tmp_path / "data" / "metadata.jsonl").read_text().splitlines()
    row = json.loads(rows[0]) | {"text": "a changed caption"}
    (tmp_path / "data" / "metadata.jsonl").write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")
    other_data, built = build_cache(config.cache, config.data, ae, te, progress=False)
    assert built and len({first, other_ae, other_te, other_data}) == 4
    assert "a changed caption" in LatentCache(other_data).captions
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())  # no temporary folders left


def test_distinct_captions_are_encoded_once(tmp_path):
    config = tiny_config(tmp_path)
    te = TrainFakeTextEncoder()
    folder, _ = build_cache(config.cache, config.data, TrainFakeAutoencoder(), te, progress=False)
    encoded = [p for call in te.calls for p in call if p]  # the empty prompt aside
    assert len(encoded) == len(set(encoded)) == 12  # 4 colours x 3 shapes, 28 images


def test_data_without_split_column_holds_out_a_fixed_fraction(tmp_path):
    data = make_imagefolder(tmp_path / "d", n=200, size=16)
    rows = [json.loads(r) for r in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n" for r in rows))
    config = tiny_config(tmp_path, "data.resolution=16", "data.holdout_fraction=0.1", data=data)
    flags = open_captioned_images(config.data).heldout
    assert 8 <= sum(flags) <= 35 and flags == open_captioned_images(config.data).heldout
