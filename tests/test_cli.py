"""The console script: help, version, and clean one-line errors for what is not built yet."""

import subprocess
import sys

import pytest

from ldm.cli import commands, main


def test_help_lists_every_subcommand(capsys):
    try:
        main(["--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in commands())


def test_import_ldm_never_imports_train():
    """The library stays apart from training: the CLI reads train's command table only when it parses."""
    code = "import ldm, ldm.cli, sys; print(sorted(m for m in sys.modules if m == 'train' or m.startswith('train.')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_help_imports_no_command_module():
    code = ("import sys\nfrom ldm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.endswith('_cli') or m.endswith('.cli') and m != 'ldm.cli'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_user_error_is_a_one_line_error_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldm.cli", "train", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "ldm train: error:" in proc.stderr and "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_overrides_after_an_option_are_kept(monkeypatch):
    from train.unet import cli as ldm_cli

    seen = []
    monkeypatch.setattr(ldm_cli, "run", lambda args: seen.append((args.overrides, args.resume)) or 0)
    assert main(["train", "c.yaml", "a=1", "--resume", "latest", "b=2"]) == 0
    assert seen == [(["a=1", "b=2"], "latest")]
    proc = subprocess.run([sys.executable, "-m", "ldm.cli", "train", "missing.yaml", "a=1", "--resume", "latest", "--bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


@pytest.mark.parametrize("name", ["default", "shapes"])
def test_finetune_takes_the_packaged_models_by_name_as_generate_does(name, tmp_path, monkeypatch):
    from ldm.bundle import PACKAGED_MODELS
    from train.unet import finetune

    seen = []
    monkeypatch.setattr(finetune, "finetune", lambda model, config, resume=None: seen.append(model) or _Done())
    # the run folder beside the data, not inside it (an output is never written into an input)
    assert main(["finetune", "--model", name, "--data", str(tmp_path / "data"), f"train.output_dir={tmp_path / 'run'}"]) == 0
    assert seen == [PACKAGED_MODELS[name]]


class _Done:
    bundle = None


@pytest.mark.parametrize("exc,code,words", [
    (ValueError("data.path is empty; give a folder"), 2, "data.path is empty"),
    (FileNotFoundError(2, "No such file or directory", "conf.yaml"), 2, "conf.yaml: No such file or directory"),
    (PermissionError(13, "Permission denied", "/out/x.png"), 2, "choose a folder you can write to"),
    (OSError(30, "Read-only file system", "/mnt/ro/run"), 2, "a read-only file system"),
    (IsADirectoryError(21, "Is a directory", "adir.png"), 2, "adir.png: Is a directory"),
    (OSError(28, "No space left on device", "/runs/x/checkpoints"), 3, "no space left on the device writing /runs/x"),
    (MemoryError(), 3, "out of memory"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_every_error_class_is_one_line_with_its_exit_code(exc, code, words, monkeypatch, capsys):
    from train.unet import cli as ldm_cli

    def run(args):
        raise exc

    monkeypatch.setattr(ldm_cli, "run", run)
    assert main(["train", "c.yaml"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldm train: error: ") and words in err, err


def test_a_bug_keeps_its_traceback(monkeypatch):
    from train.unet import cli as ldm_cli

    monkeypatch.setattr(ldm_cli, "run", lambda args: [][1])
    with pytest.raises(IndexError):
        main(["train", "c.yaml"])
