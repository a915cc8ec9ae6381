"""Checkpoints and resume: stopped and resumed (twice) equals never stopped; a checkpoint being
written when the process dies never replaces the last complete one; only the newest K are kept."""

import json
import os
import random

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from safetensors.torch import load_file

from train.run import checkpoint as ckpt
from train.unet.trainer import train_from_config
from train.run.log import read_csv
from train_fakes import (TrainFakeAutoencoder, tiny_text_encoder, make_imagefolder, read_checkpoint, reset_accelerate,
                         tiny_config, one_thread)  # noqa: F401  (one_thread: autouse fixture)

# accumulation over 2 micro-batches, 3 optimizer steps per epoch (24 training images, batch 4),
# caption dropout, noise offset and min-SNR all on: every source of randomness and position is used.
HARD = ["train.gradient_accumulation_steps=2", "objective.p_uncond=0.5", "objective.noise_offset=0.1",
        "objective.min_snr_gamma=5", "validation.prompts=[]", "checkpoint.keep_last=3"]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def run(config, **kw):
    reset_accelerate()
    return train_from_config(config, autoencoder=TrainFakeAutoencoder(), text_encoder=tiny_text_encoder(), **kw)


def final_state(result):
    return read_checkpoint(result.checkpoint)


def test_stopped_and_resumed_twice_equals_uninterrupted(tmp_path):
    data = make_imagefolder(tmp_path / "data")
    # the uninterrupted run also validates after every step: validation must not touch training's randomness
    straight = run(tiny_config(tmp_path / "a", *HARD, "validation.every=1", data=data))
    assert straight.step == 6 and straight.epoch == 1

    config = tiny_config(tmp_path / "b", *HARD, "validation.every=0", data=data)
    first = run(config, stop_at_step=2)
    assert first.step == 2 and first.bundle is None
    torch.manual_seed(123), random.seed(5), np.random.seed(7)  # whatever happens in between is undone by resume
    second = run(config, resume="latest", stop_at_step=4)
    assert second.step == 4 and second.epoch == 1  # mid-epoch: the data position is restored too
    third = run(config, resume="latest")
    assert third.step == 6 and third.bundle is not None

    (a, state_a), (b, state_b) = final_state(straight), final_state(third)
    for group in ("model", "ema", "optimizer"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            torch.testing.assert_close(a[group][k], b[group][k], rtol=0, atol=1e-6, msg=f"{group} {k}")
    for key in ("lr_scheduler", "epoch", "batch_in_epoch", "ema"):
        assert state_a[key] == state_b[key]
    assert state_a["rng"] == state_b["rng"]
    # the training curves agree step by step, and the resumed log has each step once
    loss_a = [float(r["loss"]) for r in read_csv(tmp_path / "a" / "run" / "logs" / "train.csv")]
    rows_b = read_csv(tmp_path / "b" / "run" / "logs" / "train.csv")
    assert [int(r["step"]) for r in rows_b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([float(r["loss"]) for r in rows_b], loss_a, rtol=1e-5)
    bundle_a = load_file(straight.bundle / "unet" / "diffusion_pytorch_model.safetensors")
    bundle_b = load_file(third.bundle / "unet" / "diffusion_pytorch_model.safetensors")
    for k in bundle_a:
        torch.testing.assert_close(bundle_a[k], bundle_b[k], rtol=0, atol=1e-6)


def test_the_bundle_holds_the_ema_weights(tmp_path):
    result = run(tiny_config(tmp_path, "validation.prompts=[]"))
    tensors, _ = final_state(result)
    unet = load_file(result.bundle / "unet" / "diffusion_pytorch_model.safetensors")
    for k, v in tensors["ema"].items():
        torch.testing.assert_close(unet[k], v, rtol=0, atol=0)
    assert any(not torch.equal(tensors["model"][k], tensors["ema"][k]) for k in tensors["ema"])
    config = yaml.safe_load((result.bundle / "training_config.yaml").read_text())
    assert config["train"]["max_steps"] == 6


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    result = run(tiny_config(tmp_path, "validation.prompts=[]", "checkpoint.every=1", "checkpoint.keep_last=2"))
    root = result.checkpoint.parent
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000005", "step-00000006"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005", "step-00000006"]


def test_dying_while_writing_a_checkpoint_keeps_the_last_complete_one(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "validation.prompts=[]")
    run(config, stop_at_step=2)
    root = tmp_path / "run" / "checkpoints"
    good = ckpt.list_checkpoints(root)[-1]
    before = {f.name: f.read_bytes() for f in good.iterdir()}

    calls = []
    real_save = safetensors.torch.save_file

    def dies_on_second_file(tensors, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            real_save(dict(list(tensors.items())[:1]), path)  # half a file, then the process is gone
            raise KeyboardInterrupt
        real_save(tensors, path, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        run(config, resume="latest", stop_at_step=4)
    assert ckpt.list_checkpoints(root)[-1] == good  # the half-written step-4 checkpoint is not a checkpoint
    assert {f.name: f.read_bytes() for f in good.iterdir()} == before
    os.makedirs(root / ".step-00000004.x1y2.tmp")  # what a SIGKILL (no cleanup) would leave
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    result = run(config, resume="latest")
    assert result.step == 6 and not any(p.name.startswith(".") for p in root.iterdir())


def test_rng_states_round_trip():
    g = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    saved = json.loads(json.dumps(ckpt.rng_state({"g": g})))
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=g))
    random.seed(9), np.random.seed(9), torch.manual_seed(9), g.manual_seed(9)
    ckpt.set_rng_state(saved, {"g": g})
    assert (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=g)) == expected


def test_resume_needs_a_checkpoint_and_the_same_batch_settings(tmp_path):
    config = tiny_config(tmp_path, "validation.prompts=[]")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        run(config, resume="latest")
    run(config, stop_at_step=2)
    with pytest.raises(ValueError, match="same settings"):
        run(tiny_config(tmp_path, "validation.prompts=[]", "train.batch_size=2"), resume="latest")


def test_stopped_and_resumed_with_buckets_equals_uninterrupted_bitwise(tmp_path):
    """Aspect-ratio buckets (three of 8 training images each: 2 micro-batches of 4 per bucket, 3 optimizer
    steps per epoch): stopped mid-epoch 0 and mid-epoch 1, the resumed run ends with the same bits."""
    data = make_imagefolder(tmp_path / "data", sizes=[(32, 32), (48, 32), (32, 48)])
    buckets = "data.buckets.enabled=true"
    straight = run(tiny_config(tmp_path / "a", *HARD, buckets, "validation.every=1", data=data), record_rows=True)
    assert straight.step == 6 and straight.epoch == 1
    config = tiny_config(tmp_path / "b", *HARD, buckets, "validation.every=0", data=data)
    seen = run(config, stop_at_step=2, record_rows=True).seen
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    seen += run(config, resume="latest", stop_at_step=4, record_rows=True).seen
    third = run(config, resume="latest", record_rows=True)
    assert third.step == 6 and third.bundle is not None
    assert seen + third.seen == straight.seen  # the same rows in the same order
    (a, state_a), (b, state_b) = final_state(straight), final_state(third)
    for group in ("model", "ema", "optimizer"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group} {k}"
    assert state_a["rng"] == state_b["rng"]
