"""Shared machinery of the dataset converters: validation helpers, staged writing, parallel work, CLI plumbing.

Every converter follows the same contract:

1. scan the input and collect *all* structural problems (missing files, bad names) before touching any output;
2. check the output side (``nnUNet_raw``/``nnUNet_preprocessed`` set, dataset ID free or ``--overwrite``);
3. convert case by case into a hidden staging folder inside ``nnUNet_raw`` (several processes, with progress),
   collecting per-case problems (unreadable files, shape/spacing mismatches, unexpected label values);
4. only if nothing failed, rename the staging folder into place, write ``splits_final.json`` and then remove
   what ``--overwrite`` replaces. Any failure before that removes the staging folder, so nothing partial or
   half-replaced is ever left behind.

User errors are raised as :class:`ConversionError` and turned into a message plus exit code 1 by :func:`cli`.
"""
from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

MAX_LISTED_PROBLEMS = 30
NIFTI_RE = r"\.nii(?:\.gz)?"
FILE_ENDING = ".nii.gz"


class ConversionError(Exception):
    """A problem with the user's input or environment; reported without a traceback.

    Args:
        problems: one message per problem, each naming the file or option and what was expected.
        hint: optional closing advice printed after the list.
    """

    def __init__(self, problems: str | Sequence[str], hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        lines = [f"error: {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"error: ... and {len(self.problems) - len(shown)} more problems of the same kind")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class CaseError(Exception):
    """A problem with one file of one case, raised inside a worker and collected by :func:`run_cases`."""


@dataclass
class CaseResult:
    """What a worker reports for one case: blocking errors and non-blocking warnings."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Input scanning helpers
# ----------------------------------------------------------------------------------------------------------------

def require_input_folder(path: str | os.PathLike) -> Path:
    """Resolve the ``-i`` argument and fail clearly when it is missing, not a folder, or empty."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConversionError(f"input folder {p} does not exist")
    if not p.is_dir():
        raise ConversionError(f"input {p} is not a folder")
    if not any(visible_entries(p)):
        raise ConversionError(f"input folder {p} is empty")
    return p.resolve()


def visible_entries(folder: Path) -> Iterable[Path]:
    """Entries of a folder without hidden files (``.DS_Store``, ``._*`` resource forks)."""
    return (e for e in folder.iterdir() if not e.name.startswith("."))


def match_files(folder: Path, pattern: str) -> tuple[dict[str, Path], list[Path]]:
    """Split the NIfTI/other files of ``folder`` into those whose name fully matches ``pattern`` and the rest.

    Returns:
        ``({first regex group: path}, [non-matching NIfTI files])``. Non-NIfTI files are ignored.
    """
    matched: dict[str, Path] = {}
    unexpected: list[Path] = []
    rx = re.compile(pattern)
    for f in sorted(visible_entries(folder)):
        m = rx.fullmatch(f.name)
        if m and f.is_file():
            matched[m.group(1)] = f
        elif re.search(NIFTI_RE + "$", f.name):
            unexpected.append(f)
    return matched, unexpected


def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists."""
    for ending in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ending}"
        if p.is_file():
            return p
    return None


def format_ids(ids: Iterable[int], width: int) -> str:
    return ", ".join(f"{i:0{width}d}" for i in sorted(ids))


# ----------------------------------------------------------------------------------------------------------------
# Per-case work (runs in worker processes)
# ----------------------------------------------------------------------------------------------------------------

def read_image(path: Path, what: str = "image"):
    """Read a NIfTI file as a 3D SimpleITK image, rejecting unreadable, truncated and corrupt files."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except Exception as e:  # SimpleITK raises RuntimeError with a multi-line ITK dump
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else "")
        reason = reason.replace("sitk::ERROR:", "").strip()
        raise CaseError(f"{path}: cannot read this {what}; expected a NIfTI file ({reason[:200]})")
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{path}: expected a 3D single-channel {what}, found {img.GetDimension()}D with "
                        f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    check_complete(path, what)
    return img


def check_complete(path: Path, what: str) -> None:
    """SimpleITK silently zero-fills truncated NIfTI files, so compare the data length with the header and let
    gzip verify its checksum."""
    import nibabel as nib

    try:
        hdr = nib.load(str(path)).header
        expected = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape())) * hdr.get_data_dtype().itemsize
    except Exception as e:
        raise CaseError(f"{path}: cannot read the NIfTI header of this {what}; the file is truncated or corrupt ({e})")
    if path.name.endswith(".gz"):
        actual = 0
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(8 * 1024 * 1024):
                    actual += len(chunk)
        except (EOFError, OSError, zlib.error) as e:
            raise CaseError(f"{path}: this {what} is truncated or corrupt (gzip: {e})")
    else:
        actual = path.stat().st_size
    if actual < expected:
        raise CaseError(f"{path}: this {what} is truncated: {actual} bytes, the header needs {expected}")


