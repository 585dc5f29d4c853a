"""The study's grid (dataset x configurations x trainers-with-plans x folds), its jobs, and the study file.

The grid is what makes two runs "the same study": it is written to ``STUDY_DIR/study.json`` on the first run and a
later run with another grid is refused with the differences named. Run options (device, executor, GPUs, number of
processes) are not part of the grid: a study may start on one machine and finish on another.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunetv2_fias import _util

STUDY_FILE = "study.json"
STUDY_VERSION = 1
DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_FOLDS = (0, 1, 2, 3, 4)
# The configurations nnU-Net's planners write. The cascade needs the low-resolution stage's predictions of every
# fold as an input, which this runner does not chain; the other three are independent trainings.
KNOWN_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
# Plans identifiers the study can create itself, and the planner (-pl) that writes each.
PLANNERS = {
    "nnUNetPlans": "ExperimentPlanner",
    "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
    "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL",
    "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL",
}


class StudyError(Exception):
    """A user error: one line, printed without a traceback, exit status 1."""


@dataclass(frozen=True)
class Model:
    """One trainer with its plans, as nnU-Net names its results folder (``TRAINER__PLANS__CONFIGURATION``)."""
    trainer: str
    plans: str = DEFAULT_PLANS

    @property
    def name(self) -> str:
        return f"{self.trainer}__{self.plans}"

    @classmethod
    def parse(cls, spec: str) -> "Model":
        trainer, _, plans = spec.partition(":")
        if not trainer or (":" in spec and not plans) or ":" in plans:
            raise StudyError(f"-tr {spec!r}: expected TRAINER or TRAINER:PLANS, e.g. FIASTrainer or "
                             f"nnUNetTrainer:nnUNetResEncUNetMPlans")
        return cls(trainer, plans or DEFAULT_PLANS)


@dataclass(frozen=True)
class TrainJob:
    """One fold of one model in one configuration: one ``nnUNetv2_train`` run."""
    index: int
    configuration: str
    model: Model
    fold: int

    @property
    def key(self) -> str:
        return f"train__{self.model.name}__{self.configuration}__fold_{self.fold}"

    @property
    def label(self) -> str:
        return f"{self.model.name} {self.configuration} fold {self.fold}"


@dataclass(frozen=True)
class Grid:
    dataset: str  # nnU-Net's DatasetXXX_Name
    configurations: tuple[str, ...]
    models: tuple[Model, ...]
    folds: tuple[int, ...] = DEFAULT_FOLDS
    version: int = field(default=STUDY_VERSION, compare=False)

    def __post_init__(self) -> None:
        for what, items in (("-c", self.configurations), ("-tr", [m.name for m in self.models]),
                            ("-f", self.folds)):
            if not items:
                raise StudyError(f"{what}: give at least one value")
            dupes = sorted({str(i) for i in items if list(items).count(i) > 1})
            if dupes:
                raise StudyError(f"{what}: {', '.join(dupes)} given more than once")
        bad = [c for c in self.configurations if c not in KNOWN_CONFIGURATIONS]
        if bad:
            extra = (" (the cascade needs every fold's 3d_lowres predictions as input; train 3d_lowres and "
                     "3d_fullres instead, or run the cascade by hand)" if "3d_cascade_fullres" in bad else "")
            raise StudyError(f"-c {' '.join(bad)}: the study trains the configurations "
                             f"{', '.join(KNOWN_CONFIGURATIONS)}{extra}")
        bad_folds = [f for f in self.folds if not 0 <= f]
        if bad_folds:
            raise StudyError(f"-f {' '.join(map(str, bad_folds))}: folds are non-negative integers")

    @property
    def plans(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.plans for m in self.models))

    def train_jobs(self) -> list[TrainJob]:
        """Configurations x models x folds, in command-line order; the index is the SLURM array index."""
        jobs = []
        for configuration in self.configurations:
            for model in self.models:
                for fold in self.folds:
                    jobs.append(TrainJob(len(jobs), configuration, model, fold))
        return jobs

    def to_json(self) -> dict:
        d = asdict(self)
        d["models"] = [asdict(m) for m in self.models]
        return {"version": d.pop("version"), **d}

    @classmethod
    def from_json(cls, d: dict) -> "Grid":
        return cls(dataset=d["dataset"], configurations=tuple(d["configurations"]),
                   models=tuple(Model(**m) for m in d["models"]), folds=tuple(d["folds"]),
                   version=d.get("version", STUDY_VERSION))

    def differences(self, other: "Grid") -> list[str]:
        out = []
        for name in ("dataset", "configurations", "models", "folds"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                show = (lambda v: " ".join(m.trainer + ":" + m.plans for m in v)) if name == "models" else \
                    (lambda v: v if isinstance(v, str) else " ".join(map(str, v)))
                out.append(f"{name}: {show(theirs)} recorded, {show(mine)} asked")
        return out


def load_study(study_dir: Path) -> Grid | None:
    path = study_dir / STUDY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != STUDY_VERSION:
            raise StudyError(f"{path}: study file version {data.get('version')!r}, this nnunetv2_fias writes "
                             f"version {STUDY_VERSION}")
        return Grid.from_json(data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StudyError(f"{path} is not a readable study file ({e}); move it away to start a new study there")


def check_study_dir(study_dir: Path, grid: Grid | None) -> Grid:
    """The grid of ``study_dir``: the recorded one (``grid`` None, or equal), refusing a different grid."""
    if study_dir.exists() and not study_dir.is_dir():
        raise StudyError(f"STUDY_DIR {study_dir} exists and is not a folder")
    recorded = load_study(study_dir)
    if grid is None:
        if recorded is None:
            raise StudyError(f"STUDY_DIR {study_dir} holds no {STUDY_FILE}; start a study with "
                             f"`nnunetv2_fias study run {study_dir} -d DATASET -c CONFIG -tr TRAINER`")
        return recorded
    if recorded is not None and recorded != grid:
        raise StudyError(f"STUDY_DIR {study_dir} holds another study ({'; '.join(grid.differences(recorded))}); "
                         f"re-run it with its own arguments (or just `study run {study_dir}`), or use a new "
                         f"STUDY_DIR")
    if recorded is None and study_dir.is_dir() and any(study_dir.iterdir()):
        raise StudyError(f"STUDY_DIR {study_dir} is not empty and holds no {STUDY_FILE}, so it is no study folder; "
                         f"choose a new or empty folder (nothing was changed)")
    return grid


def write_study(study_dir: Path, grid: Grid) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    if load_study(study_dir) is None:
        _util.atomic_write_json(study_dir / STUDY_FILE, grid.to_json())
