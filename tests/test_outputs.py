"""Where every writing command may write (ldm_io.outputs): nothing the user did not name as the thing
to replace is removed or replaced, and a bad output location is one line, exit 2, before any work.

Each refusal is checked with file hashes: the whole workspace (the model, a data set, a notes file,
earlier outputs) is byte for byte what it was. The read-only file system is a real one where the
kernel lets this process make it (a read-only bind mount in a user and mount namespace, ``unshare``);
running as root, chmod 0o555 would not stop a write, so the in-process variant injects EROFS into the
guard's write probe instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.cli import main
from ldm.sweep import SWEEP_FILES
from ldm.testing import build_bundle
from ldm_io import OutputError, claim_output_dir, claim_output_file
from ldm_io.outputs import MARKER, png_text_keys, written_by_ldm

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"train": str(ROOT / "configs/ldm/tiny.yaml"), "train-vae": str(ROOT / "configs/vae/tiny.yaml"),
           "train-clip": str(ROOT / "configs/clip/tiny.yaml")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture
def ws(built, tmp_path, monkeypatch):
    """A workspace as a user has one: a bundle, a notes file, a folder of their own files, a data set."""
    shutil.copytree(built, tmp_path / "b")
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n not ours")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def hashes(root: Path) -> dict[str, str]:
    """Every entry under ``root``: its path -> sha256 of a file's bytes, or "dir"."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run ``ldm argv``; assert one error line, exit 2, no traceback; return the line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"ldm {argv[0]}: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def ok(capsys, argv: list) -> None:
    """Run ``ldm argv``; assert exit 0; drop what it printed (progress bars)."""
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    capsys.readouterr()


def refused_unchanged(ws: Path, capsys, argv: list[str], *needles: str) -> str:
    before = hashes(ws)
    err = refused(capsys, argv, *needles)
    assert hashes(ws) == before
    return err


# -- export-web and pack: the model bundle, the folder around it, anyone's files -----------------------

# out -> what the one line says; "." and ".." hold the bundle (the issue: both used to be deleted, exit 0)
FOLDER_CASES = {
    ".": "is not empty", "b": "b", "b/site": "inside the input b", "notes.txt": "is a file",
    "notes.txt/sub": "notes.txt is a file, not a folder", "mine": "is not empty (it holds photo.png)",
    "data": "is not empty",
}


@pytest.mark.parametrize("out", FOLDER_CASES)
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_web_refuses_and_changes_nothing(ws, capsys, out, overwrite):
    needle = "holds the input b, which replacing it would delete" if overwrite and out == "." else FOLDER_CASES[out]
    refused_unchanged(ws, capsys, ["export-web", "--model", "b", "--out", out, *(["--overwrite"] * overwrite)], needle)


@pytest.mark.parametrize("out", [*FOLDER_CASES, ".."])
@pytest.mark.parametrize("overwrite", [False, True])
def test_pack_refuses_and_changes_nothing(ws, capsys, out, overwrite):
    if out == "..":  # the bundle's parent, named from inside it
        os.chdir(ws / "b")
    refused_unchanged(ws, capsys, ["pack", ws / "b" if out == ".." else "b", "--out", out,
                                   *(["--overwrite"] * overwrite)])


def test_pack_replaces_only_its_own_earlier_output_and_only_with_overwrite(ws, capsys):
    ok(capsys, ["pack", "b", "--out", "packed"])
    assert json.loads((ws / "packed" / MARKER).read_text())["command"] == "ldm pack"
    refused_unchanged(ws, capsys, ["pack", "b", "--out", "packed"], "earlier output of ldm pack", "--overwrite")
    outside = {k: v for k, v in hashes(ws).items() if not k.startswith("packed")}
    ok(capsys, ["pack", "b", "--out", "packed", "--overwrite", "--dtype", "float32"])
    assert {k: v for k, v in hashes(ws).items() if not k.startswith("packed")} == outside
    (ws / "packed" / "readme-of-mine.txt").write_text("keep me")
    refused_unchanged(ws, capsys, ["pack", "b", "--out", "packed", "--overwrite"], "readme-of-mine.txt",
                      "which ldm pack did not write")
    # an export-web site is not pack's to replace, --overwrite or not
    (ws / "site").mkdir()
    (ws / "site" / "index.html").write_text("<html>")
    (ws / "site" / MARKER).write_text(json.dumps({"command": "ldm export-web", "entries": ["index.html"]}))
    refused_unchanged(ws, capsys, ["pack", "b", "--out", "site", "--overwrite"], "holds the output of ldm export-web")


