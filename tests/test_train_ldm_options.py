"""Speed and memory options change no maths; bf16 autocast is really used; accumulation counts right."""

import pytest
import torch

from diffusers.models.attention_processor import AttnProcessor2_0

from ldm.unet import FP32AttentionProcessor
from train.unet.trainer import build_trainer
from train_fakes import TrainFakeAutoencoder, tiny_text_encoder, read_checkpoint, reset_accelerate, tiny_config, one_thread  # noqa: F401

BASE = ["validation.prompts=[]", "train.max_steps=3", "checkpoint.every=3"]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def train(tmp_path, *overrides, **fit):
    reset_accelerate()
    trainer = build_trainer(tiny_config(tmp_path, *BASE, *overrides), autoencoder=TrainFakeAutoencoder(),
                            text_encoder=tiny_text_encoder())
    result = trainer.fit(**fit)
    return trainer, result, read_checkpoint(result.checkpoint)[0]


@pytest.mark.parametrize("option", ["train.gradient_checkpointing=true", "train.channels_last=true",
                                    "optim.implementation=fused", "optim.implementation=for-loop"])
def test_speed_options_give_the_same_weights(tmp_path, option, monkeypatch):
    _, _, base = train(tmp_path / "base")
    checkpointed = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: checkpointed.append(1) or real(*a, **k))
    _, _, other = train(tmp_path / "other", option)
    assert bool(checkpointed) == ("checkpointing" in option)  # and it is really on
    for k, v in base["model"].items():
        torch.testing.assert_close(other["model"][k], v, rtol=1e-4, atol=1e-5, msg=f"{option}: {k}")


def test_bf16_autocast_runs_the_unet_in_bf16(tmp_path):
    seen = []
    _, _, fp32 = train(tmp_path / "fp32")
    reset_accelerate()
    trainer = build_trainer(tiny_config(tmp_path / "bf16", *BASE, "train.mixed_precision=bf16"),
                            autoencoder=TrainFakeAutoencoder(), text_encoder=tiny_text_encoder())
    trainer.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    result = trainer.fit()
    bf16 = read_checkpoint(result.checkpoint)[0]
    assert seen and set(seen) == {torch.bfloat16}
    # on a CPU the attention product runs in float32 (torch's bf16 attention kernels are slower there)
    assert {type(p) for p in trainer.unet.attn_processors.values()} == {FP32AttentionProcessor}
    assert all(v.dtype == torch.float32 for v in bf16["model"].values())  # master weights stay float32
    diff = max((bf16["model"][k] - v).abs().max().item() for k, v in fp32["model"].items())
    assert 0 < diff < 0.05  # the same training, at bf16's precision


@pytest.mark.parametrize("overrides", [[], ["train.mixed_precision=bf16", "train.fp32_attention=false"]])
def test_diffusers_attention_unless_bf16_on_cpu(tmp_path, overrides):
    trainer, _, _ = train(tmp_path, *overrides, "train.max_steps=1")
    assert {type(p) for p in trainer.unet.attn_processors.values()} == {AttnProcessor2_0}


def test_gradient_accumulation_steps_once_per_k_micro_batches(tmp_path):
    trainer, result, tensors = train(tmp_path, "train.gradient_accumulation_steps=3", "train.max_steps=2",
                                     "checkpoint.every=2", record_rows=True)
    assert result.step == 2 and len(result.seen) == 6 * 4  # 6 micro-batches of 4
    assert len(set(result.seen)) == 24  # one epoch: each training image once
    assert all(float(v) == 2 for k, v in tensors["optimizer"].items() if k.endswith(".step"))


def test_fp16_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        assert train(tmp_path, "train.mixed_precision=fp16")[1].step == 3
    else:
        with pytest.raises(ValueError, match="fp16 needs a GPU"):
            train(tmp_path, "train.mixed_precision=fp16")
