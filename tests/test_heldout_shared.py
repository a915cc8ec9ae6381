"""One held-out rule for every trainer: the CLIP, the VAE and the U-Net of one data set hold out the
same images, through each trainer's own loader (before, the CLIP and the U-Net hashed different keys
and held out different rows of a data set without a test split: evaluation leaked)."""

from pathlib import Path

import open_clip
import pytest

from train.clip.config import load_train_config
from train.clip.data import load_pair_sets
from train.data import heldout_keys
from train.unet.cache import LatentCache, build_cache
from train.vae.images import load_vae_split
from train_fakes import TrainFakeAutoencoder, make_imagefolder, tiny_config, tiny_text_encoder, one_thread  # noqa: F401

CLIP_TINY = Path(__file__).resolve().parents[1] / "configs" / "clip" / "tiny.yaml"


@pytest.mark.parametrize("heldout_every", [0, 7])  # no split column (the hash rule), and a test split
def test_the_clip_the_vae_and_the_unet_hold_out_the_same_images(tmp_path, heldout_every):
    data = make_imagefolder(tmp_path / "data", n=60, heldout_every=heldout_every)

    config = tiny_config(tmp_path, "data.holdout_fraction=0.2", data=data)
    folder, _ = build_cache(config.cache, config.data, TrainFakeAutoencoder(), tiny_text_encoder(), progress=False)
    cache = LatentCache(folder)
    unet = sorted(cache.keys[i] for i in cache.heldout_indices)

    vae = sorted(heldout_keys(load_vae_split(data, 0.2, size=32, progress=False)))

    clip_config = load_train_config(str(CLIP_TINY), [f"data.path={data}", "data.holdout_fraction=0.2", "train.batch_size=4"])
    _, test = load_pair_sets(clip_config, open_clip.tokenize, progress=False, log=lambda _: None)
    clip = sorted(test.data.key(r) for r in test.rows)

    assert unet == vae == clip
    assert 0 < len(unet) < 30 and len(cache.train_indices) == 60 - len(unet)