def test_pack_overwrite_never_replaces_a_folder_holding_an_input(ws, capsys):
    (ws / "old").mkdir()
    shutil.copytree(ws / "b", ws / "old" / "unet", dirs_exist_ok=True)  # looks like an earlier bundle...
    shutil.copytree(ws / "data", ws / "old" / "vae" / "data")            # ...but holds the --vocab-from data
    (ws / "old" / "model_index.json").write_text("{}")
    refused_unchanged(ws, capsys, ["pack", "b", "--out", "old", "--overwrite", "--vocab-from", "old/vae/data"],
                      "holds the input old/vae/data")


# -- generate: file outputs -------------------------------------------------------------------------


def test_generate_output_checks_come_before_the_model_loads(ws, capsys):
    (ws / "adir.png").mkdir()
    refused_unchanged(ws, capsys, ["generate", "koala", "--model", "b", "--out", "adir.png"], "is a folder")
    refused_unchanged(ws, capsys, ["generate", "koala", "--model", "b", "--out", "mine/photo.png"],
                      "was not written by ldm generate")
    refused_unchanged(ws, capsys, ["generate", "koala", "--model", "b", "--out", "notes.txt/x.png"],
                      "notes.txt is a file, not a folder")
    (ws / "k-grid.png").write_bytes(b"someone's grid")
    refused_unchanged(ws, capsys, ["generate", "koala", "--model", "b", "--out", "k.png", "--num-images", "2"],
                      "k-grid.png exists")


def test_generate_replaces_its_own_pngs_makes_missing_folders_and_never_its_input(ws, capsys):
    args = ["generate", "koala", "--model", "b", "--steps", "1", "--quiet", "--num-images", "2", "--backend", "torch"]
    ok(capsys, [*args, "--out", "new/sub/k.png"])  # a missing parent is created
    assert all(written_by_ldm(ws / "new/sub" / n) for n in ("k-0.png", "k-1.png", "k-grid.png"))
    assert png_text_keys(ws / "new/sub/k-grid.png")["Software"] == "ldm-toolkit generate"
    ok(capsys, [*args, "--out", "new/sub/k.png"])  # our own earlier images are replaced
    refused_unchanged(ws, capsys, ["generate", "--from-png", "new/sub/k-0.png", "--out", "new/sub/k-0.png"],
                      "is the --from-png file")


# -- sweep ------------------------------------------------------------------------------------------


def test_sweep_refuses_others_folders_and_needs_overwrite_for_its_own(ws, capsys):
    args = ["sweep", "koala", "--model", "b", "--steps", "1", "--guidance", "1", "--seeds", "0", "--quiet",
            "--backend", "torch"]
    refused_unchanged(ws, capsys, [*args, "--out", "notes.txt"], "is a file")
    refused_unchanged(ws, capsys, [*args, "--out", "mine", "--overwrite"], "not an earlier output of ldm sweep")
    refused_unchanged(ws, capsys, [*args, "--out", "b/sweep"], "inside the input b")
    (ws / "sw").mkdir()  # an earlier sweep's folder (its files are its mark)
    for name in ("grid.png", "metrics.csv", "metrics.json", "metrics.png"):
        (ws / "sw" / name).write_bytes(b"old")
    refused_unchanged(ws, capsys, [*args, "--out", "sw"], "earlier output of ldm sweep", "--overwrite")
    ok(capsys, [*args, "--out", "sw", "--overwrite"])
    assert (ws / "sw" / "grid.png").read_bytes() != b"old"
    left = {p.name for p in (ws / "sw").iterdir()}
    assert left <= {*SWEEP_FILES, MARKER}, left  # nothing but the sweep's own files and its mark
    assert all((ws / "sw" / n).read_bytes() != b"old" for n in ("metrics.csv", "metrics.json", "metrics.png"))


# -- data sets --------------------------------------------------------------------------------------


def test_data_shapes_overwrite_replaces_only_an_earlier_data_set(ws, capsys):
    args = ["data", "shapes", "--size", "32", "--n", "4"]
    for out in ("mine", "."):
        refused_unchanged(ws, capsys, [*args, "--out", out, "--overwrite"], "is not empty", "choose a new or empty folder")
    refused_unchanged(ws, capsys, [*args, "--out", "notes.txt"], "is a file")
    ok(capsys, [*args, "--out", "set"])
    refused_unchanged(ws, capsys, [*args, "--out", "set"], "--overwrite")
    outside = {k: v for k, v in hashes(ws).items() if not k.startswith("set")}
    ok(capsys, [*args, "--out", "set", "--overwrite", "--seed", "1"])
    assert {k: v for k, v in hashes(ws).items() if not k.startswith("set")} == outside
    (ws / "set" / "captions-i-fixed.txt").write_text("...")
    refused_unchanged(ws, capsys, [*args, "--out", "set", "--overwrite"], "captions-i-fixed.txt")
    # a data set made before markers (metadata.jsonl and the builder's names only) is still recognised
    (ws / "set" / "captions-i-fixed.txt").unlink()
    (ws / "set" / MARKER).unlink()
    ok(capsys, [*args, "--out", "set", "--overwrite"])


