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
