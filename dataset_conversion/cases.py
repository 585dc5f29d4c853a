"""Per-case work of the converters, run in worker processes: validate one case and write it in nnU-Net's layout.

Workers are module-level functions returning a :class:`.common.CaseResult` (picklable for any multiprocessing start
method); they write only into the staging folder of :class:`.output.DatasetOutput`.
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_fias.dataset_conversion.checks import check_finite, check_same_grid, integer_labels, read_image
from nnunetv2_fias.dataset_conversion.common import CaseError, CaseResult


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
    """Write a (z, y, x) array as a compressed NIfTI file with the given spacing."""
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
