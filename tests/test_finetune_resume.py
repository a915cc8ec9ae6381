"""`ldm finetune` is reproducible: two runs of one config give the same weights bit for bit, and a run
stopped at a checkpoint and resumed ends where the unbroken run ends, bit for bit (as `ldm train`'s
resume test shows for training from scratch). A LoRA's A matrices are drawn from a generator; they
must come from the run's seed, not from whatever the process drew before."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ldm.pack import pack_bundle
from ldm.testing import build_bundle
from train.run.config import load_config
from train.unet.config import FinetuneConfig
from train_fakes import make_imagefolder
from train_fakes import fresh_accelerate, one_thread  # noqa: F401  (autouse fixtures)

BASE_CAPTIONS = ["a red circle", "a green square", "a blue bar"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny packed bundle (its token table keeps BASE_CAPTIONS' tokens) and 16 images, half of them with
    words the table lacks ("purple sketch"), so text.train=new_words has rows to learn."""
    root = tmp_path_factory.mktemp("resume")
    pack_bundle(build_bundle(root / "full"), root / "packed", keep_captions=BASE_CAPTIONS)
    data = make_imagefolder(root / "data", n=16)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for r in rows[::2]:
        r["text"] += ", purple sketch"
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "packed", data


def config(data, out, cache, *overrides) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [
        f"data.path={data}", f"train.output_dir={out}", f"cache.dir={cache}", "train.max_steps=6", "train.batch_size=4",
        "optim.warmup_steps=0", "optim.lr=1e-2", "text.lr=1e-2", "checkpoint.every=3", "validation.prompts=[]",
        "validation.base_prompts=[]", "validation.at_start=false", *overrides])


@pytest.mark.parametrize("overrides", [("lora.method=lora", "text.train=new_words"),
                                       ("lora.method=lora", "text.train=frozen", "ema.enabled=false"),
                                       ("lora.method=full", "text.train=frozen")])
def test_stopped_and_resumed_equals_unbroken_bit_for_bit(setup, tmp_path, overrides):
    from train.unet.finetune import finetune

    packed, data = setup
    torch.rand(7)  # the global generator's state must not matter
    unbroken = finetune(packed, config(data, tmp_path / "a", tmp_path / "cache", *overrides))
    torch.rand(3)
    first = finetune(packed, config(data, tmp_path / "b", tmp_path / "cache", *overrides), stop_at_step=3)
    assert first.bundle is None and first.step == 3
    resumed = finetune(packed, config(data, tmp_path / "b", tmp_path / "cache", *overrides), resume="latest")
    for leg in ("step-00000003", "step-00000006"):  # the checkpoints of both runs, weights and optimizer
        for name in ("model.safetensors", "optimizer.safetensors"):
            a = load_file(tmp_path / "a" / "checkpoints" / leg / name)
            b = load_file(tmp_path / "b" / "checkpoints" / leg / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (leg, name)
    files = sorted(p.relative_to(unbroken.bundle) for p in unbroken.bundle.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(resumed.bundle) for p in resumed.bundle.rglob("*.safetensors"))
    for f in files:  # the bundles: U-Net or adapter, and the text encoder with its learnt rows
        a, b = load_file(unbroken.bundle / f), load_file(resumed.bundle / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
