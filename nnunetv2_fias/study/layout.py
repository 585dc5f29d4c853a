"""Where nnU-Net and the study keep things, and what state a job is in, read from the files nnU-Net writes.

A training fold is done when nnU-Net wrote ``checkpoint_final.pth`` and its validation (``validation/summary.json``,
plus the ``.npz`` files when several configurations may be ensembled). A fold with only a final checkpoint
is validated again (``--val --npz``); one with ``checkpoint_latest.pth`` resumes with ``--c``. A checkpoint that is
not a complete file (a kill during nnU-Net's in-place ``torch.save``) is moved aside so that ``--c`` falls back to
the previous one instead of failing.
"""
from __future__ import annotations

import json
import os
import socket
import time
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from nnunetv2_fias import _util
from nnunetv2_fias.study.grid import Grid, Model, StudyError, TrainJob

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass(frozen=True)
class Paths:
    """nnU-Net's folders for the study's dataset and the study's own folders."""
    study: Path
    raw: Path  # $nnUNet_raw/DatasetXXX_Name
    preprocessed: Path
    results: Path

    @classmethod
    def from_env(cls, study: Path, dataset: str, env: dict[str, str]) -> "Paths":
        return cls(study=study, raw=Path(env["nnUNet_raw"]) / dataset,
                   preprocessed=Path(env["nnUNet_preprocessed"]) / dataset,
                   results=Path(env["nnUNet_results"]) / dataset)

    def model_folder(self, model: Model, configuration: str) -> Path:
        return self.results / f"{model.name}__{configuration}"

    def fold_folder(self, job: TrainJob) -> Path:
        return self.model_folder(job.model, job.configuration) / f"fold_{job.fold}"

    def plans_file(self, plans: str) -> Path:
        return self.preprocessed / f"{plans}.json"

    # the study's own files
    def job_state(self, key: str) -> Path:
        return self.study / "jobs" / f"{key}.json"

    def log(self, key: str) -> Path:
        return self.study / "logs" / f"{key}.log"

    def selection(self, model: Model) -> Path:
        return self.study / "selection" / model.name / "inference_information.json"

    def predictions(self, model: Model) -> Path:
        return self.study / "predictions" / model.name

    @property
    def evaluation(self) -> Path:
        return self.study / "evaluation"


def resolve_dataset(dataset: str, env: dict[str, str]) -> str:
    """nnU-Net's folder name for ``-d`` (an id or a DatasetXXX_Name), found in nnUNet_raw or nnUNet_preprocessed."""
    for name in NNUNET_FOLDERS:
        value = env.get(name)
        if not value:
            raise StudyError(f"{name} is not set; export nnU-Net's three folders first (see `nnunetv2_fias doctor`)")
        if not Path(value).is_dir():
            raise StudyError(f"{name}={value} does not exist; create it: mkdir -p {value}")
    if dataset.startswith("Dataset"):
        candidates = [dataset]
    elif dataset.isdigit():
        prefix = f"Dataset{int(dataset):03d}_"
        candidates = sorted({p.name for name in NNUNET_FOLDERS[:2] for p in Path(env[name]).iterdir()
                             if p.is_dir() and p.name.startswith(prefix)})
        if len(candidates) > 1:
            raise StudyError(f"-d {dataset}: several datasets have this id ({', '.join(candidates)}); give the name")
    else:
        raise StudyError(f"-d {dataset!r}: expected a dataset id (e.g. 111) or name (e.g. Dataset111_Synapse)")
    for name in candidates:
        if (Path(env["nnUNet_raw"]) / name / "dataset.json").is_file():
            return name
    raise StudyError(f"-d {dataset}: no Dataset folder with a dataset.json for it in nnUNet_raw={env['nnUNet_raw']} "
                     f"(convert it first, e.g. `nnunetv2_fias convert-synapse`)")


# ------------------------------------------------------------------------------------------------ training state
class FoldState(Enum):
    DONE = "done"
    VALIDATE = "validate"  # final checkpoint, validation missing: --val --npz
    RESUME = "resume"      # a checkpoint to continue from: --c
    TODO = "to-do"


def _complete(checkpoint: Path) -> bool:
    """A torch checkpoint is a zip file; a save killed half-way leaves no central directory or a bad CRC."""
    try:
        with zipfile.ZipFile(checkpoint) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def set_aside_broken_checkpoints(fold: Path) -> list[Path]:
    """Rename incomplete checkpoints in ``fold`` (``--c`` would crash on them); return the new names. The
    ``.partial`` files of a FIAS trainer's atomic save that a kill left behind are removed (the job's lock is
    held, so nothing is writing them)."""
    for partial in fold.glob("checkpoint_*.pth.partial"):
        partial.unlink()
    moved = []
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        path = fold / name
        if path.is_file() and not _complete(path):
            target = path.with_name(f"{name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
            path.rename(target)
            moved.append(target)
    return moved


def fold_state(fold: Path, need_npz: bool) -> FoldState:
    if (fold / "checkpoint_final.pth").is_file():
        validation = fold / "validation"
        if (validation / "summary.json").is_file() and (not need_npz or any(validation.glob("*.npz"))):
            return FoldState.DONE
        return FoldState.VALIDATE
    if (fold / "checkpoint_latest.pth").is_file() or (fold / "checkpoint_best.pth").is_file():
        return FoldState.RESUME
    return FoldState.TODO


def needs_npz(grid: Grid) -> bool:
    """find_best ensembles configurations of one trainer, which needs the validation's softmax outputs."""
    return len(grid.configurations) > 1


# ------------------------------------------------------------------------------------------------ job records
def write_job_record(paths: Paths, key: str, status: str, **extra) -> None:
    path = paths.job_state(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
              "log": str(paths.log(key)), **extra}
    _util.atomic_write_json(path, record)


def read_job_record(paths: Paths, key: str) -> dict | None:
    try:
        return json.loads(paths.job_state(key).read_text())
    except (OSError, ValueError):
        return None


def record_is_live(record: dict | None) -> bool:
    """A 'running' record whose process still exists (records of other hosts are taken at their word)."""
    if not record or record.get("status") != "running":
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return False
    return True
