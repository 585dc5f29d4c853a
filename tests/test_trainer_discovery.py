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


@pytest.mark.parametrize("source, error", [("import not_a_module_xyz\n", "not_a_module_xyz"),
                                           ("def broken(:\n", "SyntaxError")])
def test_doctor_names_the_module_of_another_folder_that_breaks_every_lookup(monkeypatch, tmp_path, capsys, source,
                                                                           error):
    other = tmp_path / "other"
    other.mkdir()
    (other / "a_fine_module.py").write_text("VALUE = 1\n")
    (other / "broken.py").write_text(source)
    for k, v in _nnunet_dirs(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(other), str(PACKAGE_SHIM_DIR)]))
    assert doctor.main_doctor([]) == 1
    out = capsys.readouterr().out
    # One report, not one per trainer, naming the folder and the file, and what nnU-Net's search does with it.
    assert out.count(error) == 1
    assert f"nnUNet_extTrainer folder {other}: importing broken.py fails" in out
    assert "EVERY trainer not built into nnU-Net" in out
    assert f"fix: fix or remove {other / 'broken.py'}, or remove {other} from nnUNet_extTrainer" in out
    # That is what nnU-Net really does: the folder ahead of the FIAS shim breaks FIASTrainer's lookup.
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with pytest.raises(ModuleNotFoundError if error == "not_a_module_xyz" else SyntaxError):
        recursive_find_trainer_class_by_name("FIASTrainer")
    capsys.readouterr()

    # Behind the shim the FIAS trainers still resolve: a warning naming the file, not a failure.
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(PACKAGE_SHIM_DIR), str(other)]))
    monkeypatch.setenv("nnUNet_compile", "f")
    assert doctor.main_doctor([]) == 0
    out = capsys.readouterr().out
    assert out.count(error) == 1 and f"fix or remove {other / 'broken.py'}" in out
    assert "nnU-Net resolves FIASTrainer" in out
    assert "broken" not in sys.modules and "a_fine_module" not in sys.modules


def test_find_broken_module_names_the_imported_file_and_where_the_error_is_raised(tmp_path):
    (tmp_path / "a_trainers.py").write_text("import zz_helper\n")
    (tmp_path / "zz_helper.py").write_text("VALUE = 1\nimport not_a_module_xyz\n")
    broken = doctor.find_broken_module(str(tmp_path))
    assert broken.file == (tmp_path / "a_trainers.py").resolve()
    assert broken.origin == f"{(tmp_path / 'zz_helper.py').resolve()}, line 2"
    assert broken.error == "ModuleNotFoundError: No module named 'not_a_module_xyz'"
    (tmp_path / "zz_helper.py").write_text("VALUE = 1\n")
    assert doctor.find_broken_module(str(tmp_path)) is None


@pytest.mark.parametrize("device, value, training, prediction", [
    ("cuda", None, True, False),    # nnU-Net's default: training compiles on CUDA, prediction does not
    ("cuda", "t", True, True), ("cuda", "True", True, True), ("cuda", "1", True, True),
    ("cuda", "f", False, False), ("cuda", "no", False, False),
    ("cpu", None, False, False),    # training never compiles on the CPU or MPS ...
    ("cpu", "t", False, True),      # ... but the predictor does whenever the variable is set to true
    ("mps", "true", False, True), ("mps", None, False, False),
])
def test_compile_conditions_match_nnunet(device, value, training, prediction):
    assert doctor.nnunet_compiles(device, value, windows=False) == (training, prediction)
    assert doctor.nnunet_compiles(device, value, windows=True) == (False, prediction)


def test_compile_conditions_match_nnunets_trainer(monkeypatch):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = nnUNetTrainer.__new__(nnUNetTrainer)  # _do_i_compile reads only the device and the variable
    trainer.print_to_log_file = lambda *args, **kwargs: None
    for device in ("cpu", "cuda"):
        trainer.device = torch.device(device)
        for value in (None, "t", "f"):
            if value is None:
                monkeypatch.delenv("nnUNet_compile", raising=False)
            else:
                monkeypatch.setenv("nnUNet_compile", value)
            assert trainer._do_i_compile() == doctor.nnunet_compiles(device, value)[0], (device, value)


@pytest.mark.parametrize("value, warns", [(None, False), ("f", False), ("t", True), ("TRUE", True)])
def test_doctor_warns_about_compiling_on_the_cpu_only_when_nnunet_would(monkeypatch, capsys, value, warns):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # its own warning is tested below
    if value is None:
        monkeypatch.delenv("nnUNet_compile", raising=False)
    else:
        monkeypatch.setenv("nnUNet_compile", value)
    rep = doctor._Report()
    doctor._check_device(rep)
    out = capsys.readouterr().out
    assert rep.warnings == 1 + warns  # the first: no CUDA device
    assert ("makes nnU-Net's predictor compile" in out) == warns
    assert "(the default)" not in out


def test_doctor_fix_for_missing_nnunet_folders_creates_them(monkeypatch, tmp_path, capsys):
    for k, v in _nnunet_dirs(tmp_path).items():
        monkeypatch.setenv(k, v)
    missing = {var: tmp_path / "not yet" / var for var in ("nnUNet_raw", "nnUNet_preprocessed")}
    for var, path in missing.items():
        monkeypatch.setenv(var, str(path))
    monkeypatch.delenv("nnUNet_results")
    rep = doctor._Report()
    doctor._check_paths(rep)
    out = capsys.readouterr().out
    assert rep.failures == 3
    for path in missing.values():
        assert f"fix: mkdir -p {shlex.quote(str(path))}" in out
    assert "fix: mkdir -p /path/to/nnUNet_results && export nnUNet_results=/path/to/nnUNet_results" in out


def test_doctor_on_cuda_says_training_compiles_by_default_and_prediction_does_not(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "TestGPU")
    monkeypatch.delenv("nnUNet_compile", raising=False)
    rep = doctor._Report()
    doctor._check_device(rep)
    assert rep.warnings == rep.failures == 0
    expected = "training compiles" if os.name != "nt" else "training does not compile"
    assert f"nnUNet_compile unset: nnU-Net's {expected} the network" in capsys.readouterr().out
    monkeypatch.setenv("nnUNet_compile", "t")
    doctor._check_device(rep)
    assert "its predictor compiles it" in capsys.readouterr().out


@pytest.mark.parametrize("shell, line", [("sh", "export OMP_WAIT_POLICY=PASSIVE"),
                                         ("fish", "set -gx OMP_WAIT_POLICY PASSIVE"),
                                         ("powershell", "$env:OMP_WAIT_POLICY = 'PASSIVE'")])
def test_env_sets_a_passive_openmp_wait_policy_unless_the_user_chose_one(monkeypatch, capsys, shell, line):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert doctor.main_env(["--shell", shell]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1:] == [line] and "nnUNet_extTrainer" in lines[0]
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert doctor.main_env(["--shell", shell]) == 0
    assert "OMP_WAIT_POLICY" not in capsys.readouterr().out


def test_doctor_on_the_cpu_warns_about_an_unset_openmp_wait_policy(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    findings = doctor.run_checks().findings
    if any("CUDA device cuda:0" in f.text for f in findings):
        pytest.skip("this check is for CPU-only machines")
    warned = [f for f in findings if "OMP_WAIT_POLICY is unset" in f.text]
    assert len(warned) == 1 and warned[0].level == "warn" and "nnunetv2_fias env" in warned[0].fix
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert not [f for f in doctor.run_checks().findings if "OMP_WAIT_POLICY" in f.text]
