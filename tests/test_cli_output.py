"""What the ``fidbench`` command prints: whole help texts, and no traceback when its reader goes away."""

import subprocess
import sys

import pytest
from reports import record, sample, write

from fidbench import cli

COMMANDS = ("methods", "report", "import-runs", "compare", "merge", "floors", "plot")


def test_help_says_what_the_command_does_in_whole_sentences(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ("The fidbench command: list the registered methods; print, compare, merge and plot saved reports; "
            "propose floors from a measured run; convert the original scripts' run configs; train Medusa heads.") in out
    assert 'Fidelity runs themselves are pytest: pytest tests/methods -k "llama and topk".' in out
    for command in COMMANDS:
        assert command in out
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0 and f"usage: fidbench {command}" in capsys.readouterr().out


def piped(*args, lines: int = 1) -> tuple[int, str]:
    """Run ``fidbench ARGS | head -LINES``: read that much, close the pipe, return the exit status and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "fidbench.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(lines):
        proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=60), err


@pytest.mark.slow  # two fresh interpreters importing torch
def test_a_closed_pipe_ends_the_output_not_the_exit_status(tmp_path):
    many = [record("m", f"v{i}", [sample("code", 0, 0.5, 0.2)]) for i in range(600)]
    base = write(tmp_path / "base.json", many)  # a table far larger than a pipe's buffer (64 KiB)
    assert piped("report", str(base)) == (0, "")
    worse = [record("m", f"v{i}", [sample("code", 0, 0.4, 0.2)]) for i in range(600)]
    status, err = piped("compare", str(base), str(write(tmp_path / "worse.json", worse)), "--max-drop", "acc1=0.01")
    assert (status, err) == (1, "")  # the gate's verdict survives the reader leaving


def test_a_crash_is_exit_status_3_never_the_gate_failing(tmp_path, capsys, monkeypatch):
    """compare's 1 means "the gate failed": a bug must not read as a regression (nor as an input error, 2)."""
    base = write(tmp_path / "base.json", [])
    monkeypatch.setattr(cli.compare, "compare", lambda *a, **k: {}["boom"])
    assert cli.main(["compare", str(base), str(base)]) == 3
    err = capsys.readouterr().err
    assert "KeyError: 'boom'" in err and "fidbench: internal error (exit status 3)" in err
