"""How nnU-Net finds the FIAS trainers: the shim folder, `nnunetv2_fias env` and `nnunetv2_fias doctor`."""
from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import nnunetv2_fias.trainers as trainers
from nnunetv2_fias import doctor
from nnunet_env import PACKAGE_SHIM_DIR

pytestmark = pytest.mark.timeout(300)
BIN = Path(sys.executable).parent


def test_shim_folder_holds_only_the_reexport_module():
    assert doctor.shim_folder() == PACKAGE_SHIM_DIR.resolve()
    modules = sorted(p.name for p in PACKAGE_SHIM_DIR.iterdir() if p.name != "__pycache__")
    assert modules == ["__init__.py", "nnunetv2_fias_trainers.py"]


def test_nnunet_resolves_every_trainer_to_the_installed_class(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join(["/nonexistent/folder", str(PACKAGE_SHIM_DIR)]))
    for cls in trainers.TRAINERS:
        found = recursive_find_trainer_class_by_name(cls.__name__)
        assert found is cls
        assert pickle.loads(pickle.dumps(found)) is cls
    assert "nnunetv2_fias_trainers" not in sys.modules  # nnU-Net cleans up what it imported from the folder


@pytest.mark.parametrize("current", [None, "/opt/my_trainers", f"/opt/a{os.pathsep}/opt/b"])
def test_env_appends_the_shim_folder_once(monkeypatch, capsys, current):
    if current is None:
        monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    else:
        monkeypatch.setenv("nnUNet_extTrainer", current)
    assert doctor.main_env([]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("export nnUNet_extTrainer=")
    value = shlex.split(line.split("=", 1)[1])[0]
    expected = ([] if current is None else current.split(os.pathsep)) + [str(PACKAGE_SHIM_DIR.resolve())]
    assert value.split(os.pathsep) == expected
    # Running it again with the result in place changes nothing.
    monkeypatch.setenv("nnUNet_extTrainer", value)
    assert doctor.main_env([]) == 0
    assert shlex.split(capsys.readouterr().out.strip().split("=", 1)[1])[0] == value


def _nnunet_dirs(tmp_path: Path) -> dict[str, str]:
    env = {}
    for var in doctor.NNUNET_PATH_VARS:
        (tmp_path / var).mkdir()
        env[var] = str(tmp_path / var)
    return env


def test_doctor_passes_on_a_complete_setup_and_fails_on_each_gap(monkeypatch, tmp_path, capsys):
    for k, v in _nnunet_dirs(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_extTrainer", str(PACKAGE_SHIM_DIR))
    monkeypatch.setenv("nnUNet_compile", "f")
    assert doctor.main_doctor([]) == 0
    capsys.readouterr()

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "missing"))
    assert doctor.main_doctor([]) == 1
    assert "mkdir -p" in capsys.readouterr().out
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))

    monkeypatch.delenv("nnUNet_extTrainer")
    assert doctor.main_doctor([]) == 1
    assert "nnunetv2_fias env" in capsys.readouterr().out


def test_doctor_reports_a_trainer_shadowed_by_another_folder(monkeypatch, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "stale_fias_copy.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class FIASTrainer(nnUNetTrainer):\n    pass\n")
    for k, v in _nnunet_dirs(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(other), str(PACKAGE_SHIM_DIR)]))
    assert doctor.main_doctor([]) == 1
    assert "stale_fias_copy" in capsys.readouterr().out


def test_version_parsing():
    assert doctor._version_tuple("2.8.1") == (2, 8, 1)
    assert doctor._version_tuple("2.10.0rc1") == (2, 10, 0)
    assert doctor._version_tuple("2.7") < doctor.MIN_NNUNET <= doctor._version_tuple("2.8.0")


def test_readme_recipe_eval_env_then_doctor(tmp_path):
    """The README's shell recipe, verbatim: eval "$(nnunetv2_fias env)" makes nnU-Net find FIASTrainer."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update(_nnunet_dirs(tmp_path), nnUNet_compile="f", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    proc = subprocess.run(["bash", "-c", 'eval "$(nnunetv2_fias env)" && nnunetv2_fias doctor'], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
