"""`nnunetv2_fias demo`: output-folder safety, the subprocess environment, and a reduced run (--budget smoke)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nnunetv2_fias import demo


def test_env_points_nnunet_into_the_output_and_appends_the_shim(tmp_path):
    user = {"nnUNet_raw": "/data/raw", "nnUNet_extTrainer": "/my/trainers", "nnUNet_def_n_proc": "3", "PATH": "/bin"}
    before = dict(user)
    env = demo.build_env(tmp_path, "cpu", base=user)
    assert user == before  # the caller's mapping is not modified
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert Path(env[name]) == tmp_path / name
    assert env["nnUNet_extTrainer"].split(os.pathsep) == ["/my/trainers", str(demo.SHIM_DIR)]
    assert (demo.SHIM_DIR / "nnunetv2_fias_trainers.py").is_file()
    assert env["nnUNet_compile"] == "f"
    assert env["nnUNet_def_n_proc"] == "3"  # the user's own setting wins
    assert env["nnUNet_n_proc_DA"] == "1"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["PATH"] == "/bin"
    # No duplicate when the shim is already listed; no empty entries when nothing was set.
    again = demo.build_env(tmp_path, "cpu", base={"nnUNet_extTrainer": str(demo.SHIM_DIR)})
    assert again["nnUNet_extTrainer"] == str(demo.SHIM_DIR)
    assert demo.build_env(tmp_path, "cuda", base={})["nnUNet_extTrainer"] == str(demo.SHIM_DIR)


def test_refuses_a_foreign_non_empty_folder_even_with_overwrite(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert demo.main(["-o", str(out), "--budget", "smoke", "--device", "cpu", *extra]) == 1
        assert "not written by" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_previous_run_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / demo.MARKER).write_text("{}")
    (out / "phantoms").mkdir()
    (out / "phantoms" / "x.nii.gz").write_bytes(b"")
    assert demo.main(["-o", str(out), "--budget", "smoke", "--device", "cpu"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "phantoms" / "x.nii.gz").exists()
    demo.prepare_output(out, overwrite=True)
    assert list(out.iterdir()) == []


def test_output_that_is_a_file_is_rejected(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert demo.main(["-o", str(f), "--device", "cpu"]) == 1
    assert f.read_text() == "x"


@pytest.mark.parametrize("argv", [["--seed", "-1"], ["-np", "0"]])
def test_invalid_numbers_write_nothing(tmp_path, argv):
    out = tmp_path / "out"
    assert demo.main(["-o", str(out), "--device", "cpu", *argv]) == 1
    assert not out.exists()


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "out"
    assert demo.main(["-o", str(out), "--device", "cuda"]) == 1
    assert not out.exists()
    assert demo.resolve_device("auto") == "cpu"


def test_error_is_one_line_starting_with_the_command_name(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert demo.main(["-o", str(f), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nnunetv2_fias demo: error: ") and str(f) in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, status", [
    (["--no-such-option"], 2), (["--budget", "huge"], 2), (["--seed", "x"], 2), (["-h"], 0),
    (["--seed", "-1"], 1), (["-np", "0"], 1), (["--device", "cpu"], 1),  # the last: the output is a file
])
def test_exit_status_through_the_console_command(tmp_path, capsys, argv, status):
    from nnunetv2_fias import cli

    out = tmp_path / "file"
    out.write_text("x")
    assert cli.main(["demo", "-o", str(out), *argv]) == status
    assert out.read_text() == "x" and list(tmp_path.iterdir()) == [out]
    if status == 1:
        assert capsys.readouterr().err.startswith("nnunetv2_fias demo: error: ")


def test_cuda_without_gpu_is_a_demo_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(demo.DemoError, match="--device cuda"):
        demo.resolve_device("cuda")
    assert demo.resolve_device("auto") == "cpu"


def test_pipeline_creates_the_nnunet_folders_the_converter_requires(tmp_path):
    from nnunetv2_fias.demo.pipeline import create_nnunet_folders

    env = demo.build_env(tmp_path, "cpu", base={})
    create_nnunet_folders(env)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert (tmp_path / name).is_dir()


def test_budget_trainers_are_exported_by_the_shim():
    """Every trainer the demo asks nnU-Net for must be importable through the discovery shim."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_demo_shim_check", demo.SHIM_DIR / "nnunetv2_fias_trainers.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    for budget in demo.BUDGETS.values():
        for name in (budget.fias_trainer, budget.baseline_trainer):
            assert hasattr(shim, name), f"{name} is not exported by the nnU-Net shim"