# -- the trainers -----------------------------------------------------------------------------------


def train_args(command: str, ws: Path, out: str, *extra: str) -> list:
    """The shortest command line of each trainer that reaches the output check (nothing is loaded before)."""
    if command == "finetune":
        return ["finetune", "--model", "b", "--data", "data", f"train.output_dir={out}", *extra]
    head = [command, CONFIGS[command], "data.path=data", f"train.output_dir={out}"]
    if command == "train":
        head += ["encoders.autoencoder=b/vae", "encoders.text_encoder=b", f"cache.dir={ws / 'cache'}"]
    return [*head, *extra]


TRAINERS = ["train", "finetune", "train-vae", "train-clip"]


def finished_run(folder: Path, result: str = "bundle") -> Path:
    """A finished run whose checkpoints were pruned: config.yaml, logs/ and its result."""
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "log.txt").write_text("done\n")
    (folder / "config.yaml").write_text("train: {}\n")
    (folder / result).mkdir()
    (folder / result / "weights.safetensors").write_bytes(b"hours of training")
    return folder


@pytest.mark.parametrize("command", TRAINERS)
def test_trainers_refuse_bad_run_folders_before_loading_anything(command, ws, capsys):
    finished_run(ws / "run")
    cases = [
        ("notes.txt", (), "is a file"),
        ("notes.txt/run", (), "notes.txt is a file, not a folder"),
        ("mine", (), "it holds photo.png"),
        ("mine", ("--overwrite",), "it holds photo.png"),
        (".", (), "is not empty"),
        ("run", (), "holds an earlier run"),  # checkpoints pruned: used to be overwritten silently
        ("run", ("--resume", "latest", "--overwrite"), "give one of them"),
        ("data", (), "is the input data"),
        ("data", ("--overwrite",), "is the input data"),
    ]
    if command in ("train", "finetune"):
        cases.append(("b/run", (), "is inside the input"))  # the encoders / the bundle fine-tuned
    for out, extra, needle in cases:
        refused_unchanged(ws, capsys, train_args(command, ws, out, *extra), needle)
    (ws / "run" / "todo.txt").write_text("mine")
    refused_unchanged(ws, capsys, train_args(command, ws, "run", "--overwrite"), "todo.txt")


def test_a_real_run_is_refused_then_replaced_with_overwrite_leaving_the_rest(ws, capsys):
    from train_fakes import make_imagefolder

    make_imagefolder(ws / "shapes", n=12, size=16)
    args = ["train-vae", CONFIGS["train-vae"], "data.path=shapes", "model.resolution=16", "train.output_dir=run",
            "checkpoint.every=1", "checkpoint.keep_last=3", "--quiet"]
    ok(capsys, [*args, "train.max_steps=3"])
    assert sorted(p.name for p in (ws / "run" / "checkpoints").iterdir()) == [f"step-0000000{i}" for i in (1, 2, 3)]
    refused_unchanged(ws, capsys, [*args, "train.max_steps=1"], "already holds checkpoints of a run", "--overwrite")
    outside = {k: v for k, v in hashes(ws).items() if not k.startswith("run")}
    ok(capsys, [*args, "train.max_steps=1", "--overwrite"])
    assert sorted(p.name for p in (ws / "run" / "checkpoints").iterdir()) == ["step-00000001"]  # the old run is gone
    assert {k: v for k, v in hashes(ws).items() if not k.startswith("run")} == outside
    # eval-vae's PNG (default: beside vae/) and JSON: written, then replaced by the next evaluation
    evaluate = ["eval-vae", "--vae", "run/vae", "--data", "shapes", "--grid", "2", "--json", "run/m.json"]
    ok(capsys, evaluate)
    assert written_by_ldm(ws / "run" / "eval-vae.png") and "psnr" in json.loads((ws / "run" / "m.json").read_text())
    ok(capsys, evaluate)
    refused_unchanged(ws, capsys, [*evaluate[:-1], "notes.txt"], "--json notes.txt exists and was not written")


def test_overwrite_holding_an_input_is_refused(ws, capsys):
    finished_run(ws / "run")
    shutil.copytree(ws / "data", ws / "run" / "logs" / "data")
    refused_unchanged(ws, capsys, ["train-vae", CONFIGS["train-vae"], "data.path=run/logs/data",
                                   "train.output_dir=run", "--overwrite"], "holds the input run/logs/data")


def test_only_the_first_process_of_a_launch_checks_and_clears(ws, monkeypatch):
    from train.run.start import claim_run_folder

    finished_run(ws / "run")
    monkeypatch.setenv("RANK", "1")
    before = hashes(ws)
    claim_run_folder(ws / "run", None, command="ldm train", overwrite=True)
    assert hashes(ws) == before
    monkeypatch.setenv("RANK", "0")
    claim_run_folder(ws / "run", None, command="ldm train", overwrite=True)
    assert not (ws / "run").exists() and (ws / "b").is_dir()


