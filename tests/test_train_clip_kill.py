"""ldm train-clip killed (SIGKILL) at random moments: the newest checkpoint is always complete and
loads, nothing half-written ever carries a step-* name, and resuming after every kill ends with the
weights of a run that was never killed."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conditioning.clip_model import build_open_clip_model
from train.clip.config import load_train_config
from train.clip.model import ContrastivePair, param_groups
from train.run import checkpoint as ckpt
from train.run.lr import build_optimizer
from train_fakes import ROOT, kill_repeatedly, make_imagefolder, read_checkpoint, one_thread  # noqa: F401

CONFIG = str(ROOT / "configs" / "clip" / "tiny.yaml")
# 24 training pairs in micro-batches of 8, two per step; crops and flips use the augmentation generator
OVERRIDES = ["train.max_steps=6", "train.batch_size=8", "train.gradient_accumulation_steps=2", "train.num_threads=1",
             "train.progress=false", "checkpoint.every=1", "checkpoint.keep_last=2", "data.min_crop_scale=0.7",
             "data.flip=true"]
SCRIPT = """
import sys
sys.path[:0] = [{root!r}]
from ldm.cli import main
from train.run import checkpoint as ckpt
args = {args!r}
sys.exit(main(args + (["--resume", "latest"] if ckpt.list_checkpoints({checkpoints!r}) else [])))
"""


def launch(data, run):
    args = ["train-clip", CONFIG, f"data.path={data}", f"train.output_dir={run}", *OVERRIDES]
    script = SCRIPT.format(root=str(ROOT), args=args, checkpoints=str(run / "checkpoints"))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def assert_checkpoints_whole(root, config):
    """Every step-* folder is a complete checkpoint whose weights and optimizer load into the model."""
    named = [p for p in root.iterdir() if p.name.startswith("step-")]
    assert named and named == [p for p in named if (p / "state.json").is_file()]
    for path in named:
        tensors, state = read_checkpoint(path)
        assert path.name == f"step-{state['step']:08d}" and set(tensors) == {"model", "optimizer"}
        module = ContrastivePair(build_open_clip_model(config.model.to_open_clip()))
        optimizer = build_optimizer(param_groups(module, config.optim.weight_decay), config.optim)
        ckpt.load_checkpoint(path, module, optimizer)
        assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    data = make_imagefolder(tmp_path / "data")
    config = load_train_config(CONFIG, [f"data.path={data}", *OVERRIDES])
    straight = launch(data, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]

    run = tmp_path / "killed"
    root = run / "checkpoints"
    proc, kills = kill_repeatedly(lambda: launch(data, run), root, lambda: assert_checkpoints_whole(root, config),
                                  max_delay=0.4)
    proc.wait()
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert kills >= 2
    assert not any(p.name.startswith(".") for p in root.iterdir())  # the resumed runs cleared what the kills left

    a = load_file(tmp_path / "straight" / "text_encoder" / "model.safetensors")
    b = load_file(run / "text_encoder" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
