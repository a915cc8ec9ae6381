"""Bundles on disk: our layout round-trips, each part loads with diffusers, Stable Diffusion
folders load into the same pipeline and give diffusers' images, missing parts are named."""

import json

import pytest
import torch

from ldm.bundle import BundleError, check_bundle, load_schedule
from ldm.pipeline import Text2ImagePipeline
from ldm.testing import build_bundle, build_sd_folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_sd_folder(tmp_path_factory.mktemp("sd") / "tiny-sd", "tiny")


def test_bundle_layout_and_parts_load_with_diffusers(bundle):
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

    index = json.loads((bundle / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "VQModel"] and index["text_encoder"][0] == "open_clip"
    assert UNet2DConditionModel.from_pretrained(bundle / "unet").config.cross_attention_dim == 16
    assert VQModel.from_pretrained(bundle / "vae").config.scaling_factor > 0
    sched = DDIMScheduler.from_pretrained(bundle / "scheduler")
    ours, _ = load_schedule(bundle)
    torch.testing.assert_close(sched.alphas_cumprod, ours.alphas_cumprod.float())
    assert not any(p.name.startswith(".") for p in bundle.parent.iterdir())  # no temporary folder left


def test_bundle_round_trip_generates_the_same_images(bundle, tmp_path):
    pipe = Text2ImagePipeline.from_pretrained(bundle)
    a = pipe(["a koala", "a cat"], steps=3, guidance=3.0, seed=1, output="tensor")
    assert a.shape == (2, 3, 32, 32) and a.abs().max() <= 1
    # save what was loaded, load it again: same images
    from ldm.bundle import save_bundle

    again = save_bundle(tmp_path / "again", unet=pipe.unet, autoencoder=pipe.autoencoder,
                        text_encoder=pipe.text_encoder, schedule=pipe.schedule, sampling=pipe.sampling)
    b = Text2ImagePipeline.from_pretrained(again)(["a koala", "a cat"], steps=3, guidance=3.0, seed=1, output="tensor")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stable_diffusion_folder_gives_diffusers_images(sd_folder):
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    ours = Text2ImagePipeline.from_pretrained(sd_folder)
    assert ours.sampling.steps_offset == 1 and ours.downsample_factor == 4
    prompts = ["a koala wearing a hat", "a red apple"]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    ref = theirs(prompts, num_inference_steps=5, guidance_scale=7.5, generator=gens, output_type="np", height=32, width=32).images
    got = ours(prompts, steps=5, guidance=7.5, seed=0, height=32, width=32, output="tensor")
    torch.testing.assert_close(got / 2 + 0.5, torch.from_numpy(ref).permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_missing_folder_or_part_is_named(bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        check_bundle(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (broken / part).mkdir()
    with pytest.raises(BundleError, match="lacks scheduler"):
        check_bundle(broken)
