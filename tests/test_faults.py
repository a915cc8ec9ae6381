"""Faults during training and silent wrong results (issue 15, classes 7 and 8), for every trainer:

- a full disk while writing a checkpoint or the bundle: one ``DiskFull`` line (exit 3 at the command
  line), the previous checkpoint intact, nothing half-written left;
- a damaged newest checkpoint on ``--resume latest``: skipped with a warning naming it; a damaged
  one named explicitly, or none whole: one line, exit 2, no deserialization traceback;
- ``optim.lr=...`` with ``--resume``: applied (and said so), not silently dropped;
- an unreadable random-state entry: said so;
- temporaries of checkpoints killed mid-write (ldm_io's names): removed at the next start;
- a checkpoint only from sane weights;
- the ONNX backend after a bundle's vae/ is replaced: the decoder graph is exported again.
"""

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

import ldm.cli
import ldm_io
from ldm.cli import main
from train.run import checkpoint as ckpt
from train.run.log import read_csv
from train.run.resume import OptimizerSettings
from train_fakes import make_imagefolder, one_thread, reset_accelerate  # noqa: F401  (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parent.parent
TRAINERS = ("train", "train-vae", "train-clip")
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own words


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny bundle (its vae/ and text encoder are the U-Net trainer's encoders) and a captioned image folder."""
    from ldm import testing

    root = tmp_path_factory.mktemp("env")
    return {"bundle": testing.build_bundle(root / "b"), "data": make_imagefolder(root / "data"), "root": root}


def args(command: str, env: dict, out: Path, *overrides: str) -> list[str]:
    """The command line of a tiny run of ``command`` into ``out``: checkpoints every 2 steps, all kept."""
    common = [f"data.path={env['data']}", f"train.output_dir={out}", "checkpoint.every=2", "checkpoint.keep_last=9"]
    if command == "train":
        return ["train", str(ROOT / "configs/ldm/tiny.yaml"), *common, f"encoders.autoencoder={env['bundle'] / 'vae'}",
                f"encoders.text_encoder={env['bundle']}", f"cache.dir={env['root'] / 'cache'}", "validation.prompts=[]",
                *overrides]
    if command == "train-vae":
        return ["train-vae", str(ROOT / "configs/vae/tiny.yaml"), *common, "model.resolution=32", "--quiet", *overrides]
    return ["train-clip", str(ROOT / "configs/clip/tiny.yaml"), *common, "train.batch_size=8", "train.progress=false",
            *overrides]


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``ldm`` in this process."""
    reset_accelerate()
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def error_line(err: str, command: str) -> str:
    """The one error line of stderr (progress bars and warnings aside), checked for its form."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"ldm {command}:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ldm {command}: error: ")
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and the hash of its bytes."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def disk_full_after(monkeypatch, files: int, where: str = "") -> None:
    """safetensors' writer fills the disk from its ``files``-th file on (among files whose path holds
    ``where``): half a file written, then safetensors' own I/O error, as on a full file system."""
    real, count = safetensors.torch.save_file, [0]

    def save_file(tensors, filename, *a, **kw):
        if where in str(filename):
            count[0] += 1
            if count[0] >= files:
                Path(filename).write_bytes(b"\0" * 100)
                raise SafetensorError(FULL)
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def disk_full(capsys, argv: list[str]) -> str:
    """What ``ldm`` says of a full disk: one line and exit 3 once the command line sorts machine faults
    (``ldm.cli.EXIT_CODES``), before that the ``DiskFull`` it raises."""
    if hasattr(ldm.cli, "EXIT_CODES"):
        code, err = run(capsys, argv)
        assert code == 3
        return error_line(err, argv[0])
    reset_accelerate()
    with pytest.raises(ldm_io.DiskFull) as info:
        main(argv)
    return str(info.value)


# -- 7. a full disk ---------------------------------------------------------------------------------


def test_atomic_writers_raise_a_full_disk_as_disk_full(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "a.txt").write_text("old")
    with pytest.raises(ldm_io.DiskFull) as info, ldm_io.atomic_directory(tmp_path / "kept"):
        raise SafetensorError(FULL)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert info.value.filename == str(tmp_path / "kept")
    assert str(info.value) == (f"no space left on the device while writing {tmp_path / 'kept'}; nothing under that "
                               "name was changed or left half-written")
    with pytest.raises(ldm_io.DiskFull, match="quota"), ldm_io.atomic_path(tmp_path / "f.bin"):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(ldm_io.DiskFull) as info, ldm_io.atomic_directory(tmp_path / "outer") as tmp:  # a nested write
        with ldm_io.atomic_path(tmp / "inner.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path / "outer")  # the name the user knows, not a temporary one
    with pytest.raises(OSError) as info, ldm_io.atomic_path(tmp_path / "g.bin"):
        raise SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)")
    assert info.value.errno == errno.EIO and not isinstance(info.value, ldm_io.DiskFull)
    with pytest.raises(SafetensorError, match="not contiguous"), ldm_io.atomic_path(tmp_path / "h.bin"):
        raise SafetensorError("tensor is not contiguous")  # not an I/O error: left as it is
    with pytest.raises(PermissionError), ldm_io.atomic_path(tmp_path / "i.bin"):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert (tmp_path / "kept" / "a.txt").read_text() == "old"


def test_a_full_disk_in_a_run_names_the_checkpoint_to_continue_from(tmp_path):
    with pytest.raises(ldm_io.DiskFull) as info, ckpt.resumable_writes(tmp_path / "checkpoints"):
        with ldm_io.atomic_directory(tmp_path / "bundle"):
            raise SafetensorError(FULL)
    assert str(info.value).endswith("; no checkpoint was written yet: free some space and start again")
    newest = ckpt.save_checkpoint(tmp_path / "checkpoints", 2, torch.nn.Linear(2, 2), None, {})
    with pytest.raises(ldm_io.DiskFull) as info, ckpt.resumable_writes(tmp_path / "checkpoints"):
        with open(os.devnull, "w"):  # a plain write (a run log's) that fills the disk: no file name in the error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(info.value) == (f"no space left on the device while writing {tmp_path}; the newest checkpoint {newest} "
                               "is complete: free some space, then continue with --resume latest")


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model, opt = torch.nn.Linear(3, 2), None
    first = ckpt.save_checkpoint(tmp_path, 2, model, opt, {})
    before = tree(tmp_path)
    disk_full_after(monkeypatch, 1)
    with pytest.raises(ldm_io.DiskFull) as info:
        ckpt.save_checkpoint(tmp_path, 4, model, opt, {})
    assert str(info.value) == (f"no space left on the device while writing {tmp_path / 'step-00000004'}; nothing "
                               f"under that name was changed or left half-written; the newest checkpoint {first} is "
                               "complete: free some space, then continue with --resume latest")
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]


