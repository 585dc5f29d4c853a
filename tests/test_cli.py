"""The `nnunetv2_fias` console command: its command table, lazy imports and exit status (0 / 1 user error / 2 usage)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_fias import cli

pytestmark = pytest.mark.timeout(300)
CONSOLE = Path(sys.executable).parent / "nnunetv2_fias"


def _run(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE), *argv], capture_output=True, text=True, env=dict(os.environ),
                          timeout=timeout)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_names_a_callable_entry(name):
    command = cli.COMMANDS[name]
    assert callable(getattr(importlib.import_module(command.module), command.function))
    assert command.help


def test_dispatch_imports_only_the_asked_module():
    code = ("import sys\nfrom nnunetv2_fias.cli import main\nstatus = main(['env'])\n"
            "print(status, ' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    status, modules = proc.stdout.splitlines()[-1].split(" ", 1)
    assert status == "0" and "nnunetv2_fias.doctor" in modules.split()
    heavy = ("torch", "nnunetv2", "nnunetv2_fias.evaluation", "nnunetv2_fias.benchmark", "nnunetv2_fias.demo",
             "nnunetv2_fias.dataset_conversion", "nnunetv2_fias.architectures", "nnunetv2_fias.trainers")
    assert not [m for m in modules.split() if any(m == h or m.startswith(h + ".") for h in heavy)]


def test_env_and_doctor_dispatch_to_their_functions(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert cli.main(["env"]) == 0
    assert capsys.readouterr().out.startswith("export nnUNet_extTrainer=")
    assert cli.main(["doctor", "-h"]) == 0
    assert "usage: nnunetv2_fias doctor" in capsys.readouterr().out


@pytest.mark.parametrize("argv, status", [
    ([], 2), (["no-such-command"], 2), (["evaluate"], 2), (["doctor", "--no-such-option"], 2), (["env", "x"], 2),
    (["-h"], 0), (["--help"], 0), (["env", "-h"], 0),
])
def test_exit_status_in_process(capsys, argv, status):
    assert cli.main(argv) == status
    out, err = capsys.readouterr()
    if status == 2:
        assert not out and err.rstrip().splitlines()[-1].startswith("nnunetv2_fias")
    if argv in ([], ["no-such-command"]):
        assert "usage: nnunetv2_fias <command>" in err


def test_status_of_sys_exit_codes(capsys):
    assert cli._status(None) == 0 and cli._status(0) == 0 and cli._status(2) == 2
    assert cli._status("message") == 1 and capsys.readouterr().err == "message\n"


def test_console_user_error_is_one_stderr_line_and_exit_1():
    proc = _run("benchmark", "--patch", "0", "0")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["nnunetv2_fias benchmark: error: --patch 0 0: sizes must be >= 1"]
    assert "Warning" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["no-such-command"], "unknown command 'no-such-command'"),
    ([], "no command given"),
    (["evaluate"], "the following arguments are required"),
])
def test_console_usage_errors_exit_2(argv, message):
    proc = _run(*argv)
    assert proc.returncode == 2
    assert message in proc.stderr.splitlines()[-1]
    assert proc.stdout == ""


def test_module_entry_point_matches_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "nnunetv2_fias.cli", "no-such-command"], capture_output=True,
                          text=True, env=dict(os.environ), timeout=120)
    assert proc.returncode == 2 and "unknown command" in proc.stderr
