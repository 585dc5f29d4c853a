"""`nnunetv2_fias study`: the grid, job states, commands, statistics and SLURM scripts as units, and one real study
(2 trainers x 2 folds, 2d, tiny generated dataset with labelsTs, CPU) that is SIGKILLed during training and
finished by a re-run, then continued through the SLURM array task body."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nnunet_env import BIN_DIR, DATASET_NAME, NUM_TEST, PACKAGE_SHIM_DIR, make_raw_dataset, \
    nnunet_env, write_test_shim
from nnunetv2_fias.study import commands, execute, stats
from nnunetv2_fias.study.grid import Grid, Model, StudyError, TrainJob, check_study_dir, write_study
from nnunetv2_fias.study.layout import FoldState, fold_state, set_aside_broken_checkpoints

pytestmark = pytest.mark.timeout(1500)  # the killed-and-finished study runs in one fixture: minutes on 2 busy cores

FIAS_TR, BASE_TR = "FIASTrainer_e2eTiny", "nnUNetTrainer_e2eTiny"
STUDY_ARGS = ["-d", "987", "-c", "2d", "-tr", FIAS_TR, BASE_TR, "-f", "0", "1", "--device", "cpu", "-np", "1"]


def _grid(**kw) -> Grid:
    args = dict(dataset=DATASET_NAME, configurations=("2d",), models=(Model(FIAS_TR), Model(BASE_TR)), folds=(0, 1))
    args.update(kw)
    return Grid(**args)


# ------------------------------------------------------------------------------------------------ grid
def test_grid_jobs_are_configurations_x_models_x_folds_in_order():
    grid = _grid(configurations=("2d", "3d_fullres"))
    jobs = grid.train_jobs()
    assert [j.index for j in jobs] == list(range(8))
    assert [(j.configuration, j.model.trainer, j.fold) for j in jobs[:3]] == \
        [("2d", FIAS_TR, 0), ("2d", FIAS_TR, 1), ("2d", BASE_TR, 0)]
    assert jobs[4].configuration == "3d_fullres"
    assert Grid.from_json(json.loads(json.dumps(grid.to_json()))) == grid


@pytest.mark.parametrize("spec, expected", [("FIASTrainer", Model("FIASTrainer", "nnUNetPlans")),
                                            ("nnUNetTrainer:nnUNetResEncUNetMPlans",
                                             Model("nnUNetTrainer", "nnUNetResEncUNetMPlans"))])
def test_model_spec(spec, expected):
    assert Model.parse(spec) == expected


@pytest.mark.parametrize("kw, message", [
    (dict(configurations=("3d",)), "-c 3d: the study trains the configurations"),
    (dict(configurations=("3d_cascade_fullres",)), "the cascade needs"),
    (dict(folds=(0, 0)), "-f: 0 given more than once"),
    (dict(models=()), "-tr: give at least one value"),
])
def test_grid_refuses_bad_values(kw, message):
    with pytest.raises(StudyError, match=message):
        _grid(**kw)


def test_bad_model_spec():
    for spec in ("FIASTrainer:", ":plans", "a:b:c"):
        with pytest.raises(StudyError, match="expected TRAINER or TRAINER:PLANS"):
            Model.parse(spec)


def test_study_dir_of_another_grid_is_refused_naming_the_difference(tmp_path):
    write_study(tmp_path, _grid())
    assert check_study_dir(tmp_path, None) == _grid()
    assert check_study_dir(tmp_path, _grid()) == _grid()
    with pytest.raises(StudyError, match=r"folds: 0 1 recorded, 0 1 2 asked"):
        check_study_dir(tmp_path, _grid(folds=(0, 1, 2)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="not empty and holds no study.json"):
        check_study_dir(other, _grid())


# ------------------------------------------------------------------------------------------------ job state
def _checkpoint(path: Path, complete: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"x" * 1000)
    if not complete:  # what a kill during torch.save leaves: the start of the file
        path.write_bytes(path.read_bytes()[:300])


def test_fold_state_from_nnunet_files_and_the_command_it_gives(tmp_path):
    grid, job, opts = _grid(), TrainJob(0, "2d", Model(FIAS_TR), 0), commands.Options(device="cpu")
    fold = tmp_path / "fold_0"
    assert fold_state(fold, need_npz=False) is FoldState.TODO
    assert "--c" not in commands.train_command(grid, job, FoldState.TODO, opts, npz=False)
    _checkpoint(fold / "checkpoint_latest.pth")
    assert fold_state(fold, need_npz=False) is FoldState.RESUME
    assert commands.train_command(grid, job, FoldState.RESUME, opts, npz=True) == \
        ["nnUNetv2_train", "987", "2d", "0", "-tr", FIAS_TR, "-p", "nnUNetPlans", "--npz", "--c", "-device", "cpu"]
    _checkpoint(fold / "checkpoint_final.pth")
    assert fold_state(fold, need_npz=False) is FoldState.VALIDATE
    assert "--val" in commands.train_command(grid, job, FoldState.VALIDATE, opts, npz=True)
    (fold / "validation").mkdir()
    (fold / "validation" / "summary.json").write_text("{}")
    assert fold_state(fold, need_npz=False) is FoldState.DONE
    assert fold_state(fold, need_npz=True) is FoldState.VALIDATE  # ensembling needs the softmax outputs
    (fold / "validation" / "case_000.npz").write_bytes(b"")
    assert fold_state(fold, need_npz=True) is FoldState.DONE


def test_incomplete_checkpoint_is_set_aside_so_that_resuming_falls_back(tmp_path):
    _checkpoint(tmp_path / "checkpoint_best.pth")
    _checkpoint(tmp_path / "checkpoint_latest.pth", complete=False)
    (tmp_path / "checkpoint_latest.pth.partial").write_bytes(b"half of an atomic save")
    moved = set_aside_broken_checkpoints(tmp_path)
    assert not (tmp_path / "checkpoint_latest.pth.partial").exists()
    assert [p.name.split(".incomplete-")[0] for p in moved] == ["checkpoint_latest.pth"]
    assert not (tmp_path / "checkpoint_latest.pth").exists() and (tmp_path / "checkpoint_best.pth").is_file()
    assert fold_state(tmp_path, need_npz=False) is FoldState.RESUME  # nnU-Net's --c then takes checkpoint_best


def test_planning_environment_drops_n_proc_da():
    base = {"nnUNet_n_proc_DA": "0", "nnUNet_extTrainer": "/elsewhere"}
    assert "nnUNet_n_proc_DA" not in commands.subprocess_env(base, "cpu", planning=True)
    env = commands.subprocess_env(base, "cpu")
    assert env["nnUNet_n_proc_DA"] == "0"
    assert env["nnUNet_extTrainer"].split(os.pathsep) == ["/elsewhere", str(PACKAGE_SHIM_DIR)]


def test_inference_commands_follow_find_best_for_an_ensemble(tmp_path):
    info = {"folds": [0, 1], "best_model_or_ensemble": {
        "postprocessing_file": "/r/ens/postprocessing.pkl", "some_plans_file": "/r/ens/plans.json",
        "selected_model_or_models": [{"configuration": "2d", "trainer": "T", "plans_identifier": "P"},
                                     {"configuration": "3d_fullres", "trainer": "T", "plans_identifier": "P"}]}}
    cmds = commands.inference_commands(_grid(), info, Path("/raw/imagesTs"), tmp_path, commands.Options("cuda", 3))
    assert [c[0] for c in cmds] == ["nnUNetv2_predict"] * 2 + ["nnUNetv2_ensemble", "nnUNetv2_apply_postprocessing"]
    assert all("--save_probabilities" in c and c[c.index("-c") + 1] == cfg for c, cfg in zip(cmds, ("2d", "3d_fullres")))
    assert cmds[2][cmds[2].index("-i") + 1:cmds[2].index("-o")] == [str(tmp_path / "model_1"), str(tmp_path / "model_2")]
    assert cmds[3][cmds[3].index("-pp_pkl_file") + 1] == "/r/ens/postprocessing.pkl"
    single = dict(info, best_model_or_ensemble=dict(info["best_model_or_ensemble"],
                                                    selected_model_or_models=info["best_model_or_ensemble"]
                                                    ["selected_model_or_models"][:1]))
    cmds = commands.inference_commands(_grid(), single, Path("/raw/imagesTs"), tmp_path, commands.Options())
    assert [c[0] for c in cmds] == ["nnUNetv2_predict", "nnUNetv2_apply_postprocessing"]
    assert "--save_probabilities" not in cmds[0]


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_statistics_against_direct_computation():
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(1)
    ref = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.6, 0.9, 20))}
    model = {c: v + 0.03 + float(rng.normal(0, 0.01)) for c, v in ref.items()}
    model["c0"] = ref["c0"]  # a tie
    ref["c19"] = None  # HD95-like missing value: the case is left out
    r = stats.paired(ref, model, higher_is_better=True)
    d = np.array([model[c] - ref[c] for c in sorted(ref) if ref[c] is not None])
    assert r["n"] == 19 and r["mean_difference"] == pytest.approx(d.mean())
    assert r["wilcoxon_p"] == pytest.approx(wilcoxon(d).pvalue)
    assert (r["wins"], r["ties"], r["losses"]) == (int((d > 1e-6).sum()), 1, int((d < -1e-6).sum()))
    assert r["ci95"][0] < d.mean() < r["ci95"][1] and r["ci95"][0] > 0 and not r["ci_contains_zero"]
    assert stats.verdict(r, True).startswith("better than the reference")
    lower = stats.paired(ref, model, higher_is_better=False)  # for HD95 a larger value loses
    assert (lower["wins"], lower["losses"]) == (r["losses"], r["wins"])
    assert stats.verdict(lower, False).startswith("worse")


def test_identical_results_are_no_difference_and_few_cases_are_inconclusive():
    same = stats.paired({"a": 0.5, "b": 0.7}, {"a": 0.5, "b": 0.7}, True)
    assert same["mean_difference"] == 0 and same["ci95"] == [0, 0] and same["wilcoxon_p"] == 1.0
    assert same["ties"] == 2 and "contains 0" in stats.verdict(same, True)
    few = stats.paired({"a": 0.5, "b": 0.6, "c": 0.7}, {"a": 0.6, "b": 0.75, "c": 0.8}, True)
    assert not few["ci_contains_zero"] and few["wilcoxon_p"] >= 0.05
    assert stats.verdict(few, True).startswith("inconclusive") and "3 cases" in stats.verdict(few, True)
    assert stats.paired({"a": None}, {"a": 1.0}, False)["n"] == 0


# ------------------------------------------------------------------------------------------------ execution
def test_parallel_runs_one_task_per_slot_and_a_failure_does_not_stop_the_others(tmp_path):
    marker = tmp_path / "running"
    marker.mkdir()
    body = ("import os, sys, time; d = sys.argv[1]; p = os.path.join(d, str(os.getpid())); open(p, 'w').close(); "
            "n = len(os.listdir(d)); time.sleep(0.8); os.remove(p); "
            "print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'), 'peers', n); sys.exit(int(sys.argv[2]))")
    results = {}
    tasks = [execute.Task(prepare=lambda i=i: ["python", "-c", body, str(marker), "1" if i == 1 else "0"],
                          done=lambda code, i=i: results.__setitem__(i, code), log=tmp_path / f"t{i}.log",
                          title=f"task {i}", env=dict(os.environ)) for i in range(4)]
    execute.run_parallel(tasks, ["0", "1"])
    assert results == {0: 0, 1: 1, 2: 0, 3: 0}
    logs = [(tmp_path / f"t{i}.log").read_text() for i in range(4)]
    assert all("peers 1" in t or "peers 2" in t for t in logs) and not any("peers 3" in t for t in logs)
    assert {t.split("gpu ")[1][0] for t in logs} == {"0", "1"}


def test_a_held_lock_is_refused_with_its_holder(tmp_path):
    with execute.Lock(tmp_path / "x.lock", "training a fold"):
        with pytest.raises(StudyError, match=r"training a fold is already running \(pid \d+"):
            execute.Lock(tmp_path / "x.lock", "training a fold").acquire()
    with execute.Lock(tmp_path / "x.lock", "training a fold"):
        pass


# ------------------------------------------------------------------------------------------------ command line
def _study(*argv: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN_DIR / "nnunetv2_fias"), "study", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def study_env(tmp_path_factory) -> tuple[Path, dict]:
    """A raw tiny dataset with labelsTs, nothing planned; nnUNet_n_proc_DA=0 as on many CPU setups."""
    root = tmp_path_factory.mktemp("study_nnunet")
    for name in ("raw", "preprocessed", "results"):
        (root / name).mkdir()
    make_raw_dataset(root / "raw", test_labels=True)
    shim = root / "shim"
    write_test_shim(shim)
    return root, nnunet_env(root, ext_dirs=[shim, PACKAGE_SHIM_DIR], nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1")


@pytest.mark.parametrize("argv, message", [
    (["-d", "987", "-c", "2d", "-tr", "NoSuchTrainer"], "-tr NoSuchTrainer: nnU-Net cannot find it"),
    (["-d", "555", "-c", "2d", "-tr", FIAS_TR], "-d 555: no Dataset folder"),
    (["-d", "987", "-c", "2d", "-tr", f"{FIAS_TR}:MyPlans"], "the study creates only nnUNetPlans"),
    (["-d", "987", "-c", "2d", "-tr", FIAS_TR, "--gpus", "0"], "--gpus 0: GPU 0 is not here"),
    (["-d", "987", "-c", "2d"], "-d, -c and -tr go together"),
])
def test_bad_input_is_one_line_before_anything_runs(study_env, tmp_path, argv, message):
    _, env = study_env
    proc = _study("run", str(tmp_path / "s"), *argv, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, "study run ended before the condition was reached"
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def killed_and_finished(study_env, tmp_path_factory):
    """`study run` SIGKILLed (the whole process group, as a crash or reboot would) while it trains the second
    fold, then the same command again."""
    root, env = study_env
    study = tmp_path_factory.mktemp("study") / "s"
    fold = lambda tr, f: root / "results" / DATASET_NAME / f"{tr}__nnUNetPlans__2d" / f"fold_{f}"  # noqa: E731
    proc = subprocess.Popen([str(BIN_DIR / "nnunetv2_fias"), "study", "run", str(study), *STUDY_ARGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        record = study / "jobs" / f"train__{FIAS_TR}__nnUNetPlans__2d__fold_1.json"
        _wait_for(lambda: record.is_file() and fold(FIAS_TR, 1).is_dir(), proc, timeout=600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = proc.stdout.read()
    done_before = (fold(FIAS_TR, 0) / "checkpoint_final.pth").stat().st_mtime_ns
    plans_mtime = (root / "preprocessed" / DATASET_NAME / "nnUNetPlans.json").stat().st_mtime_ns
    status = _study("status", str(study), env=env, timeout=300)
    rerun = _study("run", str(study), *STUDY_ARGS, env=env)
    final_status = _study("status", str(study), env=env, timeout=300).stdout
    return dict(root=root, env=env, study=study, fold=fold, first=first, status=status, rerun=rerun,
                done_before=done_before, plans_mtime=plans_mtime, final_status=final_status)


def test_killed_study_resumes_without_redoing_finished_work(killed_and_finished):
    k = killed_and_finished
    assert "training" in k["first"] and "[train 2/4]" in k["first"], k["first"]
    status = k["status"].stdout
    assert k["status"].returncode == 0
    assert " done " in re_line(status, f"[0] train {FIAS_TR}"), status
    assert "interrupted" in re_line(status, f"[1] train {FIAS_TR}"), status
    assert "to-do" in re_line(status, f"[2] train {BASE_TR}"), status
    assert k["rerun"].returncode == 0, k["rerun"].stdout[-3000:] + k["rerun"].stderr[-3000:]
    assert (k["fold"](FIAS_TR, 0) / "checkpoint_final.pth").stat().st_mtime_ns == k["done_before"]
    assert (k["root"] / "preprocessed" / DATASET_NAME / "nnUNetPlans.json").stat().st_mtime_ns == k["plans_mtime"]
    assert "training: 1 of 4 folds done, 3 to run" in k["rerun"].stdout
    for tr in (FIAS_TR, BASE_TR):
        for f in (0, 1):
            assert (k["fold"](tr, f) / "checkpoint_final.pth").is_file()
    assert k["final_status"].strip().splitlines()[-1] == "8 done", k["final_status"]


def re_line(text: str, start: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(start)]
    assert len(lines) == 1, (start, text)
    return lines[0]


def test_study_outputs_test_predictions_and_paired_statistics(killed_and_finished):
    study = killed_and_finished["study"]
    for tr in (FIAS_TR, BASE_TR):
        preds = sorted(p.name for p in (study / "predictions" / f"{tr}__nnUNetPlans").glob("*.nii.gz"))
        assert preds == [f"test_{i:03d}.nii.gz" for i in range(NUM_TEST)]
        info = json.loads((study / "selection" / f"{tr}__nnUNetPlans" / "inference_information.json").read_text())
        assert {m["trainer"] for m in info["considered_models"]} == {tr}
    assert not list((study / "predictions").glob(".*partial"))
    comparison = json.loads((study / "comparison.json").read_text())
    assert comparison["reference"] == f"{FIAS_TR}__nnUNetPlans"
    test, cv = comparison["test"], comparison["crossval"]
    assert len(test["cases"]) == NUM_TEST and len(cv["cases"]) == 4  # folds 0 and 1 of 10 cases: 2 each
    assert test["classes"] == ["disk", "square", "mean over classes"]
    for section in (test, cv):
        paired = section["paired"][f"{BASE_TR}__nnUNetPlans"]
        for label in section["classes"]:
            dice = paired[label]["dice"]
            assert dice["n"] == len(section["cases"])
            assert dice["wins"] + dice["ties"] + dice["losses"] == dice["n"]
            assert dice["ci95"][0] <= dice["mean_difference"] <= dice["ci95"][1]
            assert 0 <= dice["wilcoxon_p"] <= 1
    folds = comparison["fold_validation_dice"][f"{FIAS_TR}__nnUNetPlans"]["2d"]
    assert set(folds) == {"0", "1"}
    report = (study / "report.md").read_text()
    assert "### " + f"{BASE_TR}__nnUNetPlans against {FIAS_TR}__nnUNetPlans" in report
    for png in ("test_dice", "test_hd95_mm", "crossval_dice", "training_2d"):
        assert (study / "plots" / f"{png}.png").read_bytes().startswith(b"\x89PNG"), png
        assert f"plots/{png}.png" in report


def test_report_regenerates_with_another_reference(killed_and_finished):
    k = killed_and_finished
    proc = _study("report", str(k["study"]), "--ref", BASE_TR, env=k["env"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    comparison = json.loads((k["study"] / "comparison.json").read_text())
    assert comparison["reference"] == f"{BASE_TR}__nnUNetPlans"
    assert list(comparison["test"]["paired"]) == [f"{FIAS_TR}__nnUNetPlans"]
    assert _study("report", str(k["study"]), env=k["env"], timeout=300).returncode == 0  # back to the default


def test_another_grid_or_an_unplanned_configuration_is_refused(killed_and_finished, tmp_path):
    k = killed_and_finished
    proc = _study("run", str(k["study"]), "-d", "987", "-c", "2d", "-tr", FIAS_TR, "--device", "cpu",
                  env=k["env"], timeout=300)
    assert proc.returncode == 1 and "holds another study" in proc.stderr and "folds: 0 1 recorded, 0 1 2 3 4 asked" \
        in proc.stderr, proc.stderr
    proc = _study("run", str(tmp_path / "s"), "-d", "987", "-c", "3d_lowres", "-tr", FIAS_TR, "--device", "cpu",
                  env=k["env"], timeout=300)
    assert proc.returncode == 1 and "-c 3d_lowres: nnU-Net did not plan it" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


def _copy_of_the_study(k: dict, destination: Path) -> dict:
    """The finished study of ``killed_and_finished`` with its nnU-Net folders, copied to ``destination``, for a test
    that changes it (the other tests read the original in any order)."""
    import shutil

    root, study = destination / "nnunet", destination / "study"
    for name in ("raw", "preprocessed", "results"):
        shutil.copytree(k["root"] / name, root / name)
    shutil.copytree(k["study"], study)
    env = dict(k["env"], **{f"nnUNet_{name}": str(root / name) for name in ("raw", "preprocessed", "results")})
    fold = lambda tr, f: root / "results" / DATASET_NAME / f"{tr}__nnUNetPlans__2d" / f"fold_{f}"  # noqa: E731
    return dict(k, root=root, study=study, env=env, fold=fold)


def test_slurm_scripts_are_valid_and_the_array_task_runs_exactly_its_job(killed_and_finished, tmp_path):
    k = _copy_of_the_study(killed_and_finished, tmp_path / "copy")
    retrain = k["fold"](BASE_TR, 0)  # job index 2
    import shutil
    shutil.rmtree(retrain)
    others = {f: (k["fold"](*f) / "checkpoint_final.pth").stat().st_mtime_ns
              for f in ((FIAS_TR, 0), (FIAS_TR, 1), (BASE_TR, 1))}
    dry = _study("run", str(k["study"]), "--device", "cpu", "--dry-run", env=k["env"], timeout=300)
    assert f"[2] {BASE_TR}__nnUNetPlans 2d fold 0: to-do: nnUNetv2_train 987 2d 0 -tr {BASE_TR}" in dry.stdout
    proc = _study("run", str(k["study"]), "--executor", "slurm", "--device", "cpu", "--partition", "gpu",
                  "--time", "2:00:00", "--mem", "8G", "--array-limit", "3", "--sbatch-option=--qos=high",
                  env=k["env"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    slurm = k["study"] / "slurm"
    for script in ("train.sbatch", "finish.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", str(slurm / script)]).returncode == 0, script
    train = (slurm / "train.sbatch").read_text()
    for line in ("#SBATCH --array=2%3", "#SBATCH --partition=gpu", "#SBATCH --time=2:00:00", "#SBATCH --mem=8G",
                 "#SBATCH --qos=high"):
        assert line in train.splitlines(), line
    assert "--gres" not in train  # --device cpu: this test runs the task here
    assert not (slurm / "plan.sbatch").exists()  # planned already
    # submit.sh chains the jobs; a fake sbatch records what it is given
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$SBATCH_LOG"\necho $((RANDOM + 100))\n')
    (fake / "sbatch").chmod(0o755)
    env = dict(k["env"], PATH=f"{fake}:{os.environ['PATH']}", SBATCH_LOG=str(tmp_path / "sbatch.log"))
    assert subprocess.run(["bash", str(slurm / "submit.sh")], env=env, capture_output=True).returncode == 0
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls[0].endswith("train.sbatch") and "--dependency=afterany:" in calls[1] and \
        calls[1].endswith("finish.sbatch")
    # the array task body with SLURM_ARRAY_TASK_ID=2 trains job 2 and nothing else
    task = subprocess.run(["bash", str(slurm / "train.sbatch")], env=dict(k["env"], SLURM_ARRAY_TASK_ID="2"),
                          capture_output=True, text=True, timeout=600)
    assert task.returncode == 0, task.stdout[-3000:] + task.stderr[-3000:]
    assert (retrain / "checkpoint_final.pth").is_file()
    assert {f: (k["fold"](*f) / "checkpoint_final.pth").stat().st_mtime_ns for f in others} == others
    status = _study("status", str(k["study"]), env=k["env"], timeout=300).stdout
    assert "done" in re_line(status, f"[2] train {BASE_TR}")
    assert "to-do" in re_line(status, f"select {BASE_TR}"), status  # its folds changed: select again


def test_a_fold_over_several_gpus_or_nodes_is_a_torchrun_job_of_nnunetv2_fias_train(monkeypatch):
    from nnunetv2_fias.study.run import gpu_slots

    grid, job = _grid(), TrainJob(0, "2d", Model(FIAS_TR), 0)
    plain = commands.train_command(grid, job, FoldState.RESUME, commands.Options("cuda"), npz=True)
    one_node = commands.train_command(grid, job, FoldState.RESUME, commands.Options("cuda", gpus_per_job=4),
                                      npz=True)
    assert one_node == ["torchrun", "--standalone", "--nproc-per-node", "4", "-m", "nnunetv2_fias.train", *plain[1:]]
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("STUDY_RDZV_ENDPOINT", "node1:29500")
    nodes = commands.train_command(grid, job, FoldState.TODO, commands.Options("cuda", gpus_per_job=8,
                                                                                nodes_per_job=2), npz=False)
    assert nodes[:5] == ["srun", "--nodes", "2", "--ntasks-per-node", "1"]
    assert nodes[nodes.index("--rdzv-id") + 1] == "77" and nodes[nodes.index("--rdzv-endpoint") + 1] == "node1:29500"
    assert nodes[nodes.index("-m") + 1:nodes.index("-m") + 5] == ["nnunetv2_fias.train", "987", "2d", "0"]
    assert gpu_slots(["0", "1", "2", "3"], 2) == ["0,1", "2,3"] and gpu_slots(None, 1) == []
    with pytest.raises(StudyError, match="do not split into groups of --gpus-per-job 2"):
        gpu_slots(["0", "1", "2"], 2)


def test_slurm_scripts_of_a_multi_node_study(tmp_path):
    from nnunetv2_fias.study import slurm
    from nnunetv2_fias.study.layout import Paths
    from nnunetv2_fias.study.run import Context

    ctx = Context(_grid(), Paths(tmp_path / "s", tmp_path / "raw", tmp_path / "pre", tmp_path / "res"),
                  commands.Options("cuda", 8, gpus_per_job=8, nodes_per_job=2),
                  {"nnUNet_raw": "/r", "nnUNet_preprocessed": "/p", "nnUNet_results": "/s", "nnUNet_n_proc_DA": "0"})
    plan = [("plan__nnUNetPlans", commands.plan_command(_grid(), "ExperimentPlanner", ["2d"], ctx.options))]
    submit = slurm.write_scripts(ctx, plan, [0, 3], slurm.SlurmOptions(account="lab", cpus_per_task=32))
    folder = submit.parent
    for script in ("plan.sbatch", "train.sbatch", "finish.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", str(folder / script)]).returncode == 0, script
    train = (folder / "train.sbatch").read_text().splitlines()
    for line in ("#SBATCH --array=0,3", "#SBATCH --gres=gpu:8", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --account=lab", "#SBATCH --cpus-per-task=32", "export nnUNet_n_proc_DA=0"):
        assert line in train, line
    assert any(line.startswith("export STUDY_RDZV_ENDPOINT=") for line in train)
    assert train[-1].endswith('--gpus-per-job 8 --nodes-per-job 2 --index "$SLURM_ARRAY_TASK_ID"')
    plan_script = (folder / "plan.sbatch").read_text()
    assert "unset nnUNet_n_proc_DA" in plan_script and "--gres" not in plan_script
    assert "#SBATCH --gres=gpu:1" in (folder / "finish.sbatch").read_text().splitlines()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$SBATCH_LOG"\necho 4$#\n')
    (fake / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SBATCH_LOG=str(tmp_path / "log"))
    assert subprocess.run(["bash", str(submit)], env=env, capture_output=True).returncode == 0
    calls = (tmp_path / "log").read_text().splitlines()
    assert calls[0].endswith("plan.sbatch") and "--dependency=afterok:" in calls[1] and \
        calls[1].endswith("train.sbatch") and "--dependency=afterany:" in calls[2]


def test_paired_mean_over_classes_uses_the_classes_both_models_have():
    from nnunetv2_fias.study.compare import MEAN, compare_section

    def case(a, b):
        return {"a": {"dice": 0.5, "hd95_mm": a, "hd95_voxel": a}, "b": {"dice": 0.5, "hd95_mm": b, "hd95_voxel": b}}

    section = {"labels": {"a": 1, "b": 2}, "cases": ["x", "y"], "methods": {
        "ref": {"per_case": {"x": case(10.0, 2.0), "y": case(12.0, 4.0)}},
        "new": {"per_case": {"x": case(None, 1.0), "y": case(None, 3.0)}}}}  # "new" missed class a entirely
    out = compare_section(section, "ref")
    assert out["models"]["ref"][MEAN]["hd95_mm"]["mean"] == pytest.approx(7.0)
    paired = out["paired"]["new"][MEAN]["hd95_mm"]
    assert paired["n"] == 2 and paired["mean_difference"] == pytest.approx(-1.0)  # class b only, on both sides
