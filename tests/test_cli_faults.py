"""Every subcommand that writes, run on tiny inputs with a writer that fails (a full disk): one line
`ldm <command>: error: no space left on the device ...`, exit code 3, no traceback, and what was on
disk before is intact. The failure is injected where every write of the toolkit ends, the rename
into place (``os.replace``, through ``ldm_io``), so no writer can be skipped by accident."""

import errno
import hashlib
import os
from pathlib import Path

import pytest

from ldm.cli import main
from ldm.testing import build_bundle
from train_fakes import TINY, make_imagefolder, reset_accelerate, one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data") / "shapes", n=12, size=32, heldout_every=4)


def commands(bundle: Path, data: Path, out: Path) -> dict[str, list[str]]:
    tiny_vae, tiny_clip = ROOT / "configs" / "vae" / "tiny.yaml", ROOT / "configs" / "clip" / "tiny.yaml"
    return {
        "generate": ["generate", "a red circle", "--model", str(bundle), "--steps", "2", "--out", str(out / "x.png")],
        "sweep": ["sweep", "a red circle", "--model", str(bundle), "--guidance", "1,2", "--seeds", "0", "--steps", "2",
                  "--out", str(out / "sweep")],
        "data shapes": ["data", "shapes", "--n", "4", "--size", "32", "--out", str(out / "shapes")],
        "train": ["train", str(TINY), f"data.path={data}", f"encoders.autoencoder={bundle / 'vae'}",
                  f"encoders.text_encoder={bundle}", f"train.output_dir={out / 'run'}", f"cache.dir={out / 'cache'}",
                  "train.max_steps=2", "train.batch_size=4", "validation.prompts=[]"],
        "finetune": ["finetune", "--model", str(bundle), "--data", str(data), f"train.output_dir={out / 'ft'}",
                     f"cache.dir={out / 'cache'}", "train.max_steps=2", "train.batch_size=4", "validation.prompts=[]"],
        "train-vae": ["train-vae", str(tiny_vae), f"data.path={data}", f"train.output_dir={out / 'vae'}", "model.resolution=32",
                      "train.max_steps=2", "train.batch_size=4", "--quiet"],
        "train-clip": ["train-clip", str(tiny_clip), f"data.path={data}", f"train.output_dir={out / 'clip'}",
                       "train.max_steps=2", "train.batch_size=4", "train.progress=false"],
        "eval-vae": ["eval-vae", "--vae", str(bundle / "vae"), "--data", str(data), "--out", str(out / "eval.png")],
        "pack": ["pack", str(bundle), "--out", str(out / "packed")],
    }


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["generate", "sweep", "data shapes", "train", "finetune", "train-vae", "train-clip",
                                  "eval-vae", "pack"])
def test_a_full_disk_is_one_line_exit_3_and_loses_nothing(name, bundle, data, tmp_path, tmp_path_factory, monkeypatch,
                                                          capsys):
    reset_accelerate()
    out = tmp_path / "out"
    out.mkdir()
    argv = commands(bundle, data, out)[name]
    inputs = {"bundle": tree_hashes(bundle), "data": tree_hashes(data)}
    real_replace = os.replace

    def full_disk(src, dst, *a, **k):
        if str(dst).startswith(str(tmp_path_factory.getbasetemp())):  # the test's folders: outputs, caches beside inputs
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_disk)
    code = main(argv)
    err = capsys.readouterr().err
    command = name.split()[0]
    assert code == 3, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]  # progress bars redraw with \r
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], err  # one error line, the last
    assert lines[-1].startswith(f"ldm {command}: error: no space left on the device"), err
    assert "Traceback" not in err
    assert {"bundle": tree_hashes(bundle), "data": tree_hashes(data)} == inputs  # the inputs untouched
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []  # no temporary file or folder left behind
