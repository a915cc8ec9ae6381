"""Configs of the U-Net trainer: the three recipes load, the SD-scale one has SD 1.x's size, bad input is an error."""

import pytest
import torch

from ldm.unet import UNetConfig, build_unet
from train.run.config import load_config
from train.unet.config import FinetuneConfig, LDMTrainConfig
from train_fakes import ROOT, one_thread  # noqa: F401  (one_thread: autouse fixture)

CONFIGS = ROOT / "configs" / "ldm"


def n_params(config: LDMTrainConfig, latent: int, context: int) -> int:
    with torch.device("meta"):
        unet = build_unet(config.model, latent_channels=4, sample_size=latent, cross_attention_dim=context)
    return sum(p.numel() for p in unet.parameters())


def test_sd_512_is_stable_diffusion_1_scale():
    config = load_config(LDMTrainConfig, CONFIGS / "sd-512.yaml")
    assert config.data.resolution == 512 and config.model.cross_attention_dim == 768
    n = n_params(config, 64, 768)
    assert abs(n - 859.52e6) < 0.05e6  # SD 1.x's U-Net: 859,520,964 parameters


def test_sd_512_unet_runs_at_reduced_size():
    """The SD-scale architecture's forward pass, at width 32 per level instead of 320..1280."""
    config = load_config(LDMTrainConfig, CONFIGS / "sd-512.yaml",
                         ["model.block_out_channels=[32, 32, 64, 64]", "model.cross_attention_dim=32"])
    torch.manual_seed(0)
    unet = build_unet(config.model, latent_channels=4, sample_size=16, cross_attention_dim=32)
    out = unet(torch.randn(1, 4, 16, 16), torch.tensor([500]), encoder_hidden_states=torch.randn(1, 7, 32)).sample
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_small_64_is_about_17m_parameters_on_16x16x4_latents():
    config = load_config(LDMTrainConfig, CONFIGS / "small-64.yaml")
    assert config.data.resolution == 64
    assert 16e6 < n_params(config, 16, 512) < 19.5e6


def test_tiny_trains_in_a_handful_of_steps():
    config = load_config(LDMTrainConfig, CONFIGS / "tiny.yaml")
    assert config.train.max_steps <= 10 and n_params(config, 8, 16) < 1e6


def test_overrides_set_dotted_keys_with_their_types():
    config = load_config(LDMTrainConfig, CONFIGS / "tiny.yaml", ["optim.lr=3e-4", "train.max_steps=7", "objective.min_snr_gamma=5"])
    assert config.optim.lr == 3e-4 and config.train.max_steps == 7 and config.objective.min_snr_gamma == 5.0


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=1", "not a key; allowed keys in optim: lr"),
    ("train.max_steps=ten", "expected an integer"),
    ("objective.prediction=x0", "allowed values"),
    ("train.mixed_precision=fp8", "allowed values"),
    ("objective.p_uncond=1.5", "p_uncond"),
    ("model.down_block_types=[CrossAttnDownBlock2D, Foo]", "allowed values"),
    ("model.norm_num_groups=7", "norm_num_groups"),
])
def test_bad_config_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(LDMTrainConfig, CONFIGS / "tiny.yaml", [override])


def test_context_width_must_match_the_text_encoder():
    with pytest.raises(ValueError, match="cross_attention_dim=768"):
        build_unet(UNetConfig(cross_attention_dim=768), latent_channels=4, sample_size=8, cross_attention_dim=512)


def test_finetune_defaults_are_lora_on_attention_projections_at_the_models_size():
    config = load_config(FinetuneConfig, None, ["data.path=x", "objective.p_uncond=0.2"])
    assert config.lora.method == "lora" and config.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert config.data.resolution == 0 and config.objective.prediction is None  # the model's, also with other keys set
