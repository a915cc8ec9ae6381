"""`ldm train` and `ldm finetune` end to end on real tiny encoders (ldm.testing): the bundle loads with
Text2ImagePipeline.from_pretrained, holds the EMA weights, and LoRA adapters round-trip through it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ldm.cli import main
from ldm.pipeline import Text2ImagePipeline
from ldm.testing import build_bundle, build_sd_folder
from train.run.log import read_csv
from train_fakes import TINY, make_imagefolder, read_checkpoint, reset_accelerate, one_thread  # noqa: F401


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny bundle of ours: its VQ-VAE (f = 4) and open_clip text encoder are the frozen encoders."""
    return build_bundle(tmp_path_factory.mktemp("encoders") / "bundle")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data") / "shapes")


def test_ldm_train_writes_logs_samples_and_a_bundle_that_loads(encoders, data, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(TINY), f"data.path={data}", f"encoders.autoencoder={encoders / 'vae'}",
            f"encoders.text_encoder={encoders}", f"train.output_dir={out}", f"cache.dir={tmp_path / 'cache'}",
            "train.max_steps=4", "validation.every=2"]
    assert main(args) == 0
    # the bundle: loads, holds the EMA weights of the last checkpoint, and generates 32 px images
    pipe = Text2ImagePipeline.from_pretrained(out / "bundle", backend="torch")
    tensors, state = read_checkpoint(out / "checkpoints" / "step-00000004")
    loaded = dict(pipe.unet.named_parameters())
    for name, value in tensors["ema"].items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    images = pipe("a red square", steps=3, guidance=2.0, seed=0, num_images=2)
    assert len(images) == 2 and images[0].size == (32, 32)
    assert json.loads((out / "bundle" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    # validation: grids at steps 2 and 4, held-out losses (raw and EMA), CSV and TensorBoard logs
    from PIL import Image

    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step-00000002.png", "step-00000004.png"]
    assert Image.open(out / "samples" / grids[-1]).size[0] == 70 + 2 * 32  # label column + 2 prompts x 1 seed
    val = read_csv(out / "logs" / "val.csv")
    assert [int(r["step"]) for r in val] == [2, 4] and all(float(r["loss"]) > 0 and float(r["loss_ema"]) > 0 for r in val)
    assert [int(r["step"]) for r in read_csv(out / "logs" / "train.csv")] == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tensorboard")).Reload()
    assert {"train/loss", "train/lr", "val/loss", "val/loss_ema"} <= set(events.Tags()["scalars"])
    assert "val/samples" in events.Tags()["images"]
    # a second run on the same encoders and data reuses the cache
    caches = list((tmp_path / "cache").iterdir())
    assert main([*args[:-2], f"train.output_dir={tmp_path / 'run2'}", "train.max_steps=1"]) == 0
    assert list((tmp_path / "cache").iterdir()) == caches


def test_lora_finetune_of_a_stable_diffusion_folder_round_trips_through_the_bundle(data, tmp_path):
    base = build_sd_folder(tmp_path / "sd")
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(base), "--data", str(data), f"train.output_dir={out}", f"cache.dir={tmp_path / 'cache'}",
            "train.max_steps=3", "train.batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=0", "lora.rank=4",
            "validation.prompts=[a red square]", "validation.seeds=[0]", "validation.steps=2", "ema.enabled=false"]
    assert main(args) == 0
    bundle = out / "bundle"
    assert (bundle / "pytorch_lora_weights.safetensors").is_file()  # diffusers' layout (tests/test_lora_interop.py)
    # unet/ holds the untouched base weights; the checkpoint holds only the LoRA weights
    base_w = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    out_w = load_file(bundle / "unet" / "diffusion_pytorch_model.safetensors")
    assert base_w.keys() == out_w.keys() and all(torch.equal(base_w[k], out_w[k]) for k in base_w)
    trained, state = read_checkpoint(out / "checkpoints" / "step-00000003")
    assert trained["model"] and all(".lora_A." in k or ".lora_B." in k for k in trained["model"])
    assert all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in trained["model"])
    # loading fuses the adapter: same outputs as the base U-Net carrying the trained adapter, not as the base
    pipe = Text2ImagePipeline.from_pretrained(bundle, backend="torch")
    base_pipe = Text2ImagePipeline.from_pretrained(base, backend="torch")
    adapted = Text2ImagePipeline.from_pretrained(base, backend="torch")
    adapted.unet.load_lora_adapter(bundle, prefix="unet", use_safetensors=True)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    ctx = pipe.text_encoder(["a red square", "a blue bar"])[0]
    with torch.no_grad():
        fused, unfused, plain = (p.model(x, t, ctx) for p in (pipe, adapted, base_pipe))
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)
    assert (fused - plain).abs().max() > 1e-4
    scheduler = json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["steps_offset"] == 1 and scheduler["prediction_type"] == "epsilon"  # the base model's conventions


def test_full_finetune_continues_our_bundle(encoders, data, tmp_path):
    from train.run.config import load_config
    from train.unet.finetune import finetune
    from train.unet.config import FinetuneConfig

    config = load_config(FinetuneConfig, None, [f"data.path={data}", f"train.output_dir={tmp_path / 'ft'}",
                                                f"cache.dir={tmp_path / 'cache'}", "lora.method=full", "train.max_steps=2",
                                                "train.batch_size=4", "validation.prompts=[]"])
    result = finetune(encoders, config)
    assert result.step == 2 and not (result.bundle / "pytorch_lora_weights.safetensors").exists()
    before = load_file(encoders / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(result.bundle / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert Text2ImagePipeline.from_pretrained(result.bundle, backend="torch")("a koala", steps=2, seed=0)[0].size == (32, 32)


def test_finetune_keeps_the_models_prediction_type(encoders, data, tmp_path):
    from train.run.config import load_config
    from train.unet.finetune import finetune
    from train.unet.config import FinetuneConfig

    config = load_config(FinetuneConfig, None, [f"data.path={data}", "objective.prediction=v"])
    with pytest.raises(ValueError, match="predicts eps"):
        finetune(encoders, config)
