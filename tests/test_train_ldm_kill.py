"""SIGKILL at random moments: the latest complete checkpoint always loads, and resuming after every
kill ends with the weights of a run that was never killed."""

import subprocess
import sys

import pytest
import torch

from train.run import checkpoint as ckpt
from train_fakes import ROOT, kill_repeatedly, make_imagefolder, read_checkpoint, one_thread  # noqa: F401

SCRIPT = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
torch.set_num_threads(1)
from pathlib import Path
from train.run import checkpoint as ckpt
from train.unet.trainer import train_from_config
from train_fakes import TrainFakeAutoencoder, tiny_text_encoder, tiny_config
tmp = Path({tmp!r})
config = tiny_config(tmp, *{overrides!r}, data=tmp.parent / "data")
resume = "latest" if ckpt.list_checkpoints(tmp / "run" / "checkpoints") else None
train_from_config(config, resume=resume, autoencoder=TrainFakeAutoencoder(), text_encoder=tiny_text_encoder())
"""
OVERRIDES = ["train.max_steps=16", "checkpoint.every=1", "checkpoint.keep_last=2", "validation.prompts=[]",
             "train.gradient_accumulation_steps=2", "objective.p_uncond=0.5"]


def launch(tmp):
    script = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), tmp=str(tmp), overrides=OVERRIDES)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    make_imagefolder(tmp_path / "data")
    straight = launch(tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]

    root = tmp_path / "killed" / "run" / "checkpoints"

    def newest_is_whole():
        latest = ckpt.list_checkpoints(root)[-1]
        tensors, state = read_checkpoint(latest)  # loads, and is what its name says
        assert latest.name == f"step-{state['step']:08d}"
        assert all(torch.isfinite(t).all() for group in tensors.values() for t in group.values())

    proc, kills = kill_repeatedly(lambda: launch(tmp_path / "killed"), root, newest_is_whole, max_delay=0.6)
    proc.wait()
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert kills >= 3

    a, _ = read_checkpoint(tmp_path / "straight" / "run" / "checkpoints" / "step-00000016")
    b, _ = read_checkpoint(root / "step-00000016")
    for group in ("model", "ema", "optimizer"):
        for k in a[group]:
            torch.testing.assert_close(a[group][k], b[group][k], rtol=0, atol=1e-6)
