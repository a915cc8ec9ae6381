"""Frozen encoders and a tiny captioned data set for the U-Net trainer's tests.

The trainer touches the encoders only to build its cache, draw validation images and write the
bundle. The autoencoder is a stand-in (encode/decode, save_pretrained); the text encoder is a real
tiny open_clip one (``ldm.testing.text_encoder``), since its contexts go through
``conditioning.EmbeddingCache``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline_fakes import FakeAutoencoder
from train.run import checkpoint as ckpt
from train.run.config import load_config
from train.unet.config import LDMTrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "ldm" / "tiny.yaml"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "bar")


class TrainFakeAutoencoder(FakeAutoencoder):
    """encode: average-pool by f, then a fixed 1x1 conv to 4 channels; decode as FakeAutoencoder."""

    kind, scaling_factor, shift_factor = "vq", 1.0, 0.0

    def __init__(self, seed: int = 2):
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.enc.weight.copy_(torch.randn(self.enc.weight.shape, generator=g))
            self.enc.bias.zero_()
        self.encode_calls = 0

    def encode(self, images):  # (B, 3, H, W) -> (B, 4, H/f, W/f)
        self.encode_calls += 1
        return self.enc(torch.nn.functional.avg_pool2d(images, self.downsample_factor))

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"_class_name": "VQModel", "scaling_factor": 1.0}))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
        return folder


def tiny_text_encoder(seed: int = 0):
    """A real tiny open_clip TextEncoder (16-wide contexts of 77 tokens); another seed, another encoder."""
    from ldm.testing import text_encoder

    return text_encoder(seed)


def count_calls(encoder) -> list[list[str]]:
    """The prompt lists ``encoder`` is called with from now on."""
    calls, forward = [], encoder.forward

    def counted(prompts, *args, **kwargs):
        calls.append(list(prompts))
        return forward(prompts, *args, **kwargs)

    encoder.forward = counted
    return calls


def make_imagefolder(folder: Path, n: int = 28, size: int = 32, heldout_every: int = 7,
                     sizes: Optional[list[tuple[int, int]]] = None) -> Path:
    """``n`` images of coloured shapes with captions ("a red circle"), every ``heldout_every``-th in split "test"
    (``heldout_every=0``: no split column); ``size`` x ``size`` pixels, or image i ``sizes[i % len(sizes)]``
    = (width, height) with the shape drawn in its top-left ``size`` x ``size`` square."""
    from PIL import ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        im = Image.new("RGB", sizes[i % len(sizes)] if sizes else (size, size), "white")
        d = ImageDraw.Draw(im)
        lo, hi = size // 4 + i % 3, 3 * size // 4 - (i % 2)
        if shape == "circle":
            d.ellipse((lo, lo, hi, hi), fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle((lo, lo, hi, hi), fill=COLOURS[colour])
        else:
            d.rectangle((2, lo, size - 3, lo + size // 6), fill=COLOURS[colour])
        name = f"{i:04d}.png"
        im.save(folder / name)
        row = {"file_name": name, "text": f"a {colour} {shape}"}
        if heldout_every:
            row["split"] = "test" if i % heldout_every == heldout_every - 1 else "train"
        rows.append(row)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tiny_config(tmp_path: Path, *overrides: str, data: Path | None = None) -> LDMTrainConfig:
    """The tiny config with its outputs and cache under ``tmp_path`` and a generated data set."""
    data = data if data is not None else make_imagefolder(tmp_path / "data")
    return load_config(LDMTrainConfig, TINY, [f"data.path={data}", f"train.output_dir={tmp_path / 'run'}",
                                              f"cache.dir={tmp_path / 'cache'}", *overrides])


def read_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensor groups by file stem: model, optimizer, ema; state.json) of a checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(path)
    return {f.stem: load_file(f) for f in sorted(path.glob("*.safetensors"))}, json.loads((path / "state.json").read_text())


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next Accelerator may use other settings."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Each test starts and ends with accelerate's process-wide state forgotten (a module imports this to use it)."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kill_repeatedly(launch: Callable[[], subprocess.Popen], checkpoints: Path, check: Callable[[], None], *,
                    max_delay: float, max_kills: Optional[int] = None, seed: int = 0) -> tuple[subprocess.Popen, int]:
    """The kill -9 test of every trainer: start ``launch()`` (a training run that resumes from its newest
    checkpoint) again and again; each time, once the process has written a checkpoint of its own, SIGKILL
    it after a random delay (mid-step, mid-checkpoint, mid-rotation) and call ``check()``. Stops after
    ``max_kills`` or when a process finishes before it is killed; returns (the last process, kills)."""
    rng, kills = random.Random(seed), 0
    while True:
        proc = launch()
        if max_kills is not None and kills == max_kills:
            return proc, kills
        before = [p.name for p in ckpt.list_checkpoints(checkpoints)][-1:]
        while proc.poll() is None and [p.name for p in ckpt.list_checkpoints(checkpoints)][-1:] == before:
            time.sleep(0.02)  # wait until this process has written a checkpoint of its own
        if proc.poll() is not None:
            return proc, kills
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        check()


def nan_at(monkeypatch, calls: set[int]):
    """Make the training loss NaN on the given micro-batches (1-based, counted across runs)."""
    from train.unet import trainer as ldm_trainer

    real, count = ldm_trainer.weighted_mse, [0]

    def loss(pred, batch):
        count[0] += 1
        value = real(pred, batch)
        return value * float("nan") if count[0] in calls else value

    monkeypatch.setattr(ldm_trainer, "weighted_mse", loss)