# -- eval-vae ---------------------------------------------------------------------------------------


def test_eval_vae_outputs_are_checked_before_loading(ws, capsys):
    args = ["eval-vae", "--vae", "b/vae", "--data", "data"]
    refused_unchanged(ws, capsys, [*args, "--out", "mine"], "is a folder")
    refused_unchanged(ws, capsys, [*args, "--out", "mine/photo.png"], "was not written by ldm eval-vae")
    refused_unchanged(ws, capsys, [*args, "--json", "notes.txt"], "--json notes.txt exists and was not written")
    refused_unchanged(ws, capsys, [*args, "--json", "mine"], "is a folder")
    refused_unchanged(ws, capsys, [*args, "--out", "b/vae/grid.png"], "inside the input b/vae")


# -- unwritable places ------------------------------------------------------------------------------


def test_an_unwritable_place_is_found_before_the_work(ws, capsys, monkeypatch):
    """The guard tries a temporary file (os.access says yes to root); here that try fails with EROFS."""
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if ".ldm-write-test." in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    for argv in (["generate", "koala", "--model", "b", "--out", "x.png"], ["pack", "b", "--out", "p"],
                 ["export-web", "--model", "b", "--out", "site"],
                 ["data", "shapes", "--out", "s", "--n", "2"], train_args("train-vae", ws, "run")):
        refused_unchanged(ws, capsys, argv, "Read-only file system")


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="no user/mount namespaces here (unshare -rm)")
def test_a_read_only_file_system_is_one_line(ws):
    (ws / "ro").mkdir()
    before = hashes(ws)
    commands = [["generate", "koala", "--model", "b", "--out", "ro/x.png"], ["pack", "b", "--out", "ro/p"],
                ["data", "shapes", "--out", "ro/s", "--n", "2"], ["sweep", "k", "--model", "b", "--out", "ro/sw"],
                train_args("train-clip", ws, "ro/run")]
    script = ("import sys; from ldm.cli import main\n"
              f"for argv in {[[str(a) for a in argv] for argv in commands]!r}:\n"
              "    print('rc=%d' % main(argv), flush=True); sys.stderr.flush()\n")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {ws / 'ro'} {ws / 'ro'} && "
                           f"{sys.executable} -c \"$0\"", script], capture_output=True, text=True, cwd=ws, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = proc.stderr.strip().splitlines()
    assert proc.stdout.split() == ["rc=2"] * len(commands), proc.stderr
    assert len(lines) == len(commands) and "Traceback" not in proc.stderr
    for argv, line in zip(commands, lines):
        assert line.startswith(f"ldm {argv[0]}: error: ") and "(Read-only file system)" in line, line
    assert hashes(ws) == before


# -- the guard itself -------------------------------------------------------------------------------


def test_claim_output_dir_rules(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert claim_output_dir(out, command="ldm x") is False  # absent
    out.mkdir()
    assert claim_output_dir(out, command="ldm x") is False  # empty
    (out / "a.bin").write_bytes(b"")
    with pytest.raises(OutputError, match="not an earlier output of ldm x"):
        claim_output_dir(out, command="ldm x", overwrite=True)
    assert claim_output_dir(out, command="ldm x", overwrite=True, known=["a.bin"], signature=["a.bin"]) is True
    (out / MARKER).write_text(json.dumps({"command": "ldm y", "entries": ["a.bin"]}))
    with pytest.raises(OutputError, match="holds the output of ldm y, not of ldm x"):
        claim_output_dir(out, command="ldm x", overwrite=True, known=["a.bin"], signature=["a.bin"])
    with pytest.raises(OutputError, match="earlier output of ldm y; pass --overwrite"):
        claim_output_dir(out, command="ldm y")
    assert claim_output_dir(out, command="ldm y", overwrite=True) is True
    monkeypatch.chdir(out)
    with pytest.raises(OutputError, match="holds the current folder"):
        claim_output_dir(out, command="ldm y", overwrite=True)
    with pytest.raises(OutputError, match=r"train.output_dir=.* is the input"):
        claim_output_dir(out, command="ldm y", option="train.output_dir", inputs=[out])


def test_claim_output_file_rules(tmp_path):
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        claim_output_file(tmp_path, command="ldm x")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(OutputError, match="was not written by ldm x"):
        claim_output_file(tmp_path / "f.json", command="ldm x")
    assert claim_output_file(tmp_path / "f.json", command="ldm x", ours=lambda p: True) == tmp_path / "f.json"
    assert claim_output_file(tmp_path / "new" / "deeper" / "g.png", command="ldm x")  # parents made by the writer