@pytest.mark.parametrize("command", TRAINERS)
def test_a_full_disk_mid_run_is_one_line_and_the_last_checkpoint_resumes(command, env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run(capsys, args(command, env, out, "train.max_steps=2"))[0] == 0
    root = out / "checkpoints"
    before = tree(root)
    disk_full_after(monkeypatch, 2, where=".step-00000004.")  # the second file of the step-4 checkpoint
    assert f"writing {root / 'step-00000004'}" in disk_full(capsys, args(command, env, out, "train.max_steps=6",
                                                                          "--resume", "latest"))
    assert tree(root) == before  # step-2 as it was, nothing half-written beside it
    monkeypatch.undo()
    code, err = run(capsys, args(command, env, out, "train.max_steps=6", "--resume", "latest"))
    assert code == 0, err
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000004", "step-00000006"]


def test_a_full_disk_while_writing_the_bundle_names_the_checkpoint_to_finish_from(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    disk_full_after(monkeypatch, 1, where=".bundle.")
    assert f"writing {out / 'bundle'}" in disk_full(capsys, args("train", env, out, "train.max_steps=2"))
    assert not (out / "bundle").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert run(capsys, args("train", env, out, "train.max_steps=2", "--resume", "latest"))[0] == 0
    assert (out / "bundle" / "model_index.json").is_file()


# -- 7. a damaged checkpoint on --resume ------------------------------------------------------------


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("command", TRAINERS)
def test_resume_latest_skips_a_damaged_newest_checkpoint(command, env, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, args(command, env, out, "train.max_steps=4"))[0] == 0
    root = out / "checkpoints"
    cut_in_half(root / "step-00000004" / "model.safetensors")
    code, err = run(capsys, args(command, env, out, "train.max_steps=6", "--resume", "latest"))
    assert code == 0 and "Traceback" not in err
    assert (f"warning: skipping the damaged checkpoint {root / 'step-00000004'} (model.safetensors is cut short "
            in err and "resuming from step-00000002" in err)
    assert f"resumed from {root / 'step-00000002'} at step 2" in (out / "logs" / "log.txt").read_text()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000004", "step-00000006"]
    assert all(ckpt.checkpoint_problem(p) is None for p in ckpt.list_checkpoints(root))  # step-4 written anew


@pytest.mark.parametrize("command", TRAINERS)
def test_no_whole_checkpoint_or_a_damaged_one_named_is_one_line(command, env, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, args(command, env, out, "train.max_steps=4"))[0] == 0
    root = out / "checkpoints"
    (root / "step-00000004" / "state.json").write_text('{"step": 4, "ep')
    cut_in_half(root / "step-00000002" / "optimizer.safetensors")
    before = tree(out)
    code, err = run(capsys, args(command, env, out, "train.max_steps=6", "--resume", "latest"))
    line = error_line(err, command)
    assert code == 2 and f"--resume latest: no whole checkpoint in {root}: step-00000004: state.json is not valid JSON" in line
    assert "step-00000002: optimizer.safetensors is cut short" in line
    code, err = run(capsys, args(command, env, out, "train.max_steps=6", "--resume", str(root / "step-00000002")))
    line = error_line(err, command)
    assert code == 2 and "the checkpoint is damaged: optimizer.safetensors is cut short" in line
    assert tree(out) == before


def test_checkpoint_problems_are_found_from_the_headers(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, torch.nn.Linear(4, 4), None, {})
    assert ckpt.checkpoint_problem(path) is None
    model = path / "model.safetensors"
    whole = model.read_bytes()
    model.write_bytes(whole + b"x")
    assert ckpt.checkpoint_problem(path) == "model.safetensors is 1 bytes longer than its header says"
    model.write_bytes(whole[:5])
    assert ckpt.checkpoint_problem(path) == "model.safetensors is cut short (5 bytes, less than its header)"
    model.write_bytes(whole[:8] + b"{" * (len(whole) - 8))
    assert ckpt.checkpoint_problem(path) == "model.safetensors has an unreadable header"
    model.write_bytes(whole)
    (path / "state.json").write_text("[1, 2]")
    assert ckpt.checkpoint_problem(path) == "state.json holds no step number"
    with pytest.raises(ValueError, match=r"model.safetensors is damaged \(.*\); resume from another checkpoint"):
        model.write_bytes(whole[:-3])
        ckpt.load_checkpoint(path, torch.nn.Linear(4, 4), None)


# -- 8b. optimizer settings on --resume -------------------------------------------------------------


@pytest.mark.parametrize("command", TRAINERS)
def test_optim_lr_given_on_resume_applies_and_is_said(command, env, tmp_path, capsys):
    out = tmp_path / "run"
    constant = ["optim.lr_scheduler=constant", "optim.lr_min=0", "train.log_every=1"]
    assert run(capsys, args(command, env, out, "train.max_steps=2", "optim.lr=1e-3", *constant))[0] == 0
    code, err = run(capsys, args(command, env, out, "train.max_steps=4", "optim.lr=1e-4", *constant, "--resume", "latest"))
    assert code == 0
    said = (f"warning: optim.lr is 0.001 in {out / 'checkpoints' / 'step-00000002'} and 0.0001 in this run's config: "
            "the config's value applies from the resumed step on")
    assert said in err and said in (out / "logs" / "log.txt").read_text()
    rows = read_csv(out / "logs" / "train.csv")
    assert {int(r["step"]): float(r["lr"]) for r in rows if r.get("lr")} == {2: 1e-3, 4: 1e-4} | (
        {1: 1e-3, 3: 1e-4} if len(rows) == 4 else {})
    state = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["lr_scheduler"]["base_lrs"][0] == 1e-4 and state["lr_scheduler"]["_last_lr"][0] == 1e-4


def test_optimizer_settings_put_the_config_back_and_change_nothing_else():
    model = torch.nn.Linear(3, 2)

    def build(lr, wd):
        from train.run.lr import build_lr_scheduler, build_optimizer
        from train.run.sections import OptimConfig

        optim = OptimConfig(lr=lr, weight_decay=wd, warmup_steps=4, lr_scheduler="linear")
        opt = build_optimizer(model.parameters(), optim)
        return opt, build_lr_scheduler(opt, optim, 10)

    opt, sched = build(1e-3, 0.01)
    for _ in range(6):
        model(torch.randn(2, 3)).sum().backward()
        opt.step(), sched.step()
    saved_opt, saved_sched = opt.state_dict(), json.loads(json.dumps(sched.state_dict()))
    same_opt, same_sched = build(1e-3, 0.01)
    settings = OptimizerSettings(same_opt, same_sched)
    same_opt.load_state_dict(saved_opt), same_sched.load_state_dict(saved_sched)
    assert settings.reapply() == []
    assert same_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and same_sched.get_last_lr() == sched.get_last_lr()
    new_opt, new_sched = build(2e-3, 0.0)
    settings = OptimizerSettings(new_opt, new_sched)
    new_opt.load_state_dict(saved_opt), new_sched.load_state_dict(saved_sched)
    assert [line.split(" is ")[0] for line in settings.reapply("ckpt")] == ["optim.lr", "optim.weight_decay"]
    assert new_opt.param_groups[0]["weight_decay"] == 0.0
    assert new_opt.param_groups[0]["lr"] == pytest.approx(2 * opt.param_groups[0]["lr"])  # step 6 of 10, linear decay
    assert torch.equal(new_opt.state_dict()["state"][0]["exp_avg"], saved_opt["state"][0]["exp_avg"])  # moments kept


# -- 8c. random states ------------------------------------------------------------------------------


def test_unreadable_random_states_are_reported():
    g = torch.Generator().manual_seed(1)
    saved = json.loads(json.dumps(ckpt.rng_state({"g": g})))
    assert ckpt.set_rng_state(saved, {"g": g}) == []
    bad = dict(saved, torch="AAAA", numpy=[1], generators={"g": "AAAA"})
    bad.pop("python")
    problems = ckpt.set_rng_state(bad, {"g": g})
    assert [p.split(" (")[0] for p in problems] == ["python", "numpy", "torch", "generator 'g'"]
    assert problems[0] == "python (missing)"
    if not torch.cuda.is_available():
        assert ckpt.set_rng_state(dict(saved, cuda=["AAAA"]), {"g": g}) == [
            "cuda (the checkpoint was written on a GPU; this run has none)"]
    with pytest.raises(ValueError, match="lacks the state of generator 'other'"):
        ckpt.set_rng_state(saved, {"other": g})
    assert "no longer exactly as an uninterrupted run would" in ckpt.rng_warning("ckpt", problems)


@pytest.mark.parametrize("command", TRAINERS)
def test_resuming_from_an_unreadable_random_state_says_so(command, env, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, args(command, env, out, "train.max_steps=2"))[0] == 0
    path = out / "checkpoints" / "step-00000002"
    state = json.loads((path / "state.json").read_text())
    state["rng"][0]["torch"] = "AAAA"
    (path / "state.json").write_text(json.dumps(state))
    code, err = run(capsys, args(command, env, out, "train.max_steps=4", "--resume", "latest"))
    assert code == 0
    said = f"warning: checkpoint {path}: could not restore the random state of torch (RuntimeError: "
    assert said in err and said in (out / "logs" / "log.txt").read_text()


# -- 8d. what a killed checkpoint write leaves ------------------------------------------------------


@pytest.mark.parametrize("command", TRAINERS)
def test_temporaries_of_killed_checkpoint_writes_are_removed_at_the_next_start(command, env, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, args(command, env, out, "train.max_steps=2"))[0] == 0
    root = out / "checkpoints"
    # the names ldm_io gives: a write killed mid-way, a replaced folder not yet deleted; and a rotation's trash
    left = [ldm_io._sibling(root / "step-00000004", ".tmp", os.mkdir), ldm_io._sibling(root / "step-00000002", ".old", os.mkdir),
            root / ".step-00000001.trash"]
    left[2].mkdir()
    for folder in left:
        (folder / "model.safetensors").write_bytes(b"half")
    kept = [root / ".step-notes", root / "notes.tmp"]  # not ours: left alone
    for f in kept:
        f.write_text("mine")
    assert run(capsys, args(command, env, out, "train.max_steps=4", "--resume", "latest"))[0] == 0
    assert sorted(p.name for p in root.iterdir()) == sorted(["step-00000002", "step-00000004"] + [f.name for f in kept])


# -- 8e. checkpoints only from sane weights ---------------------------------------------------------


def test_weights_that_are_not_sane_are_not_checkpointed(tmp_path, capsys):
    model = torch.nn.Linear(3, 2)
    assert ckpt.save_checkpoint(tmp_path, 1, model, None, {}) is not None
    for value in (1e29, float("nan"), float("inf")):
        with torch.no_grad():
            model.weight[0, 0] = value
        assert ckpt.save_checkpoint(tmp_path, 2, model, None, {}) is None
        assert "warning: checkpoint step-00000002 not written: weight holds" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    assert ckpt.weights_problem({"w": torch.full((2,), 1e5), "n": torch.tensor([10**9])}) is None  # ints are counts


def blow_up_after_step(monkeypatch, command: str, step: int) -> None:
    """From optimizer step ``step`` + 1 on, every trainable weight is scaled by 1e10 (a divergence whose loss
    is still finite for a while)."""
    from train.clip.trainer import ClipTrainer
    from train.unet.trainer import LDMTrainer
    from train.vae.trainer import VAETrainer

    cls = {"train": LDMTrainer, "train-vae": VAETrainer, "train-clip": ClipTrainer}[command]
    real = cls._optimizer_step

    def optimizer_step(self, pos, *rest):
        result = real(self, pos, *rest)
        if pos["step"] >= step:  # pos["step"] counts the steps done before this one
            with torch.no_grad():
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        p.mul_(1e10)
        return result

    monkeypatch.setattr(cls, "_optimizer_step", optimizer_step)


@pytest.mark.parametrize("command", TRAINERS)
def test_a_diverging_run_keeps_only_checkpoints_of_sane_weights(command, env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    blow_up_after_step(monkeypatch, command, 2)
    stop = ["train.max_consecutive_nonfinite=2"] if command == "train" else []
    code, err = run(capsys, args(command, env, out, "train.max_steps=6", "checkpoint.every=1", *stop))
    root = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000001", "step-00000002"]
    assert "warning: checkpoint step-00000003 not written: " in err and f"stays {root / 'step-00000002'}" in err
    if command == "train":  # the U-Net trainer stops on non-finite losses and names the last good checkpoint
        assert code == 1 and f"The last good checkpoint is {root / 'step-00000002'}" in err
    assert "warning: checkpoint step-00000003 not written" in (out / "logs" / "log.txt").read_text()


# -- 8a. ONNX graphs follow the weights they were made from -----------------------------------------


def test_onnx_decoder_graph_follows_replaced_vae_weights(tmp_path):
    from ldm import testing
    from ldm.pipeline import Text2ImagePipeline
    from vae import load_autoencoder

    bundle = testing.build_bundle(tmp_path / "b")
    kwargs = dict(prompt="a koala", steps=2, seed=0, output="tensor")
    Text2ImagePipeline.from_pretrained(bundle, backend="onnx")(**kwargs)  # graphs exported and cached
    unet_graph = (bundle / "onnx" / "unet-8x8.onnx").stat().st_mtime_ns
    ae = load_autoencoder(bundle / "vae")
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    ae.save_pretrained(bundle / "vae")
    got = Text2ImagePipeline.from_pretrained(bundle, backend="onnx")(**kwargs)
    expected = Text2ImagePipeline.from_pretrained(bundle, backend="torch")(**kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (bundle / "onnx" / "unet-8x8.onnx").stat().st_mtime_ns == unet_graph  # the U-Net's graph still fits


def test_a_killed_final_write_leaves_nothing_behind_at_the_next_start(tmp_path):
    """A process killed while renaming its bundle into place leaves ldm_io's temporary folder in the run
    folder; the next start (a resume) removes it, and keeps everything else."""
    from train.run.start import remove_leftovers

    run = tmp_path / "run"
    (run / ".bundle.0a1b2c3d.tmp" / "unet").mkdir(parents=True)
    (run / ".config.yaml.deadbeef.tmp").write_text("half")
    (run / "checkpoints").mkdir()
    (run / "config.yaml").write_text("train: {}")
    (run / ".notes.0a1b2c3d.tmp").write_text("not ours")  # not a product of a run: left alone
    remove_leftovers(run)
    assert sorted(p.name for p in run.iterdir()) == [".notes.0a1b2c3d.tmp", "checkpoints", "config.yaml"]
