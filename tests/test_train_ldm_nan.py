"""Non-finite losses: the step is skipped and counted; K in a row stop training with a clear message
and leave the last good checkpoint as it was."""

import math

import pytest
import torch

from train.run import checkpoint as ckpt
from train.unet.trainer import TrainingDiverged, train_from_config
from train.run.log import read_csv
from train_fakes import TrainFakeAutoencoder, nan_at, tiny_text_encoder, read_checkpoint, reset_accelerate, tiny_config, one_thread  # noqa: F401


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def run(config, **kw):
    return train_from_config(config, autoencoder=TrainFakeAutoencoder(), text_encoder=tiny_text_encoder(), **kw)


def test_a_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    nan_at(monkeypatch, {3})
    result = run(tiny_config(tmp_path, "validation.prompts=[]"))
    assert result.step == 6 and result.skipped_steps == 1 and result.bundle is not None
    tensors, state = read_checkpoint(result.checkpoint)
    assert all(torch.isfinite(v).all() for group in tensors.values() for v in group.values())
    assert all(float(v) == 5 for k, v in tensors["optimizer"].items() if k.endswith(".step"))  # 5 updates, not 6
    assert state["ema"]["optimization_step"] == 5
    rows = read_csv(tmp_path / "run" / "logs" / "train.csv")
    assert [int(r["skipped_steps"]) for r in rows] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(float(rows[2]["loss"])) and all(math.isfinite(float(r["loss"])) for r in rows if r["step"] != "3")


def test_k_nan_steps_in_a_row_stop_training_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "validation.prompts=[]", "train.max_consecutive_nonfinite=3", "train.max_steps=10")
    nan_at(monkeypatch, set(range(3, 100)))  # from step 3 on, every loss is NaN
    with pytest.raises(TrainingDiverged) as info:
        run(config)
    message = str(info.value)
    good = tmp_path / "run" / "checkpoints" / "step-00000002"  # none is written during the NaN steps
    assert "step 5" in message and "3 non-finite losses in a row" in message and str(good) in message
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1] == good
    tensors, state = read_checkpoint(good)
    assert state["step"] == 2 and state["skipped_steps"] == 0
    assert all(torch.isfinite(v).all() for group in tensors.values() for v in group.values())
    assert not (tmp_path / "run" / "bundle").exists()


def test_nan_in_one_micro_batch_skips_the_whole_accumulated_step(tmp_path, monkeypatch):
    nan_at(monkeypatch, {3})  # the first micro-batch of step 2
    result = run(tiny_config(tmp_path, "validation.prompts=[]", "train.gradient_accumulation_steps=2", "train.max_steps=3"))
    assert result.step == 3 and result.skipped_steps == 1
    tensors, _ = read_checkpoint(result.checkpoint)
    assert all(float(v) == 2 for k, v in tensors["optimizer"].items() if k.endswith(".step"))
