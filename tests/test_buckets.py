"""Aspect-ratio buckets: the buckets and the assignment (analytic), the cropping report, the cache per
bucket and its key, one-bucket batches and disjoint shards (BucketOrder), `ldm finetune` end to end
on a folder of three aspect ratios, and generation at a bucket's non-square size."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.pipeline import Text2ImagePipeline
from ldm.testing import build_bundle
from train.data import ImageTransform
from train.data.buckets import assign, make_buckets
from train.run.log import read_csv
from train.run.order import BucketOrder
from train.unet.cache import LatentCache, build_cache
from train_fakes import TrainFakeAutoencoder, make_imagefolder, tiny_config, tiny_text_encoder
from train_fakes import fresh_accelerate, one_thread  # noqa: F401  (autouse fixtures)

# (width, height): square, 3:2 landscape, 2:3 portrait
MIXED = [(32, 32), (48, 32), (32, 48)]
# the tiny config: 32 px, f = 4 and a U-Net of two resolutions, so sides are multiples of 8; its buckets
# (width x height, about 32 x 32 pixels, sides in [16, 64]) include 40x24 and 24x40, nearest to 3:2 and 2:3
GRANULARITY = 8



# -- buckets and assignment ----------------------------------------------------------------------------


@pytest.mark.parametrize("resolution, step", [(512, 64), (768, 64), (1024, 128), (64, 8), (32, 8), (96, 32)])
def test_buckets_are_multiples_of_the_step_near_the_area_in_both_orientations(resolution, step):
    area, lo, hi = resolution * resolution, resolution // 2, 2 * resolution
    buckets = make_buckets(area, step, lo, hi)
    for h, w in buckets:
        assert h % step == 0 and w % step == 0 and lo <= min(h, w) and max(h, w) <= hi
        # the height is the largest multiple of step with h * w <= area: at most one step's row/column short
        assert area - step * max(h, w) < h * w <= area
        assert (w, h) in buckets
    assert (resolution, resolution) in buckets  # resolution is a multiple of step here
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)


def test_the_sd_scripts_buckets_for_512_pixels():
    """What sd-scripts' make_bucket_resolutions((512, 512), min_size=256, max_size=1024, divisible=64) returns (its
    widths 256..1024 with height floor(512^2 / width / 64) * 64, and each transposed), as (width, height)."""
    wide = [(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    expected = sorted({*wide, *((h, w) for w, h in wide)}, key=lambda wh: wh[0] / wh[1])
    assert [(w, h) for h, w in make_buckets(512 * 512, 64, 256, 1024)] == expected


def test_each_image_goes_to_the_bucket_that_crops_least_and_the_crop_is_what_the_transform_removes():
    buckets = make_buckets(512 * 512, 64, 256, 1024)
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(200, 3000, 300), rng.integers(200, 3000, 300)], axis=1)  # (N, 2) width, height
    index, cropped = assign(sizes, buckets)

    def crop_share(w, h, bh, bw):  # scale to cover (bh, bw), centre-crop: the share of the scaled pixels cut away
        s = max(bh / h, bw / w)
        return 1 - (bh * bw) / (h * s * w * s)

    for (w, h), k, c in zip(sizes.tolist(), index, cropped):
        shares = [crop_share(w, h, bh, bw) for bh, bw in buckets]
        # float64 on ratios of integers below 3000: agreement to ~1e-15 relative; 1e-12 leaves margin
        assert c == pytest.approx(shares[k], abs=1e-12)
        assert shares[k] <= min(shares) + 1e-12  # nearest in log aspect ratio = least cropped
    # the transform the cache applies gives exactly the bucket's size; its cut differs from the analytic share
    # only by the rounding of the scaled size (half a pixel per side)
    for (w, h), k, c in list(zip(sizes.tolist(), index, cropped))[:20]:
        bh, bw = buckets[k]
        out = ImageTransform((bh, bw), crop="center").resize_crop(Image.new("RGB", (w, h)))
        assert out.size == (bw, bh)
        s = max(bh / h, bw / w)
        scaled = (max(bw, round(w * s)), max(bh, round(h * s)))
        assert abs((1 - bw * bh / (scaled[0] * scaled[1])) - c) <= 0.5 / bw + 0.5 / bh


# -- the cache -------------------------------------------------------------------------------------------


def bucket_config(tmp_path, *overrides, sizes=MIXED):
    data = tmp_path / "data"
    if not data.exists():
        make_imagefolder(data, sizes=sizes)
    return tiny_config(tmp_path, *overrides, data=data)


def test_the_cache_holds_one_latent_tensor_per_bucket_and_reports_the_crop(tmp_path, capsys):
    config = bucket_config(tmp_path, "data.buckets.enabled=true")
    ae = TrainFakeAutoencoder()
    folder, built = build_cache(config.cache, config.data, ae, tiny_text_encoder(), granularity=GRANULARITY)
    cache = LatentCache(folder)
    # 48x32 (3:2) -> 40x24 (5:3, the nearest ratio in log scale), 32x48 -> 24x40, 32x32 -> 32x32; (height, width)
    assert cache.buckets == [(40, 24), (32, 32), (24, 40)]
    assert [cache.bucket_shape(k) for k in range(3)] == [(4, 10, 6), (4, 8, 8), (4, 6, 10)]
    assert sorted((tmp_path / "cache").glob("ldm-*/shard-*/latents-*.npy")) == [folder / "shard-00000" / f"latents-{k}.npy" for k in range(3)]
    for i in range(len(cache)):
        w, h = MIXED[int(cache.keys[i][:4]) % 3]  # image n is "{n:04d}.png", of size MIXED[n % 3]
        k = int(cache.bucket_of([i])[0])
        bh, bw = cache.buckets[k]
        assert (bw > bh) == (w > h) and (bw == bh) == (w == h)
        image = ImageTransform((bh, bw), crop="center")(Image.open(f"{config.data.path}/{cache.keys[i]}").convert("RGB"))
        # the cache encoded other batches than this one row: float32 agreement to a few ulps of values ~1-3
        torch.testing.assert_close(cache.latents([i]), ae.encode(image[None]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="buckets"):
        cache.latents([int(cache.bucket_offsets[0]), int(cache.bucket_offsets[1])])  # two buckets in one batch
    # the held-out rows (split "test": every 7th image) are the same images as without buckets
    held = sorted(cache.keys[i] for i in cache.heldout_indices)
    assert held == [f"{i:04d}.png" for i in range(6, 28, 7)]
    # the held-out loss's batches: one bucket each, the buckets in turn (a cap on the batches still sees each)
    batches = cache.batches(cache.heldout_indices, 1)
    assert sorted(int(r) for b in batches for r in b) == sorted(cache.heldout_indices.tolist())
    assert [int(cache.bucket_of(b)[0]) for b in batches] == [0, 1, 2, 1]  # held out: 1, 2 and 1 images
    # the data summary: per bucket its size, images and the share cropped (1 - (3/2) / (5/3) = 10% for 3:2 in 5:3)
    err = capsys.readouterr().err
    assert "aspect-ratio buckets: 3 used of 9" in err
    # 28 images: n % 3 == 0 (10 of them) square, 1 (9) 3:2, 2 (9) 2:3
    for name, count, pct in (("24x40", 9, 10.0), ("32x32", 10, 0.0), ("40x24", 9, 10.0)):
        line = next(line for line in err.splitlines() if line.strip().startswith(name + ":"))
        assert f"{count} images" in line and f"mean {pct:.1f}%, max {pct:.1f}%" in line


def test_the_cache_key_holds_the_bucket_settings(tmp_path):
    ae, te = TrainFakeAutoencoder(), tiny_text_encoder()

    def folder(*overrides):
        config = bucket_config(tmp_path, *overrides)
        return build_cache(config.cache, config.data, ae, te, progress=False, granularity=GRANULARITY)

    first, built = folder("data.buckets.enabled=true")
    assert built
    assert folder("data.buckets.enabled=true") == (first, False)  # unchanged settings: reused
    changed = [folder("data.buckets.enabled=true", o)[0] for o in
               ("data.buckets.step=16", "data.buckets.max_side=48", "data.buckets.sizes=[32x32,40x24,24x40,48x16]")]
    plain, _ = folder("data.buckets.enabled=false")
    assert len({first, *changed, plain}) == 5
    assert LatentCache(plain).buckets is None and LatentCache(plain).latent_shape == (4, 8, 8)
    # step 16 leaves ratios 1/4, 1/3, 1, 3, 4: 3:2 is nearest the square (|log 1.5| = 0.41 < log 3 - log 1.5 = 0.69),
    # so every image is in one bucket (kept as a bucketed cache: enabled is true, not auto)
    assert LatentCache(changed[0]).buckets == [(32, 32)]
    # another model granularity makes other candidate buckets: another cache
    config = bucket_config(tmp_path, "data.buckets.enabled=true")
    assert build_cache(config.cache, config.data, ae, te, progress=False, granularity=16)[0] not in {first, *changed}


def test_auto_buckets_mixed_shapes_only_and_square_data_caches_as_before(tmp_path):
    ae, te = TrainFakeAutoencoder(), tiny_text_encoder()
    square = make_imagefolder(tmp_path / "square", sizes=[(32, 32), (64, 64)])  # two sizes, one aspect ratio
    caches = {}
    for enabled in ("auto", "false"):
        config = tiny_config(tmp_path, f"data.buckets.enabled={enabled}", data=square)
        caches[enabled] = LatentCache(build_cache(config.cache, config.data, ae, te, progress=False,
                                                  granularity=GRANULARITY)[0])
    assert caches["auto"].buckets is None
    everything = np.arange(len(caches["auto"]))
    assert torch.equal(caches["auto"].latents(everything), caches["false"].latents(everything))
    config = bucket_config(tmp_path / "mixed", "data.buckets.enabled=auto")
    mixed = LatentCache(build_cache(config.cache, config.data, ae, te, progress=False, granularity=GRANULARITY)[0])
    assert len(mixed.buckets) == 3


def test_bucket_sizes_that_the_model_cannot_take_are_a_one_line_error(tmp_path):
    config = bucket_config(tmp_path, "data.buckets.enabled=true", "data.buckets.sizes=[32x32,36x28]")
    with pytest.raises(ValueError, match=r"36x28 is not divisible by the latent granularity 8 \(the autoencoder's "
                                         r"factor 4 times the U-Net's down-sampling 2\)"):
        build_cache(config.cache, config.data, TrainFakeAutoencoder(), tiny_text_encoder(), granularity=GRANULARITY)
    with pytest.raises(ValueError, match="step=12 is not a multiple of the latent granularity 8"):
        config = bucket_config(tmp_path, "data.buckets.enabled=true", "data.buckets.step=12")
        build_cache(config.cache, config.data, TrainFakeAutoencoder(), tiny_text_encoder(), granularity=GRANULARITY)
    with pytest.raises(ValueError, match="'36by28' is not a size; write WIDTHxHEIGHT"):
        bucket_config(tmp_path, "data.buckets.sizes=[36by28]")


# -- the order ---------------------------------------------------------------------------------------------


GROUPS = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 14), np.arange(14, 22)]  # buckets of 10, 3, 1, 8 rows
BUCKET = {int(r): k for k, g in enumerate(GROUPS) for r in g}


def epoch_batches(order, epoch):
    return [order.batch(epoch, i) for i in range(order.batches_per_epoch)]


def test_every_batch_comes_from_one_bucket_and_an_epoch_reads_every_row_once():
    order = BucketOrder(GROUPS, batch_size=4, num_processes=1, rank=0, seed=3)
    # 10 -> 4, 4, 2 (the smaller last batch is kept); 3 -> 3; 1 -> 1; 8 -> 4, 4
    assert order.batches_per_epoch == 7
    for epoch in range(3):
        batches = epoch_batches(order, epoch)
        assert all(len({BUCKET[int(r)] for r in b}) == 1 for b in batches)
        assert sorted(len(b) for b in batches) == [1, 2, 3, 4, 4, 4, 4]
        assert sorted(int(r) for b in batches for r in b) == list(range(22))
    # a pure function of (seed, epoch): a new object (a resumed run) reads the same; epochs differ
    again = BucketOrder(GROUPS, batch_size=4, num_processes=1, rank=0, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(epoch_batches(order, 1), epoch_batches(again, 1)))
    assert [b.tolist() for b in epoch_batches(order, 0)] != [b.tolist() for b in epoch_batches(order, 1)]
    assert [b.tolist() for b in epoch_batches(order, 0)] != \
        [b.tolist() for b in epoch_batches(BucketOrder(GROUPS, 4, 1, 0, seed=4), 0)]


def test_two_processes_read_disjoint_shards_of_one_bucket_at_a_time():
    orders = [BucketOrder(GROUPS, batch_size=4, num_processes=2, rank=r, seed=0) for r in range(2)]
    # global batches of 8: 10 -> 8 + 2 (1 each); 3 -> 2 (1 each, 1 left over); 1 -> none (left over); 8 -> 8
    assert orders[0].batches_per_epoch == orders[1].batches_per_epoch == 4
    for epoch in range(4):
        shards = [epoch_batches(o, epoch) for o in orders]
        for b0, b1 in zip(*shards):
            assert len(b0) == len(b1) > 0  # the processes step together
            assert len({BUCKET[int(r)] for r in [*b0, *b1]}) == 1  # the same bucket on both
        seen = [{int(r) for b in s for r in b} for s in shards]
        assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 10
        assert len(seen[0] | seen[1]) == 22 - 2  # all but the 2 left over this epoch
    with pytest.raises(ValueError, match="fewer than one per process"):
        BucketOrder([np.arange(1)], batch_size=4, num_processes=2, rank=0, seed=0)


# -- end to end --------------------------------------------------------------------------------------------


def test_ldm_finetune_on_mixed_sizes_trains_in_buckets_and_writes_a_bundle(tmp_path, capsys):
    base = build_bundle(tmp_path / "base")  # VQ-VAE f = 4, a U-Net of two resolutions: granularity 8, 32 px
    data = make_imagefolder(tmp_path / "data", sizes=MIXED)
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(base), "--data", str(data), f"train.output_dir={out}",
            f"cache.dir={tmp_path / 'cache'}", "train.max_steps=3", "train.batch_size=4", "optim.warmup_steps=0",
            "validation.prompts=[a red square]", "validation.seeds=[0]", "validation.steps=2", "ema.enabled=false"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "aspect-ratio buckets: 3 used" in err and re.search(r"40x24: \d+ images", err)
    assert (out / "bundle" / "pytorch_lora_weights.safetensors").is_file() and (out / "samples" / "step-00000003.png").is_file()
    val = read_csv(out / "logs" / "val.csv")
    assert [int(r["step"]) for r in val] == [0, 3] and float(val[-1]["loss"]) > 0  # the held-out loss, batches of one bucket
    # the fine-tuned model draws at a bucket's size
    pipe = Text2ImagePipeline.from_pretrained(out / "bundle", backend="torch")
    assert pipe("a red square", steps=2, seed=0, height=24, width=40)[0].size == (40, 24)
    # turned off: one square crop as before (no bucket report), and a bad bucket list is one line, exit 2
    assert main([*args, f"train.output_dir={tmp_path / 'ft2'}", "data.buckets.enabled=false", "train.max_steps=1"]) == 0
    assert "aspect-ratio buckets" not in capsys.readouterr().err
    assert main([*args, f"train.output_dir={tmp_path / 'ft3'}", "data.buckets.sizes=[40x24,30x30]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "30x30 is not divisible by the latent granularity 8" in err and "\n" not in err


def test_ldm_generate_draws_a_non_square_bucket_size(tmp_path, capsys):
    base = build_bundle(tmp_path / "base")
    out = tmp_path / "wide.png"
    assert main(["generate", "a koala", "--model", str(base), "--steps", "2", "--height", "24", "--width", "40",
                 "--out", str(out), "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (40, 24)
    assert main(["generate", "a koala", "--model", str(base), "--steps", "2", "--height", "24", "--width", "36",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "width=36 must be a positive multiple of the autoencoder's factor 4 times the U-Net's downsampling 2, i.e. of 8" \
        in err and "\n" not in err
