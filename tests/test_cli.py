"""The console script: help, version, and clean one-line errors for what is not built yet."""

import subprocess
import sys

from ldm.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    try:
        main(["--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


def test_unavailable_subcommand_is_a_one_line_error_exit_2():
    proc = subprocess.run([sys.executable, "-m", "ldm.cli", "finetune", "--model", "x"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "ldm finetune: error:" in proc.stderr and "Traceback" not in proc.stderr
