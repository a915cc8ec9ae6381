"""The Autoencoder interface over diffusers' VQModel and AutoencoderKL: scaling, round trips through
disk (ours and diffusers' from_pretrained), posterior mean/sample, bad sizes, bad folders, big configs."""

import json
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from safetensors.torch import load_file, save_file

from train.run.config import load_config
from train.vae.config import VAETrainingConfig
from vae import AutoencoderConfig, build_autoencoder, compute_scaling_factor, load_autoencoder

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "vae"


def tiny(kind="vq", **kw):
    cfg = dict(kind=kind, resolution=16, channels=8, channel_mult=[1, 2, 2], layers_per_block=1,
               mid_attention=False, norm_num_groups=4, num_embeddings=16, embed_dim=4)
    cfg.update(kw)
    torch.manual_seed(0)
    return build_autoencoder(AutoencoderConfig(**cfg))


def images(b=2, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vq_encode_is_scaled_pre_quantisation_latent_and_decode_quantises():
    ae = tiny().eval()
    ae.set_scaling_factor(2.5)
    x = images()
    with torch.no_grad():
        z = ae.encode(x)
        h = ae.model.encode(x).latents
        assert ae.kind == "vq" and ae.downsample_factor == 4 and ae.latent_channels == 4
        assert z.shape == (2, 4, 4, 4)
        torch.testing.assert_close(z, h * 2.5)
        # decode divides by the factor and quantises exactly as diffusers' VQModel.decode
        torch.testing.assert_close(ae.decode(z), ae.model.decode(h).sample)
        rec, codes = ae.reconstruct(x)
        torch.testing.assert_close(rec, ae.model(x).sample)
        _, _, (_, _, diffusers_codes) = ae.model.quantize(h)
        assert torch.equal(codes.flatten(), diffusers_codes.flatten())


def test_vq_folder_round_trip_and_loads_in_diffusers(tmp_path):
    ae = tiny().eval()
    ae.set_scaling_factor(0.7)
    folder = ae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["scaling_factor"] == 0.7
    ours = load_autoencoder(folder)
    theirs = VQModel.from_pretrained(folder).eval()
    x = images()
    with torch.no_grad():
        z = ours.encode(x)
        torch.testing.assert_close(z, ae.encode(x))
        torch.testing.assert_close(ours.decode(z), ae.decode(z))
        torch.testing.assert_close(ours.decode(z), theirs.decode(z / theirs.config.scaling_factor).sample)
    assert ours.scaling_factor == 0.7 and ours.kind == "vq"
    # saving again over an existing folder replaces it whole
    ae.set_scaling_factor(0.9)
    ae.save_pretrained(folder)
    assert load_autoencoder(folder).scaling_factor == 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]


def test_kl_folder_loads_behind_the_same_interface(tmp_path):
    # A Stable-Diffusion-style AutoencoderKL (down/up blocks, double_z, quant convs), tiny, saved locally.
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                       layers_per_block=1, scaling_factor=0.18215).eval()
    kl.save_pretrained(tmp_path / "vae")
    mean_ae = load_autoencoder(tmp_path / "vae")
    sample_ae = load_autoencoder(tmp_path / "vae", sample_posterior=True)
    assert mean_ae.kind == "kl" and mean_ae.downsample_factor == 2 and mean_ae.num_embeddings is None
    x = images()
    with torch.no_grad():
        posterior = kl.encode(x).latent_dist
        z_mean = mean_ae.encode(x)
        torch.testing.assert_close(z_mean, posterior.mean * 0.18215)
        z1 = sample_ae.encode(x, generator=torch.Generator().manual_seed(1))
        z2 = sample_ae.encode(x, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(z1, z2)  # a seeded sample is reproducible ...
        eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(z1, (posterior.mean + posterior.std * eps) * 0.18215)  # ... and is mean + std eps
        assert not torch.allclose(z1, z_mean)
        torch.testing.assert_close(mean_ae.decode(z_mean), kl.decode(posterior.mean).sample)
        torch.testing.assert_close(mean_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1)), z1)