def check_finite(arr: np.ndarray, path: Path) -> None:
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise CaseError(f"{path}: contains NaN or infinite values; expected finite intensities")


def check_same_grid(img, lbl, img_path: Path, lbl_path: Path, result: CaseResult) -> None:
    """Shape and spacing must agree (nnU-Net refuses otherwise); origin/direction only warn, as in nnU-Net."""
    if img.GetSize() != lbl.GetSize():
        result.errors.append(f"{lbl_path}: size (x, y, z) {lbl.GetSize()} does not match its image "
                             f"{img_path} {img.GetSize()}; expected identical voxel grids")
        return
    if not np.allclose(img.GetSpacing(), lbl.GetSpacing()):
        result.errors.append(f"{lbl_path}: spacing {tuple(round(s, 6) for s in lbl.GetSpacing())} does not match "
                             f"its image {img_path} {tuple(round(s, 6) for s in img.GetSpacing())}")
    if not np.allclose(img.GetOrigin(), lbl.GetOrigin(), atol=1e-3) or \
            not np.allclose(img.GetDirection(), lbl.GetDirection(), atol=1e-4):
        result.warnings.append(f"{lbl_path}: origin/direction differ slightly from {img_path} "
                               "(nnU-Net only warns about this; check the overlay if in doubt)")


def integer_labels(arr: np.ndarray, path: Path, allowed: Iterable[int]) -> np.ndarray:
    """Check that a label array holds only integral values from ``allowed``; return it as uint8."""
    allowed = sorted(set(int(a) for a in allowed))
    assert allowed[-1] < 256
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise CaseError(f"{path}: label map contains non-integer values; expected integers in "
                            f"{describe_values(allowed)}")
    if arr.dtype.kind in "iu" and arr.size and 0 <= arr.min() and arr.max() < 2 ** 16:
        values = np.flatnonzero(np.bincount(arr.ravel()))  # much faster than np.unique on 512x512xN volumes
    else:
        values = np.unique(arr).astype(np.int64)
    bad = sorted(set(values.tolist()) - set(allowed))
    if bad:
        shown = ", ".join(str(b) for b in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise CaseError(f"{path}: label values {{{shown}}} are outside the expected set {describe_values(allowed)}")
    return arr.astype(np.uint8, copy=False)


def describe_values(values: Sequence[int]) -> str:
    values = sorted(values)
    if len(values) > 3 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}, ..., {values[-1]}}}"
    return "{" + ", ".join(str(v) for v in values) + "}"


