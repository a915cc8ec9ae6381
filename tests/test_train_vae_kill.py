"""SIGKILL ``ldm train-vae`` at random moments: the newest checkpoint is always complete and loads,
nothing half-written ever sits under a step-* name, and resuming after every kill ends with the
weights of a run that was never killed."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_vae import TINY, final_files, make_data
from train.run import checkpoint as ckpt
from train.run.config import load_config
from train.vae.config import VAETrainingConfig
from train.vae.trainer import VAETrainer, expected_files, train_vae
from train_fakes import kill_repeatedly, reset_accelerate

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from train.run import checkpoint as ckpt
from train.run.config import load_config
from train.vae.config import VAETrainingConfig
from train.vae.trainer import train_vae
config = load_config(VAETrainingConfig, {tiny!r}, {overrides!r})
resume = "latest" if ckpt.list_checkpoints({run!r} + "/checkpoints") else None
train_vae(config, resume=resume, progress=False)
"""
# the GAN on from step 4: the discriminator and its optimizer are in the checkpoints killed mid-write too
KILLS = 2
OVERRIDES = ["train.max_steps=16", "checkpoint.every=1", "checkpoint.keep_last=2", "train.log_every=1",
             "loss.disc_weight=0.5", "loss.disc_start=4", "loss.disc_layers=2", "loss.disc_channels=8"]


def launch(run: Path, data: Path) -> subprocess.Popen:
    overrides = [*OVERRIDES, f"data.path={data}", f"train.output_dir={run}"]
    script = SCRIPT.format(root=str(ROOT), tiny=str(TINY), overrides=overrides, run=str(run))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def check_newest_loads(run: Path, data: Path) -> None:
    """The newest checkpoint has every file, its name is its step, and it loads into a fresh trainer."""
    root = run / "checkpoints"
    assert ckpt.list_checkpoints(root) == sorted(root.glob("step-*"))  # no step-* folder without its state.json
    newest = ckpt.list_checkpoints(root)[-1]
    config = load_config(VAETrainingConfig, TINY, [*OVERRIDES, f"data.path={data}", f"train.output_dir={run}"])
    assert sorted(f.name for f in newest.iterdir()) == sorted(expected_files(config))
    tensors, state = final_files(run)
    assert newest.name == ckpt.checkpoint_name(state["step"])
    assert all(torch.isfinite(t.float()).all() for group in tensors.values() for t in group.values())
    reset_accelerate()
    trainer = VAETrainer(config, progress=False)
    try:
        assert trainer.prepare("latest")["step"] == state["step"]  # what --resume latest checks and loads
    finally:
        trainer.close()


@pytest.mark.slow  # three training processes, each ~10 s of imports on 2 shared cores
def test_sigkill_at_random_moments(tmp_path):
    data = make_data(tmp_path / "data")
    run = tmp_path / "killed"
    proc, kills = kill_repeatedly(lambda: launch(run, data), run / "checkpoints", lambda: check_newest_loads(run, data),
                                  max_delay=0.3, max_kills=KILLS)
    assert kills == KILLS, "the run finished before it was killed: give it more steps"
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())

    reset_accelerate()
    train_vae(load_config(VAETrainingConfig, TINY, [*OVERRIDES, f"data.path={data}",
                                                    f"train.output_dir={tmp_path / 'straight'}"]), progress=False)
    (a, state_a), (b, state_b) = final_files(tmp_path / "straight"), final_files(run)
    assert state_a["step"] == state_b["step"] == 16
    for group in a:
        for k in a[group]:
            torch.testing.assert_close(a[group][k], b[group][k], rtol=0, atol=0, msg=f"{group} {k}")
    va = load_file(tmp_path / "straight" / "vae" / "diffusion_pytorch_model.safetensors")
    vb = load_file(run / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(va[k], vb[k]) for k in va)
