"""The output side of the converters: nnU-Net's folders, the dataset ID, staged writing and the final commit.

The converters write only under folders the user has created and named through ``nnUNet_raw`` and
``nnUNet_preprocessed`` (a missing one is an error, as in ``nnunetv2_fias doctor``). A dataset is built in a
hidden staging folder inside ``nnUNet_raw`` and renamed into place only when every case converted; what
``--overwrite`` replaces is removed after that.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from nnunetv2_fias._util import StagingFolder, remove_stale_staging
from nnunetv2_fias.dataset_conversion.checks import visible_entries
from nnunetv2_fias.dataset_conversion.common import FILE_ENDING, ConversionError

CASE_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


def existing_env_folder(var: str, purpose: str) -> Path:
    """The folder named by environment variable ``var``; it must be set and exist (nothing is created)."""
    value = os.environ.get(var)
    if not value:
        raise ConversionError(f"environment variable {var} is not set; it must point to the folder for {purpose}",
                              hint=f"Example: export {var}=/data/{var}  (see nnU-Net's "
                                   "documentation/setting_up_paths.md)")
    path = Path(value).expanduser()
    if not path.exists():
        raise ConversionError(f"{var}={path} does not exist; create it (mkdir -p {shlex.quote(str(path))}) or set "
                              f"{var} to an existing folder for {purpose}")
    if not path.is_dir():
        raise ConversionError(f"{var}={path} is not a folder; set {var} to the folder for {purpose}")
    return path


def nnunet_folders(with_split: bool) -> tuple[Path, Path | None]:
    """``(nnUNet_raw, nnUNet_preprocessed or None)``, checked before a converter reads any input."""
    raw = existing_env_folder("nnUNet_raw", "nnU-Net's raw datasets")
    pre = existing_env_folder("nnUNet_preprocessed", "nnU-Net's preprocessed data (splits_final.json)") \
        if with_split else None
    return raw, pre


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _dataset_dirs(root: Path, prefix: str) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)]


class DatasetOutput:
    """The nnU-Net dataset folder a converter writes, created atomically.

    Args:
        dataset_id: nnU-Net dataset ID (1-999).
        name: dataset name without the ``DatasetXXX_`` prefix.
        overwrite: replace an existing dataset folder (and raw folders of other names with the same ID).
        input_folder: the converter's input, protected from being replaced.
        raw_root: the existing ``nnUNet_raw`` folder (see :func:`nnunet_folders`).
        pre_root: the existing ``nnUNet_preprocessed`` folder, or None when no ``splits_final.json`` is written.
    """

    def __init__(self, dataset_id: int, name: str, overwrite: bool, input_folder: Path, raw_root: Path,
                 pre_root: Path | None):
        if not 1 <= dataset_id <= 999:
            raise ConversionError(f"-d {dataset_id}: expected a dataset ID between 1 and 999")
        self.raw_root, self.pre_root = raw_root, pre_root
        self.name = f"Dataset{dataset_id:03d}_{name}"
        self.target = self.raw_root / self.name
        self.overwrite = overwrite
        self.replaced: list[Path] = []
        self.staging: Path | None = None
        self._staging: StagingFolder | None = None
        self.removed_stale: list = []
        problems = self._claim_id(dataset_id)
        for p in self.replaced:
            if _is_within(input_folder, p):
                problems.append(f"the input folder {input_folder} lies inside {p}, which this conversion would "
                                "replace; move the input elsewhere first")
        if problems:
            raise ConversionError(problems)

    def _claim_id(self, dataset_id: int) -> list[str]:
        """Collect what this ID would replace (``self.replaced``) and the problems that block it."""
        prefix = f"Dataset{dataset_id:03d}_"
        problems = []
        if self.target.exists():
            if not self.overwrite:
                problems.append(f"{self.target} already exists; pass --overwrite to replace it (the old folder "
                                "is removed only after the new dataset has been written completely)")
            self.replaced.append(self.target)
        for other in sorted(p for p in _dataset_dirs(self.raw_root, prefix) if p.name != self.name):
            if not self.overwrite:
                problems.append(f"dataset ID {dataset_id} is already used by {other}; nnU-Net cannot tell two "
                                f"names with one ID apart. Choose another -d, or pass --overwrite to replace it")
            self.replaced.append(other)
        # Preprocessed data and trained models of another dataset are never deleted by a converter.
        for var in ("nnUNet_preprocessed", "nnUNet_results"):
            root = os.environ.get(var)
            if root:
                for other in _dataset_dirs(Path(root).expanduser(), prefix):
                    if other.name != self.name:
                        problems.append(f"dataset ID {dataset_id} is already used by {other} ({var}); choose "
                                        "another -d or remove that folder yourself")
        return problems

    @property
    def split_file(self) -> Path:
        assert self.pre_root is not None
        return self.pre_root / self.name / "splits_final.json"

    def check_split(self, splits: list[dict]) -> None:
        """Refuse to replace a different ``splits_final.json`` without ``--overwrite``."""
        f = self.split_file
        if f.is_file() and not self.overwrite:
            try:
                same = json.loads(f.read_text()) == splits
            except (OSError, ValueError):
                same = False
            if not same:
                raise ConversionError(f"{f} already exists with a different split; pass --overwrite to replace it")

    def __enter__(self) -> Path:
        # Staging folders of this dataset whose conversion was killed (SIGKILL, power loss) would stay forever.
        self.removed_stale = remove_stale_staging(self.raw_root, self.name)
        for stale in self.removed_stale:
            print(f"removed a staging folder left by an interrupted conversion: {stale.describe()}", file=sys.stderr)
        try:
            # Hidden name without the 'Dataset' prefix: nnU-Net's ID lookup never sees a half-written dataset.
            self._staging = StagingFolder(self.target)
        except OSError as e:
            raise ConversionError(f"cannot create a folder in nnUNet_raw={self.raw_root}: {e.strerror or e}")
        self.staging = self._staging.path
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._staging is not None and self.staging is not None:
            self._staging.remove()

    def _stage_split(self, splits: list[dict]) -> tuple[Path, Path | None]:
        """Write the split to a hidden file beside its final place; return it and the folder created for it."""
        pre_dir = self.split_file.parent
        created = None if pre_dir.exists() else pre_dir
        split_tmp = None
        try:
            pre_dir.mkdir(exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".splits_final.", suffix=".json.partial", dir=pre_dir)
            split_tmp = Path(name)
            with os.fdopen(fd, "w") as fh:
                json.dump(splits, fh, indent=1)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(split_tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the split from other users
        except OSError as e:
            if split_tmp is not None:
                split_tmp.unlink(missing_ok=True)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise ConversionError(f"cannot write {self.split_file}: {e.strerror or e}")
        return split_tmp, created

    def commit(self, splits: list[dict] | None) -> list[str]:
        """Move the staged dataset into place, write the split, then remove what it replaces.

        Returns:
            Notes for the user (e.g. stale preprocessed data).
        """
        assert self.staging is not None
        notes = []
        split_tmp = created_pre_dir = None
        if splits is not None:
            split_tmp, created_pre_dir = self._stage_split(splits)
            pre_dir = self.split_file.parent
            if self.overwrite and self.target.exists() and \
                    any(p.name != "splits_final.json" for p in visible_entries(pre_dir)):
                notes.append(f"{pre_dir} holds preprocessed data of the replaced dataset; rerun "
                             "nnUNetv2_plan_and_preprocess before training")
        trash = []
        self._staging.release()
        try:
            for old in self.replaced:
                aside = old.with_name(f".{old.name}.replaced-{uuid.uuid4().hex[:8]}")
                old.rename(aside)
                trash.append((aside, old))
            self.staging.rename(self.target)
        except OSError as e:
            for aside, old in reversed(trash):
                aside.rename(old)
            if split_tmp is not None:
                split_tmp.unlink(missing_ok=True)
            if created_pre_dir is not None:
                shutil.rmtree(created_pre_dir, ignore_errors=True)
            raise ConversionError(f"could not move the converted dataset into {self.target}: {e}")
        self.staging = None
        if split_tmp is not None:
            os.replace(split_tmp, self.split_file)
        for aside, _ in trash:
            shutil.rmtree(aside, ignore_errors=True)
        return notes


def make_case_folders(staging: Path) -> None:
    """imagesTr, labelsTr, imagesTs and labelsTs in the staging folder (empty ones go in :func:`drop_empty_folders`)."""
    for sub in CASE_FOLDERS:
        (staging / sub).mkdir()


def drop_empty_folders(staging: Path) -> None:
    """Remove imagesTs/labelsTs when no case went there (nnU-Net expects them only when they hold cases)."""
    for sub in ("imagesTs", "labelsTs"):
        if not any((staging / sub).iterdir()):
            (staging / sub).rmdir()


def write_dataset_json(folder: Path, channel: str, labels: dict[str, int], num_training: int, **extra: Any) -> None:
    """dataset.json through nnU-Net's own generator (``extra`` lands as additional keys)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(str(folder), channel_names={0: channel}, labels=dict(labels),
                          num_training_cases=num_training, file_ending=FILE_ENDING, **extra)