def remap(arr: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Map label values through ``mapping`` (values not in it become 0) as uint8."""
    lut = np.zeros(max(max(mapping, default=0), int(arr.max(initial=0))) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[arr]


def write_label(arr_zyx: np.ndarray, reference, out_path: Path) -> None:
    """Write a uint8 label map with the geometry of ``reference`` (the source label file's header)."""
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(arr_zyx.astype(np.uint8, copy=False))
    out.CopyInformation(reference)
    sitk.WriteImage(out, str(out_path), useCompression=True)


def copy_image_unchanged(src: Path, dst: Path) -> None:
    """Copy an image byte for byte (``.nii`` sources are only gzip-compressed), so intensities stay identical."""
    if src.name.endswith(".nii.gz"):
        shutil.copyfile(src, dst)
    else:
        with open(src, "rb") as fin, gzip.open(dst, "wb", compresslevel=6) as fout:
            shutil.copyfileobj(fin, fout, 16 * 1024 * 1024)


def write_array_image(arr_zyx: np.ndarray, out_path: Path, spacing_xyz=(1.0, 1.0, 1.0)) -> None:
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(arr_zyx)
    out.SetSpacing(tuple(float(s) for s in spacing_xyz))
    sitk.WriteImage(out, str(out_path), useCompression=True)


def convert_nifti_case(image: str, label: str | None, out_image: str, out_label: str | None,
                       allowed: Sequence[int], mapping: dict[int, int] | None) -> CaseResult:
    """Validate one image (+ optional label) pair and write it in nnU-Net's layout.

    The image is copied unchanged; the label is checked (readable, same grid, values in ``allowed``), remapped
    through ``mapping`` (``None``: keep values) and written as uint8 with its own header.
    """
    import SimpleITK as sitk

    result = CaseResult()
    image_p, label_p = Path(image), Path(label) if label else None
    try:
        img = read_image(image_p, "image")
        check_finite(sitk.GetArrayViewFromImage(img), image_p)
    except CaseError as e:
        result.errors.append(str(e))
        img = None
    lbl_arr = lbl = None
    if label_p is not None:
        try:
            lbl = read_image(label_p, "label map")
            lbl_arr = integer_labels(sitk.GetArrayViewFromImage(lbl), label_p, allowed)
        except CaseError as e:
            result.errors.append(str(e))
        if img is not None and lbl is not None:
            check_same_grid(img, lbl, image_p, label_p, result)
    if result.errors:
        return result
    copy_image_unchanged(image_p, Path(out_image))
    if lbl_arr is not None:
        out = remap(lbl_arr, mapping) if mapping is not None else lbl_arr
        write_label(out, lbl, Path(out_label))
    return result


def _call(task: tuple[Callable[..., CaseResult], dict]) -> CaseResult:
    func, kwargs = task
    try:
        return func(**kwargs)
    except CaseError as e:
        return CaseResult(errors=[str(e)])
    except OSError as e:  # disk full, permissions: name the file nnU-Net would otherwise hide in a traceback
        return CaseResult(errors=[f"{getattr(e, 'filename', None) or kwargs}: {e.strerror or e}"])


def run_cases(tasks: list[tuple[Callable[..., CaseResult], dict]], num_processes: int,
              desc: str) -> CaseResult:
    """Run case tasks (module-level function, kwargs) with a progress bar; merge their results."""
    from tqdm import tqdm

    merged = CaseResult()
    num_processes = max(1, min(num_processes, len(tasks)))
    bar = tqdm(total=len(tasks), desc=desc, unit="case", file=sys.stderr, mininterval=0.5)
    try:
        if num_processes == 1:
            results = map(_call, tasks)
            for r in results:
                merged.errors += r.errors
                merged.warnings += r.warnings
                bar.update()
        else:
            with multiprocessing.get_context().Pool(num_processes) as pool:
                for r in pool.imap_unordered(_call, tasks):
                    merged.errors += r.errors
                    merged.warnings += r.warnings
                    bar.update()
    finally:
        bar.close()
    merged.errors.sort()
    return merged


def default_num_processes() -> int:
    env = os.environ.get("nnUNet_def_n_proc")
    n = int(env) if env and env.isdigit() else 8
    return max(1, min(n, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------------------------
# Output side: environment, dataset ID, staged writing
# ----------------------------------------------------------------------------------------------------------------

def env_folder(var: str, purpose: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise ConversionError(f"environment variable {var} is not set; it must point to the folder for {purpose}",
                              hint=f"Example: export {var}=/data/{var}  (see nnU-Net's "
                                   "documentation/setting_up_paths.md)")
    return Path(value).expanduser()


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


class DatasetOutput:
    """The nnU-Net dataset folder a converter writes, created atomically.

    Args:
        dataset_id: nnU-Net dataset ID (1-999).
        name: dataset name without the ``DatasetXXX_`` prefix.
        overwrite: replace an existing dataset folder (and raw folders of other names with the same ID).
        input_folder: the converter's input, protected from being replaced.
        with_split: whether a ``splits_final.json`` will be written to ``nnUNet_preprocessed``.
    """

    def __init__(self, dataset_id: int, name: str, overwrite: bool, input_folder: Path, with_split: bool):
        if not 1 <= dataset_id <= 999:
            raise ConversionError(f"-d {dataset_id}: expected a dataset ID between 1 and 999")
        self.raw_root = env_folder("nnUNet_raw", "nnU-Net's raw datasets")
        self.pre_root = env_folder("nnUNet_preprocessed", "nnU-Net's preprocessed data (splits_final.json)") \
            if with_split else None
        self.name = f"Dataset{dataset_id:03d}_{name}"
        self.target = self.raw_root / self.name
        self.overwrite = overwrite
        self.replaced: list[Path] = []
        prefix = f"Dataset{dataset_id:03d}_"
        problems = []
        if self.raw_root.exists() and not self.raw_root.is_dir():
            problems.append(f"nnUNet_raw={self.raw_root} is not a folder")
        if self.target.exists():
            if not overwrite:
                problems.append(f"{self.target} already exists; pass --overwrite to replace it (the old folder "
                                "is removed only after the new dataset has been written completely)")
            self.replaced.append(self.target)
        others = sorted(p for p in self._dirs(self.raw_root, prefix) if p.name != self.name)
        for other in others:
            if not overwrite:
                problems.append(f"dataset ID {dataset_id} is already used by {other}; nnU-Net cannot tell two "
                                f"names with one ID apart. Choose another -d, or pass --overwrite to replace it")
            self.replaced.append(other)
        # Preprocessed data and trained models of another dataset are never deleted by a converter.
        for var in ("nnUNet_preprocessed", "nnUNet_results"):
            root = os.environ.get(var)
            if root:
                for other in self._dirs(Path(root).expanduser(), prefix):
                    if other.name != self.name:
                        problems.append(f"dataset ID {dataset_id} is already used by {other} ({var}); choose "
                                        "another -d or remove that folder yourself")
        for p in self.replaced:
            if _is_within(input_folder, p):
                problems.append(f"the input folder {input_folder} lies inside {p}, which this conversion would "
                                "replace; move the input elsewhere first")
        if problems:
            raise ConversionError(problems)
        self.staging: Path | None = None

    @staticmethod
    def _dirs(root: Path, prefix: str) -> list[Path]:
        if not root.is_dir():
            return []
        return [p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)]

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
        try:
            self.raw_root.mkdir(parents=True, exist_ok=True)
            # Hidden name without the 'Dataset' prefix: nnU-Net's ID lookup never sees a half-written dataset.
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.name}.partial-", dir=self.raw_root))
        except OSError as e:
            raise ConversionError(f"cannot create a folder in nnUNet_raw={self.raw_root}: {e.strerror or e}")
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self, splits: list[dict] | None) -> list[str]:
        """Move the staged dataset into place, write the split, then remove what it replaces.

        Returns:
            Notes for the user (e.g. stale preprocessed data).
        """
        assert self.staging is not None
        notes = []
        split_tmp = None
        created_pre_dir = None
        if splits is not None:
            pre_dir = self.split_file.parent
            if not pre_dir.exists():
                created_pre_dir = pre_dir
            try:
                pre_dir.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix=".splits_final.", suffix=".json.partial", dir=pre_dir)
                split_tmp = Path(name)
                with os.fdopen(fd, "w") as fh:
                    json.dump(splits, fh, indent=1)
            except OSError as e:
                if split_tmp is not None:
                    split_tmp.unlink(missing_ok=True)
                if created_pre_dir is not None:
                    shutil.rmtree(created_pre_dir, ignore_errors=True)
                raise ConversionError(f"cannot write {self.split_file}: {e.strerror or e}")
            if self.overwrite and self.target.exists() and \
                    any(p.name != "splits_final.json" for p in visible_entries(pre_dir)):
                notes.append(f"{pre_dir} holds preprocessed data of the replaced dataset; rerun "
                             "nnUNetv2_plan_and_preprocess before training")
        trash = []
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


# ----------------------------------------------------------------------------------------------------------------
# dataset.json and CLI
# ----------------------------------------------------------------------------------------------------------------

def write_dataset_json(folder: Path, channel: str, labels: dict[str, int], num_training: int, **extra: Any) -> None:
    """dataset.json through nnU-Net's own generator (``extra`` lands as additional keys)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(str(folder), channel_names={0: channel}, labels=dict(labels),
                          num_training_cases=num_training, file_ending=FILE_ENDING, **extra)


def add_dataset_id_arg(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("-d", "--dataset-id", dest="dataset_id", type=int, required=True, metavar="ID",
                        help=f"nnU-Net dataset ID (1-999); the output is $nnUNet_raw/DatasetXXX_{name}, e.g. "
                             f"-d 27 -> Dataset027_{name}")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DatasetXXX folder of this ID in $nnUNet_raw (whatever its name) "
                             "and a differing splits_final.json. Without it nothing existing is touched; with it "
                             "the old data is removed only after the new dataset is complete")
    parser.add_argument("-np", "--num-processes", dest="num_processes", type=int,
                        default=default_num_processes(), metavar="N",
                        help="worker processes for reading, checking and writing cases (default here: "
                             "%(default)s = min($nnUNet_def_n_proc or 8, CPU count))")


EXIT_CODES = """exit status:
  0  dataset written;  1  problem with the input, the options or $nnUNet_raw/$nnUNet_preprocessed (each
  problem is listed with the file concerned and what was expected; nothing is written or replaced);
  2  invalid command line"""


def cli(argv: list[str] | None, parser: argparse.ArgumentParser, convert: Callable[[argparse.Namespace], None]) -> int:
    """Parse arguments and run ``convert``; user errors become a message and exit code 1, usage errors 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # -h (0) or a usage error (2), already printed by argparse
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if getattr(args, "num_processes", 1) < 1:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: -np must be at least 1", file=sys.stderr)
        return 2
    try:
        convert(args)
    except ConversionError as e:
        print(e.render(), file=sys.stderr)
        print("Nothing was written.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def report(result: CaseResult) -> None:
    """Raise collected per-case errors; print warnings."""
    for w in result.warnings[:MAX_LISTED_PROBLEMS]:
        print(f"warning: {w}", file=sys.stderr)
    if len(result.warnings) > MAX_LISTED_PROBLEMS:
        print(f"warning: ... and {len(result.warnings) - MAX_LISTED_PROBLEMS} more warnings", file=sys.stderr)
    if result.errors:
        raise ConversionError(result.errors)
