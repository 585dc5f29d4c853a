"""The stock nnU-Net console commands a study runs, built as a user would type them.

Every command is a list whose first element is the console command's name; :func:`resolve` turns it into the
executable of this environment when it runs, so the printed form (``--dry-run``, job logs, SLURM scripts) is the
one a user can copy.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_fias import _util
from nnunetv2_fias.study.grid import Grid, Model, TrainJob
from nnunetv2_fias.study.layout import FoldState


@dataclass(frozen=True)
class Options:
    """How to run (not part of the grid)."""
    device: str = "cuda"
    num_processes: int = 1  # nnU-Net's -np / -npp / -nps for planning, ensembling, prediction and export
    gpus_per_job: int = 1  # >1: each fold trains as one torchrun job over this many GPUs (per node)
    nodes_per_job: int = 1  # >1 (SLURM): each fold's torchrun job spans this many nodes, started by srun


def resolve(command: list[str]) -> list[str]:
    """The console command of this environment (the one nnunetv2_fias runs in); a missing one fails when run."""
    return [*(_util.console_command(command[0]) or [command[0]]), *command[1:]]


def show(command: list[str]) -> str:
    return shlex.join(command)


def dataset_id(grid: Grid) -> str:
    return str(int(grid.dataset[len("Dataset"):len("Dataset") + 3]))


def train_command(grid: Grid, job: TrainJob, state: FoldState, options: Options, npz: bool) -> list[str]:
    cmd = ["nnUNetv2_train", dataset_id(grid), job.configuration, str(job.fold), "-tr", job.model.trainer,
           "-p", job.model.plans]
    if npz:
        cmd.append("--npz")
    if state is FoldState.RESUME:
        cmd.append("--c")
    elif state is FoldState.VALIDATE:
        cmd.append("--val")
    return launcher(cmd + ["-device", options.device], options)


def launcher(train: list[str], options: Options) -> list[str]:
    """``nnUNetv2_train`` as it is, or the same arguments as a torchrun job of ``nnunetv2_fias.train``: on one node
    (``--standalone``), or on several nodes of a SLURM allocation (``srun`` starts one torchrun per node; the c10d
    rendezvous runs on the allocation's first node, which the job script exports as STUDY_RDZV_ENDPOINT)."""
    if options.gpus_per_job == 1 and options.nodes_per_job == 1:
        return train
    module = ["-m", "nnunetv2_fias.train", *train[1:]]
    per_node = ["--nproc-per-node", str(options.gpus_per_job)]
    if options.nodes_per_job == 1:
        return ["torchrun", "--standalone", *per_node, *module]
    n = str(options.nodes_per_job)
    return ["srun", "--nodes", n, "--ntasks-per-node", "1", "torchrun", "--nnodes", n, *per_node,
            "--rdzv-id", os.environ.get("SLURM_JOB_ID", "$SLURM_JOB_ID"), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", os.environ.get("STUDY_RDZV_ENDPOINT", "$STUDY_RDZV_ENDPOINT"), *module]


def plan_command(grid: Grid, planner: str, configurations: list[str], options: Options) -> list[str]:
    n = str(options.num_processes)
    return ["nnUNetv2_plan_and_preprocess", "-d", dataset_id(grid), "-pl", planner, "-c", *configurations,
            "-np", n, "-npfp", n, "--verify_dataset_integrity"]


def preprocess_command(grid: Grid, plans: str, configurations: list[str], options: Options) -> list[str]:
    return ["nnUNetv2_preprocess", "-d", dataset_id(grid), "-plans_name", plans, "-c", *configurations,
            "-np", str(options.num_processes)]


def find_best_command(grid: Grid, model: Model, options: Options) -> list[str]:
    return ["nnUNetv2_find_best_configuration", dataset_id(grid), "-c", *grid.configurations, "-tr", model.trainer,
            "-p", model.plans, "-f", *map(str, grid.folds), "-np", str(options.num_processes)]


def inference_commands(grid: Grid, info: dict, images: Path, work: Path, options: Options) -> list[list[str]]:
    """What find_best's ``inference_instructions.txt`` says, with real folders, the device and process counts:
    ``nnUNetv2_predict`` per selected model into ``work/model_N`` (with probabilities when they are ensembled),
    ``nnUNetv2_ensemble`` into ``work/raw`` (a single model predicts there), then
    ``nnUNetv2_apply_postprocessing`` into ``work/postprocessed``."""
    best = info["best_model_or_ensemble"]
    selected = best["selected_model_or_models"]
    ensemble = len(selected) > 1
    n = str(options.num_processes)
    cmds, outputs = [], []
    for i, m in enumerate(selected):
        target = str(work / (f"model_{i + 1}" if ensemble else "raw"))
        outputs.append(target)
        cmd = ["nnUNetv2_predict", "-d", dataset_id(grid), "-i", str(images), "-o", target,
               "-f", *map(str, info["folds"]), "-tr", m["trainer"], "-c", m["configuration"],
               "-p", m["plans_identifier"]]
        if ensemble:
            cmd.append("--save_probabilities")
        cmds.append(cmd + ["-device", options.device, "-npp", n, "-nps", n, "--disable_progress_bar"])
    if ensemble:
        cmds.append(["nnUNetv2_ensemble", "-i", *outputs, "-o", str(work / "raw"), "-np", n])
    cmds.append(["nnUNetv2_apply_postprocessing", "-i", str(work / "raw"), "-o", str(work / "postprocessed"),
                 "-pp_pkl_file", best["postprocessing_file"], "-np", n, "-plans_json", best["some_plans_file"]])
    return cmds


def subprocess_env(base: dict[str, str], device: str, planning: bool = False) -> dict[str, str]:
    """The environment of every nnU-Net command: the FIAS trainers discoverable; CPU-friendly defaults on CPU.

    Planning never inherits ``nnUNet_n_proc_DA``: nnU-Net 2.8.1's planner calls ``set_num_threads`` with it and
    crashes on the common CPU setting 0.
    """
    from nnunetv2_fias.doctor import ext_trainer_value

    env = dict(base)
    env["nnUNet_extTrainer"] = ext_trainer_value(env.get("nnUNet_extTrainer"))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    if device == "cpu":
        # nnU-Net's pools default to 8 workers, which costs minutes and GBs per fold on a CPU machine; idle OpenMP
        # threads sleep instead of spinning so concurrent workers do not steal the training's cores.
        env.setdefault("nnUNet_def_n_proc", "1")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if planning:
        env.pop("nnUNet_n_proc_DA", None)
    return env


def env_exports(env: dict[str, str]) -> list[str]:
    """``export`` lines for a job script: nnU-Net's folders and the variables that change what nnU-Net does."""
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile",
             "nnUNet_def_n_proc", "nnUNet_n_proc_DA", "OMP_WAIT_POLICY")
    return [f"export {n}={shlex.quote(env[n])}" for n in names if env.get(n)] + [
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\""]

