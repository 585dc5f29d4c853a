"""What is checked before anything runs, and the planning steps a grid needs.

Every problem found here is one :class:`StudyError` line, raised before the study writes anything: an unknown
trainer, a configuration nnU-Net did not plan, plans the study cannot create, a missing dataset, GPUs that are not
there.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

from nnunetv2_fias.study import commands
from nnunetv2_fias.study.grid import PLANNERS, Grid, StudyError
from nnunetv2_fias.study.layout import Paths


def check_trainers(grid: Grid, env: dict[str, str]) -> None:
    """Look every trainer up as ``nnUNetv2_train`` will (nnU-Net's own search, with the study's nnUNet_extTrainer)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    saved = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]
    try:
        for name in dict.fromkeys(m.trainer for m in grid.models):
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # deprecation notes of modules nnU-Net's search imports
                    recursive_find_trainer_class_by_name(name)
            except (RuntimeError, AssertionError, ImportError) as e:
                reason = "it is not an nnUNetTrainer" if isinstance(e, AssertionError) else \
                    "nnU-Net cannot find it"
                raise StudyError(f"-tr {name}: {reason} (searched nnU-Net's trainers and nnUNet_extTrainer="
                                 f"{env['nnUNet_extTrainer']}); check the spelling, or add the folder of your "
                                 f"trainer's module to nnUNet_extTrainer") from None
    finally:
        if saved is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = saved


def check_gpus(gpus: list[str] | None, device: str) -> None:
    if not gpus:
        return
    if device == "cpu":
        raise StudyError("--gpus runs one training per GPU; it cannot go with --device cpu")
    import torch

    count = torch.cuda.device_count()
    missing = [g for g in gpus if not g.isdigit() or int(g) >= count]
    if missing:
        have = f"GPUs 0-{count - 1}" if count else "no GPU (torch.cuda.device_count() is 0)"
        raise StudyError(f"--gpus {','.join(gpus)}: GPU {', '.join(missing)} is not here; this machine has {have}")


def _plans_configurations(path: Path) -> dict:
    try:
        return json.loads(path.read_text())["configurations"]
    except (OSError, ValueError, KeyError) as e:
        raise StudyError(f"{path} is not a readable nnU-Net plans file ({e})") from None


def _preprocessed_complete(paths: Paths, plans: str, configuration: str, num_training: int) -> bool:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    identifier = PlansManager(str(paths.plans_file(plans))).get_configuration(configuration).data_identifier
    folder = paths.preprocessed / identifier
    return folder.is_dir() and len(list(folder.glob("*.pkl"))) >= num_training


def num_training_cases(paths: Paths) -> int:
    try:
        return int(json.loads((paths.raw / "dataset.json").read_text())["numTraining"])
    except (OSError, ValueError, KeyError) as e:
        raise StudyError(f"{paths.raw / 'dataset.json'}: no numTraining ({e})") from None


def planning_steps(grid: Grid, paths: Paths, options: commands.Options) -> list[tuple[str, list[str]]]:
    """``(key, command)`` for every plans identifier whose plans or preprocessed data are missing.

    Plans the study cannot create (a custom identifier) and configurations missing from existing plans are refused.
    """
    steps = []
    n_train = num_training_cases(paths)
    for plans in grid.plans:
        plans_file = paths.plans_file(plans)
        if not plans_file.is_file():
            if plans not in PLANNERS:
                raise StudyError(f"-tr ...:{plans}: {plans_file} does not exist, and the study creates only "
                                 f"{', '.join(PLANNERS)}; plan it first (nnUNetv2_plan_experiment "
                                 f"-overwrite_plans_name {plans}, then nnUNetv2_preprocess -plans_name {plans})")
            steps.append((f"plan__{plans}", commands.plan_command(grid, PLANNERS[plans],
                                                                  list(grid.configurations), options)))
            continue
        planned = _plans_configurations(plans_file)
        missing = [c for c in grid.configurations if c not in planned]
        if missing:
            raise StudyError(f"-c {' '.join(missing)}: nnU-Net did not plan it for {grid.dataset} ({plans_file} "
                             f"has {', '.join(planned)}); choose among those")
        need = [c for c in grid.configurations if not _preprocessed_complete(paths, plans, c, n_train)]
        if need:
            steps.append((f"preprocess__{plans}", commands.preprocess_command(grid, plans, need, options)))
    return steps


def check_planned(grid: Grid, paths: Paths) -> None:
    """After planning: nnU-Net plans 3d_lowres only where the full-resolution patch covers too little of a case."""
    for plans in grid.plans:
        planned = _plans_configurations(paths.plans_file(plans))
        missing = [c for c in grid.configurations if c not in planned]
        if missing:
            raise StudyError(f"-c {' '.join(missing)}: nnU-Net's planner did not plan it for {grid.dataset} "
                             f"({paths.plans_file(plans)} has {', '.join(planned)}); start a study without it")
