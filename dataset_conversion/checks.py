"""Reading and validating the converters' input: folder scans, file-name matching and per-file checks.

Folder scans raise :class:`.common.ConversionError` (structural problems, collected before anything is written);
the per-file checks raise :class:`.common.CaseError` inside the worker processes, so that all broken cases of one
run are reported together.
"""
from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunetv2_fias.dataset_conversion.common import NIFTI_RE, CaseError, CaseResult, ConversionError


# ------------------------------------------------------------------------------------------------ folder scans
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


def nonempty_dir(folder: Path, problems: list[str], what: str) -> bool:
    """Whether ``folder`` exists and holds visible entries; if not, append a problem describing ``what``."""
    if not folder.is_dir():
        problems.append(f"{folder} is missing; expected {what}")
        return False
    if not any(visible_entries(folder)):
        problems.append(f"{folder} is empty; expected {what}")
        return False
    return True


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
    """Sorted zero-padded case/patient numbers, comma-separated (``1, 5`` -> ``0001, 0005``)."""
    return ", ".join(f"{i:0{width}d}" for i in sorted(ids))


def describe_values(values: Sequence[int]) -> str:
    """A set of label values for messages: ``{0, ..., 13}`` for a long run, else every value."""
    values = sorted(values)
    if len(values) > 3 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}, ..., {values[-1]}}}"
    return "{" + ", ".join(str(v) for v in values) + "}"


# ------------------------------------------------------------------------------------------------ per-file checks
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
