"""The latent and context cache: computed once, reused, recomputed when an encoder or the data change."""

import json
from dataclasses import replace

import pytest
import torch

from train.data import load_split
from train.unet.cache import LatentCache, build_cache
from train_fakes import (TrainFakeAutoencoder, count_calls, make_imagefolder, tiny_config, tiny_text_encoder,  # noqa: F401
                         one_thread)


def split_of(config):
    return load_split(config.data.path, config.data.holdout_fraction, size=config.data.resolution, progress=False)


def cache_rows(config):
    """(dataset, index, held out) for every cache row, in cache order: training rows, then held-out rows."""
    s = split_of(config)
    return [(s.train, i, False) for i in s.train_rows] + [(s.heldout, i, True) for i in s.heldout_rows]


def test_cache_holds_what_the_encoders_give(tmp_path):
    config = tiny_config(tmp_path)
    ae, te = TrainFakeAutoencoder(), tiny_text_encoder()
    folder, built = build_cache(config.cache, config.data, ae, te, progress=False)
    cache = LatentCache(folder)
    rows = cache_rows(config)  # (dataset, index, held out)
    assert built and len(cache) == len(rows) == 28
    idx = [5, 0, 27]
    images = torch.stack([rows[i][0][rows[i][1]][0] for i in idx])  # (3, 3, 32, 32)
    # the cache encoded other batches than these 3 rows: float32 agreement to a few ulps of values ~1-3
    torch.testing.assert_close(cache.latents(idx), ae.encode(images), rtol=1e-5, atol=1e-5)
    expected = te([rows[i][0].caption(rows[i][1]) for i in idx])[0]  # (3, L, D)
    # stored as float16 by default: rounding to its 11-bit significand moves a value by at most 2^-11 of it
    torch.testing.assert_close(cache.contexts(idx), expected, rtol=2**-11 + 1e-5, atol=1e-5)
    exact = LatentCache(build_cache(replace(config.cache, context_dtype="float32"), config.data, ae, te, progress=False)[0])
    torch.testing.assert_close(exact.contexts(idx), expected, rtol=1e-5, atol=1e-5)  # float32: a few ulps
    torch.testing.assert_close(cache.empty, te.empty_context(1), rtol=1e-5, atol=1e-5)
    assert cache.latent_shape == (4, 8, 8)
    # the rows of split "test" (every 7th image) are held out
    assert len(cache.train_indices) == 24 and list(cache.heldout_indices) == [24, 25, 26, 27]
    assert [cache.captions[i][0] for i in cache.heldout_indices] == [rows[i][0].caption(rows[i][1]) for i in range(24, 28)]


def test_cache_is_reused_and_keyed_by_encoders_and_data(tmp_path):
    config = tiny_config(tmp_path)
    ae, te = TrainFakeAutoencoder(), tiny_text_encoder()
    calls = count_calls(te)
    first, built = build_cache(config.cache, config.data, ae, te, progress=False)
    assert built and ae.encode_calls > 0 and calls
    ae2, te2 = TrainFakeAutoencoder(), tiny_text_encoder()
    calls2 = count_calls(te2)
    again, built = build_cache(config.cache, config.data, ae2, te2, progress=False)
    assert again == first and not built and ae2.encode_calls == 0 and not calls2  # nothing encoded

    other_ae, _ = build_cache(config.cache, config.data, TrainFakeAutoencoder(seed=3), te, progress=False)
    other_te, _ = build_cache(config.cache, config.data, ae, tiny_text_encoder(seed=1), progress=False)
    rows = (tmp_path / "data" / "metadata.jsonl").read_text().splitlines()
    row = json.loads(rows[0]) | {"text": "a changed caption"}
    (tmp_path / "data" / "metadata.jsonl").write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")
    other_data, built = build_cache(config.cache, config.data, ae, te, progress=False)
    assert built and len({first, other_ae, other_te, other_data}) == 4
    assert ["a changed caption"] in LatentCache(other_data).captions
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())  # no temporary folders left
    # the contexts live in the text encoder's embedding cache: one file per (encoder, caption set)
    assert len(list((tmp_path / "cache" / "contexts").glob("*/contexts-*.safetensors"))) == 3