@pytest.mark.timeout(900)
def test_smoke_demo_end_to_end(tmp_path, monkeypatch):
    """The same code path as the real demo at a tiny budget; asserts on artifacts, not accuracy."""
    user = {name: tmp_path / "user" / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in user.items():
        monkeypatch.setenv(name, str(path))
    out = tmp_path / "demo"
    assert demo.main(["-o", str(out), "--budget", "smoke", "--compare", "--device", "cpu"]) == 0

    assert not (tmp_path / "user").exists()  # the user's nnU-Net folders were never used
    assert os.environ["nnUNet_raw"] == str(user["nnUNet_raw"])  # nor this process' environment changed
    marker = json.loads((out / demo.MARKER).read_text())
    assert marker["status"] == "done" and marker["device"] == "cpu"

    raw = out / "phantoms" / "RawData"
    assert len(list((raw / "Training" / "img").glob("img*.nii.gz"))) == 30
    test_cases = sorted(p.name for p in (out / "nnUNet_raw" / demo.DATASET_NAME / "labelsTs").glob("*.nii.gz"))
    assert len(test_cases) == 12
    smoke = demo.BUDGETS["smoke"]
    for trainer in (smoke.fias_trainer, smoke.baseline_trainer):
        preds = sorted(p.name for p in (out / "predictions" / trainer).glob("*.nii.gz"))
        assert preds == test_cases
        fold = out / "nnUNet_results" / demo.DATASET_NAME / f"{trainer}__nnUNetPlans__2d" / "fold_0"
        assert (fold / "checkpoint_final.pth").is_file()

    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    organs = {"aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"}
    assert set(summary["labels"]) == organs
    assert set(summary["methods"]) == {demo.METHOD_NAMES["fias"], demo.METHOD_NAMES["baseline"]}
    for method in summary["methods"].values():
        assert set(method["mean"]) == organs and len(method["per_case"]) == 12

    report = (out / "report.md").read_text()
    for method in summary["methods"]:
        assert method in report
    for png in (out / "overlay.png", out / "evaluation" / "dice.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(png) in report
    for log in ("1_convert.log", "2_plan_and_preprocess.log", f"3_train_{smoke.fias_trainer}.log",
                f"4_predict_{smoke.fias_trainer}.log", "5_evaluate.log"):
        assert (out / "logs" / log).stat().st_size > 0

    # A second run into the same folder is refused without --overwrite and leaves the results alone.
    assert demo.main(["-o", str(out), "--budget", "smoke", "--device", "cpu"]) == 1
    assert (out / "report.md").read_text() == report


def test_configuration_3d_fullres_runs_every_nnunet_step_in_3d(tmp_path):
    """`--configuration 3d_fullres` plans, trains and predicts 3d_fullres (FIAS-3D); the 3D commands themselves are
    run end to end in test_e2e_3d.py."""
    from nnunetv2_fias.demo import cli, pipeline

    assert cli.build_parser().parse_args(["--configuration", "3d_fullres"]).configuration == "3d_fullres"
    assert cli.build_parser().parse_args([]).configuration == "2d"
    assert demo.main(["-o", str(tmp_path / "x"), "--configuration", "3d_lowres"]) == 2

    class Recorder:
        out = tmp_path
        commands: list[list[str]] = []

        def run(self, title, command, log):
            self.commands.append(command)

    runner = Recorder()
    pipeline._nnunet_steps(runner, tmp_path / "RawData", {"fias": "FIASTrainer_demoBudget"}, "cpu", 1, "3d_fullres")
    by_tool = {Path(c[0]).name: c for c in runner.commands}
    assert by_tool["nnUNetv2_plan_and_preprocess"][by_tool["nnUNetv2_plan_and_preprocess"].index("-c") + 1] == \
        "3d_fullres"
    assert by_tool["nnUNetv2_train"][2] == "3d_fullres"
    assert by_tool["nnUNetv2_predict"][by_tool["nnUNetv2_predict"].index("-c") + 1] == "3d_fullres"
