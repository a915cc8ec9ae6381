"""Data at scale (issue 20, point 3): webdataset shards and Hugging Face streaming as sources, with the folder
formats' bad-row counting; the cache built in shards that a stopped build resumes to identical files, readable
while it is built, keyed by a manifest of names, sizes and times (every byte on request)."""

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

import train.unet.cache as cache_module
from ldm.cli import main
from train.data import ImageTransform
from train.data.captioned import EMPTY_CAPTION
from train.data.images import ImageError, decode_image
from train.data.sources import BAD_ROW, MISSING_CAPTION, NOT_UTF8
from train.data.streams import NO_IMAGE, open_stream
from train.unet.cache import LatentCache, build_cache
from train_fakes import TINY, TrainFakeAutoencoder, make_imagefolder, one_thread, tiny_config, tiny_text_encoder  # noqa: F401


def png(colour, size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


GOOD = [(f"{i:06d}", png((10 * i, 200 - 5 * i, 30)), f"a colour {i}") for i in range(12)]  # (key, image, caption)
CORRUPT = png("red")[:40]


def corrupt_reason() -> str:
    with pytest.raises(ImageError) as info:
        decode_image(CORRUPT)
    return info.value.reason


def write_shards(folder: Path) -> Path:
    """Two tar shards as LAION's: the 12 good samples (half captioned by txt, half by json) and one of every bad kind."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    bad = [{"__key__": "b1", "png": GOOD[0][1]},  # no caption
           {"__key__": "b2", "png": GOOD[0][1], "txt": "  "},  # empty caption
           {"__key__": "b3", "png": CORRUPT, "txt": "a broken image"},
           {"__key__": "b4", "txt": "a caption without an image"},
           {"__key__": "b5", "png": GOOD[0][1], "json": b"{not json"},
           {"__key__": "b6", "png": GOOD[0][1], "txt": b"caf\xe9 latin-1"}]
    samples = [{"__key__": k, "png": image, **({"txt": c} if i % 2 else {"json": json.dumps({"text": c}).encode()})}
               for i, (k, image, c) in enumerate(GOOD)]
    for n, part in enumerate((samples[:6] + bad[:3], samples[6:] + bad[3:])):
        with wds.TarWriter(str(folder / f"{n:05d}.tar")) as sink:
            for sample in part:
                sink.write(sample)
    return folder


EXPECTED_SKIPS = {MISSING_CAPTION: 1, EMPTY_CAPTION: 1, NO_IMAGE: 1, BAD_ROW: 1, NOT_UTF8: 1}


def _config(tmp_path, path, *overrides):
    from train.run.config import load_config
    from train.unet.config import LDMTrainConfig

    return load_config(LDMTrainConfig, TINY, [f"data.path={path}", f"train.output_dir={tmp_path / 'run'}",
                                              f"cache.dir={tmp_path / 'cache'}", "data.holdout_fraction=0.25",
                                              "cache.context_dtype=float32", *overrides])


def check_good_rows(cache: LatentCache, key_prefix, ae, te):
    """The cache holds exactly the good samples, in stream order, encoded as the encoders encode them."""
    keys = list(cache.keys)
    assert [k.split("/")[-1] if "/" in k else k for k in keys] == key_prefix
    images = torch.stack([ImageTransform(32)(Image.open(io.BytesIO(image)).convert("RGB")) for _, image, _ in GOOD])  # (12, 3, 32, 32)
    # another batch than the cache's: float32 agreement to a few ulps of values ~1-3
    torch.testing.assert_close(cache.latents(range(12)), ae.encode(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.contexts(range(12)), te([c for *_, c in GOOD])[0], rtol=1e-5, atol=1e-5)
    held = set(cache.heldout_indices.tolist())
    from train.data.split import key_hash

    assert held == {i for i, k in enumerate(keys) if key_hash(k) / 2**64 < 0.25}  # the one rule, row by row
    assert 0 < len(held) < 12


def test_webdataset_shards_are_a_source_with_bad_rows_counted(tmp_path):
    shards = write_shards(tmp_path / "shards")
    stream = open_stream(f"{shards}/{{00000..00001}}.tar")
    assert [k for k, *_ in stream.rows()][:2] == ["00000.tar/000000", "00000.tar/000001"]
    assert [k for k, *_ in stream.rows(skip=8)] == ["00000.tar/b3"] + [f"00001.tar/{k}" for k, *_ in GOOD[6:]] + \
        ["00001.tar/b4", "00001.tar/b5", "00001.tar/b6"]
    config = _config(tmp_path, f"{shards}/{{00000..00001}}.tar", "cache.shard_size=5")
    ae, te = TrainFakeAutoencoder(), tiny_text_encoder()
    folder, built = build_cache(config.cache, config.data, ae, te, progress=False)
    cache = LatentCache(folder)
    assert built and cache.num_shards == 4 and len(cache) == 12  # 18 samples in shards of 5 rows
    check_good_rows(cache, [k for k, *_ in GOOD], ae, te)
    summary = json.loads((folder / "meta.json").read_text())["summary"]
    for reason, n in (EXPECTED_SKIPS | {corrupt_reason(): 1}).items():
        assert f"{reason}: {n}" in summary
    assert "kept: 12 image-caption pairs" in summary and "skipped: 6" in summary
    # a folder of the shards is the same stream of the same files: the same cache
    assert build_cache(config.cache, replace(config.data, path=str(shards)), ae, te, progress=False) == (folder, False)


def test_hugging_face_streaming_is_a_source(tmp_path):
    import datasets

    rows = {"image": [{"bytes": image, "path": None} for _, image, _ in GOOD] + [{"bytes": CORRUPT, "path": None}] * 2,
            "text": [c for *_, c in GOOD] + ["a broken image", None]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    (tmp_path / "hf").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "hf" / "train.parquet"))
    config = _config(tmp_path, f"hf:{tmp_path / 'hf'}", "cache.shard_size=5")
    ae, te = TrainFakeAutoencoder(), tiny_text_encoder()
    folder, built = build_cache(config.cache, config.data, ae, te, progress=False)
    cache = LatentCache(folder)
    assert built and len(cache) == 12 and cache.num_shards == 3
    check_good_rows(cache, [f"row {i}" for i in range(12)], ae, te)
    summary = json.loads((folder / "meta.json").read_text())["summary"]
    assert f"{corrupt_reason()}: 1" in summary and f"{MISSING_CAPTION}: 1" in summary


def test_a_shard_that_does_not_exist_is_one_line_exit_2(tmp_path, capsys):
    from ldm.testing import build_bundle

    shards = write_shards(tmp_path / "shards")
    bundle = build_bundle(tmp_path / "bundle")
    common = [f"encoders.autoencoder={bundle / 'vae'}", f"encoders.text_encoder={bundle}",
              f"train.output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}", "train.max_steps=1"]
    for path, named in ((f"{shards}/{{00000..00002}}.tar", "00002.tar"), (f"hf:{tmp_path / 'nowhere'}", "nowhere")):
        assert main(["train", str(TINY), f"data.path={path}", *common]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err, err


def test_a_stopped_build_resumes_to_identical_shards(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "cache.shard_size=10")  # 28 images: shards of 10, 10 and 8 rows

    class Killed(Exception):
        pass

    class DiesAtSecondShard(TrainFakeAutoencoder):
        def encode(self, images):
            if self.encode_calls == 2:  # shard 0 took 2 batches of cache.batch_size 8; shard 1 starts
                raise Killed
            return super().encode(images)

    config = replace(config, cache=replace(config.cache, batch_size=8))
    with pytest.raises(Killed):
        build_cache(config.cache, config.data, DiesAtSecondShard(), tiny_text_encoder(), progress=False)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("ldm-")]
    assert sorted(p.name for p in folder.iterdir()) == ["build.json", "empty.npy", "shard-00000"]
    # as a SIGKILL leaves it: a half-written temporary shard folder
    (folder / ".shard-00001.tmp-leftover").mkdir()
    (folder / ".shard-00001.tmp-leftover" / "latents-0.npy").write_bytes(b"half")
    with pytest.raises(ValueError, match="not complete"):
        LatentCache(folder)
    partial = LatentCache(folder, partial=True)
    assert not partial.complete and len(partial) == 10

    ae = TrainFakeAutoencoder()
    again, built = build_cache(config.cache, config.data, ae, tiny_text_encoder(), progress=False)
    assert again == folder and built and ae.encode_calls == 3  # shards 1 and 2 only: 2 + 1 batches of 8
    clean = build_cache(replace(config.cache, dir=str(tmp_path / "clean")), config.data, TrainFakeAutoencoder(),
                        tiny_text_encoder(), progress=False)[0]
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
    assert not any(p.name.startswith(".") for p in folder.iterdir())
    for f in files:
        assert (folder / f).read_bytes() == (clean / f).read_bytes(), f
    whole = LatentCache(folder)
    assert len(whole) == 28 and whole.num_shards == 3
    assert torch.equal(partial.latents(range(10)), whole.latents(range(10)))
    # shards change where rows are stored, not what they hold: one shard of every row gives the same rows
    one = LatentCache(build_cache(replace(config.cache, dir=str(tmp_path / "one"), shard_size=10000), config.data,
                                  TrainFakeAutoencoder(), tiny_text_encoder(), progress=False)[0])
    assert list(one.keys) == list(whole.keys) and list(one.heldout_indices) == list(whole.heldout_indices)
    torch.testing.assert_close(one.latents(range(28)), whole.latents(range(28)), rtol=1e-6, atol=1e-6)  # other batches
    # each shard encodes its own captions, in other batches: float32 ulps, which can move a float16 rounding by
    # one step (2^-10 of the value)
    torch.testing.assert_close(one.contexts(range(28), epoch=3), whole.contexts(range(28), epoch=3),
                               rtol=2**-10 + 1e-5, atol=1e-5)


def test_the_key_is_a_manifest_unless_content_is_asked_for(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    ae, te = TrainFakeAutoencoder(), tiny_text_encoder()
    first, _ = build_cache(config.cache, config.data, ae, te, progress=False)

    def no_reading(*args, **kwargs):
        raise AssertionError("the manifest key opened a file")

    with monkeypatch.context() as m:  # finding the finished cache reads no image
        m.setattr(cache_module, "folder_hash", no_reading)
        m.setattr("builtins.open", no_reading)
        assert build_cache(config.cache, config.data, ae, te, progress=False) == (first, False)
    image = Path(config.data.path) / "0003.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes, a newer time
    touched, built = build_cache(config.cache, config.data, ae, te, progress=False)
    assert built and touched != first
    content = replace(config.cache, verify="content")
    by_content, _ = build_cache(content, config.data, ae, te, progress=False)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert build_cache(content, config.data, ae, te, progress=False) == (by_content, False)  # bytes unchanged
    image.write_bytes(png("blue"))  # new bytes
    assert build_cache(content, config.data, ae, te, progress=False)[0] != by_content


def test_a_stream_trains(tmp_path):
    from train.unet.trainer import train_from_config

    shards = write_shards(tmp_path / "shards")
    config = _config(tmp_path, f"{shards}/{{00000..00001}}.tar", "train.max_steps=2", "train.batch_size=4",
                     "validation.every=0", "validation.at_start=false")
    result = train_from_config(config, autoencoder=TrainFakeAutoencoder(), text_encoder=tiny_text_encoder())
    assert result.step == 2 and result.bundle is not None


def test_data_check_reads_a_stream(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards")
    assert main(["data", "check", f"{shards}/{{00000..00001}}.tar"]) == 0
    out = capsys.readouterr().out
    assert "kept: 12 image-caption pairs" in out and "skipped: 6" in out and f"{NO_IMAGE}: 1" in out


def test_shards_stream_from_a_url_and_a_missing_url_is_an_error(tmp_path):
    import functools
    import http.server
    import threading

    shards = write_shards(tmp_path / "shards")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        local = [(k, image, cell, reason) for k, image, cell, reason in open_stream(f"{shards}/{{00000..00001}}.tar").rows()]
        assert list(open_stream(f"{url}/{{00000..00001}}.tar").rows()) == local
        with pytest.raises(OSError, match="00002.tar"):
            list(open_stream(f"{url}/{{00000..00002}}.tar").rows())
    finally:
        server.shutdown()


def test_a_stopped_stream_build_resumes_to_identical_shards(tmp_path):
    shards = write_shards(tmp_path / "shards")
    config = _config(tmp_path, f"{shards}/{{00000..00001}}.tar", "cache.shard_size=5")

    class DiesAtSecondShard(TrainFakeAutoencoder):
        def encode(self, images):
            if self.encode_calls == 1:  # shard 0 (5 samples) was one batch
                raise KeyboardInterrupt
            return super().encode(images)

    with pytest.raises(KeyboardInterrupt):
        build_cache(config.cache, config.data, DiesAtSecondShard(), tiny_text_encoder(), progress=False)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("ldm-")]
    assert LatentCache(folder, partial=True).num_shards == 1
    ae = TrainFakeAutoencoder()
    assert build_cache(config.cache, config.data, ae, tiny_text_encoder(), progress=False) == (folder, True)
    # shards 1 and 2 (the first 5 samples passed over undecoded); shard 3 covers 3 bad samples: nothing to encode
    assert ae.encode_calls == 2 and LatentCache(folder).num_shards == 4
    clean = build_cache(replace(config.cache, dir=str(tmp_path / "clean")), config.data, TrainFakeAutoencoder(),
                        tiny_text_encoder(), progress=False)[0]
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    for f in files:
        assert (folder / f).read_bytes() == (clean / f).read_bytes(), f