def test_distinct_captions_are_encoded_once(tmp_path):
    config = tiny_config(tmp_path)
    te = tiny_text_encoder()
    calls = count_calls(te)
    build_cache(config.cache, config.data, TrainFakeAutoencoder(), te, progress=False)
    encoded = [p for call in calls for p in call if p]  # the empty prompt aside
    assert len(encoded) == len(set(encoded)) == 12  # 4 colours x 3 shapes, 28 images


def test_an_image_with_several_captions_gets_one_per_epoch(tmp_path):
    data = make_imagefolder(tmp_path / "data")
    rows = [json.loads(r) for r in (data / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = ["first caption", "second caption", "third caption"]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(tmp_path, data=data)
    te = tiny_text_encoder()
    cache = LatentCache(build_cache(config.cache, config.data, TrainFakeAutoencoder(), te, progress=False)[0])
    options = te(rows[0]["text"])[0]  # (3, L, D)
    picks = set()
    for epoch in range(12):
        ctx = cache.contexts([0], epoch=epoch)[0]
        # stored in float16 (2^-11 relative) from another batch than options; the 3 captions' contexts differ by ~1
        match = [k for k in range(3) if torch.allclose(ctx, options[k], rtol=2**-11 + 1e-5, atol=1e-5)]
        assert len(match) == 1
        picks.add(match[0])
    assert picks == {0, 1, 2}
    assert torch.equal(cache.contexts([0], epoch=4), cache.contexts([0], epoch=4))


def test_data_without_split_column_holds_out_a_fixed_fraction(tmp_path):
    data = make_imagefolder(tmp_path / "d", n=200, size=32)
    rows = [json.loads(r) for r in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n" for r in rows))
    config = tiny_config(tmp_path, "data.holdout_fraction=0.1", data=data)
    parts = split_of(config)
    assert parts.heldout is parts.train and len(parts.train) == 200
    assert 8 <= len(parts.heldout_rows) <= 35 and parts.heldout_rows == split_of(config).heldout_rows


def test_missing_data_folder_is_a_clear_error(tmp_path):
    config = tiny_config(tmp_path, data=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data.path="):
        build_cache(config.cache, config.data, TrainFakeAutoencoder(), tiny_text_encoder(), progress=False)


class GatedAutoencoder(TrainFakeAutoencoder):
    """TrainFakeAutoencoder that, given events, announces its first encode and waits to be let on."""

    def __init__(self, started=None, go_on=None):
        super().__init__()
        self.started, self.go_on = started, go_on

    def encode(self, images):
        if self.started is not None and not self.started.is_set():
            self.started.set()
            assert self.go_on.wait(timeout=60)
        return super().encode(images)


def test_two_runs_building_one_cache_take_turns(tmp_path):
    """Two fine-tunes started together on one data set: the second waits for the first's cache (the build
    removes temporary shard folders of killed builds, which were the first's live ones), then reads it."""
    import threading

    config = tiny_config(tmp_path)
    started, go_on, results = threading.Event(), threading.Event(), {}

    def build(name, ae):
        try:
            results[name] = build_cache(config.cache, config.data, ae, tiny_text_encoder(), progress=False)
        except Exception as exc:  # noqa: BLE001 - reported by the asserts below
            results[name] = exc

    first = threading.Thread(target=build, args=("first", GatedAutoencoder(started, go_on)))
    first.start()
    assert started.wait(timeout=60)  # the first build is writing its first shard
    second = threading.Thread(target=build, args=("second", GatedAutoencoder()))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive() and "second" not in results  # it waits for the first
    go_on.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert results["first"][1] is True and results["second"] == (results["first"][0], False), results
    assert len(LatentCache(results["first"][0])) == 28
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())  # the lock file went with the build