def test_kl_shift_factor_is_applied_as_diffusers_does(tmp_path):
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4, scaling_factor=1.5,
                       shift_factor=0.25).eval()
    kl.save_pretrained(tmp_path / "vae")
    ae = load_autoencoder(tmp_path / "vae")
    x = images()
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(z, (kl.encode(x).latent_dist.mean - 0.25) * 1.5)
        torch.testing.assert_close(ae.decode(z), kl.decode(z / 1.5 + 0.25).sample)


def test_built_kl_from_config_round_trips(tmp_path):
    ae = tiny(kind="kl").eval()
    ae.save_pretrained(tmp_path / "vae")
    back = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(load_autoencoder(tmp_path / "vae").encode(x), ae.encode(x))
        torch.testing.assert_close(back.encode(x).latent_dist.mean * ae.scaling_factor, ae.encode(x))


def test_sizes_not_divisible_by_f_raise_or_resize():
    ae = tiny().eval()
    with pytest.raises(ValueError, match=r"18x16 is not divisible .* f=4"):
        ae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.zeros(3, 16, 16))
    resizing = tiny(resize_input=True).eval()
    with torch.no_grad():
        assert resizing.encode(torch.zeros(1, 3, 18, 17)).shape == (1, 4, 4, 4)


def test_missing_or_mismatched_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_autoencoder(tmp_path / "nowhere")
    folder = tiny().save_pretrained(tmp_path / "vae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["quantize.embedding.weight"] = torch.zeros(32, 4)
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors: quantize.embedding.weight has shape "
                                         r"\(32, 4\) but .*config.json expects \(16, 4\)"):
        load_autoencoder(folder)
    del state["quantize.embedding.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing \['quantize.embedding.weight'\]"):
        load_autoencoder(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors not found"):
        load_autoencoder(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="_class_name must be one of VQModel, AutoencoderKL"):
        load_autoencoder(folder)


def test_scaling_factor_is_one_over_latent_std():
    ae = tiny().eval()
    batches = [images(4, seed=s) for s in range(3)]
    with torch.no_grad():
        factor = compute_scaling_factor(ae, batches, max_images=10)  # uses 4 + 4 + 2 images
        h = torch.cat([ae.model.encode(b).latents for b in batches])[:10]
        # the factor's last batch is encoded as 2 images, h's as 4 (float32 rounding apart); n vs n-1
        # in the std would be 8e-4 off
        assert factor == pytest.approx(1 / h.double().std().item(), rel=1e-5)
        assert ae.scaling_factor == pytest.approx(factor)
        assert ae.encode(torch.cat(batches)[:10]).double().std().item() == pytest.approx(1.0, rel=1e-5)


def test_config_rejects_bad_architectures():
    with pytest.raises(ValueError, match="model.kind must be one of vq, kl"):
        AutoencoderConfig(kind="gan")
    with pytest.raises(ValueError, match="norm_num_groups=32 does not divide channel count 48"):
        AutoencoderConfig(channels=48, channel_mult=[1])
    with pytest.raises(ValueError, match="attention_levels: level 3"):
        AutoencoderConfig(channel_mult=[1, 2], attention_levels=[3])


def _f8_512():
    config = load_config(VAETrainingConfig, CONFIGS / "vq-f8-512.yaml").model
    assert (config.downsample_factor, config.latent_channels, config.num_embeddings, config.embed_dim) == (8, 4, 16384, 4)
    assert config.block_out_channels == [128, 256, 256, 512] and config.layers_per_block == 2
    torch.manual_seed(0)
    return build_autoencoder(config).eval()


def test_vq_f8_512_config_builds_and_round_trips_a_small_image():
    ae = _f8_512()
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 3, 64, 64))
        assert z.shape == (1, 4, 8, 8)
        assert ae.decode(z).shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_vq_f8_512_encodes_and_decodes_one_512px_image():
    ae = _f8_512()
    start = time.time()
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 3, 512, 512))
        assert z.shape == (1, 4, 64, 64)
        assert ae.decode(z).shape == (1, 3, 512, 512)
    print(f"vq-f8-512 encode+decode of one 512 px image: {time.time() - start:.1f} s")
