"""TransUNet's preprocessed release of Synapse (``train_npz/`` slices, ``test_vol_h5/`` volumes) for convert-synapse.

TransUNet stores the 18 training cases as 2D slices ``caseXXXX_sliceYYY.npz`` (arrays ``image``, ``label``) and the
12 test cases as volumes ``caseXXXX.npy.h5`` (datasets ``image``, ``label``, slices along axis 0). This module finds
them and stacks them back into volumes; :mod:`.synapse` decides the label mapping and writes the dataset.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from nnunetv2_fias.dataset_conversion.cases import remap, write_array_image
from nnunetv2_fias.dataset_conversion.checks import check_finite, format_ids, integer_labels, nonempty_dir
from nnunetv2_fias.dataset_conversion.common import CaseError, CaseResult, ConversionError
from nnunetv2_fias.dataset_conversion.split_ids import SYNAPSE_TRANSUNET_TEST, SYNAPSE_TRANSUNET_TRAIN

TRAIN_NPZ_RE = re.compile(r"case(\d{4})_slice(\d{3,4})\.npz")
TEST_H5_RE = re.compile(r"case(\d{4})\.npy\.h5")


def case_name(number: int) -> str:
    """TransUNet's case names, used for the output files too."""
    return f"case{number:04d}"


def scan_transunet(root: Path) -> tuple[dict[int, list[Path]], dict[int, Path]]:
    """Group TransUNet's training slices by case and find its test volumes; raise on structural problems."""
    problems: list[str] = []
    slices: dict[int, dict[int, Path]] = {}
    vols: dict[int, Path] = {}
    npz_dir, h5_dir = root / "train_npz", root / "test_vol_h5"
    if nonempty_dir(npz_dir, problems, "TransUNet's training slices caseXXXX_sliceYYY.npz"):
        for f in sorted(npz_dir.iterdir()):
            m = TRAIN_NPZ_RE.fullmatch(f.name)
            if m:
                slices.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
            elif f.name.endswith(".npz"):
                problems.append(f"{f}: unexpected file name; expected caseXXXX_sliceYYY.npz")
        for case, by_index in sorted(slices.items()):
            gaps = sorted(set(range(max(by_index) + 1)) - set(by_index))
            if gaps:
                problems.append(f"{npz_dir}: {case_name(case)} lacks slice(s) {', '.join(f'{g:03d}' for g in gaps)}"
                                "; expected consecutive slices from 000")
        if slices and set(slices) != set(SYNAPSE_TRANSUNET_TRAIN):
            problems.append(f"{npz_dir}: found cases {format_ids(slices, 4)}; expected TransUNet's 18 training "
                            f"cases {format_ids(SYNAPSE_TRANSUNET_TRAIN, 4)}")
    if nonempty_dir(h5_dir, problems, "TransUNet's test volumes caseXXXX.npy.h5"):
        for f in sorted(h5_dir.iterdir()):
            m = TEST_H5_RE.fullmatch(f.name)
            if m:
                vols[int(m.group(1))] = f
            elif f.name.endswith(".h5"):
                problems.append(f"{f}: unexpected file name; expected caseXXXX.npy.h5")
        if vols and set(vols) != set(SYNAPSE_TRANSUNET_TEST):
            problems.append(f"{h5_dir}: found cases {format_ids(vols, 4)}; expected TransUNet's 12 test cases "
                            f"{format_ids(SYNAPSE_TRANSUNET_TEST, 4)}")
    if problems:
        raise ConversionError(problems)
    return {c: [s[i] for i in sorted(s)] for c, s in sorted(slices.items())}, vols


# ----------------------------------------------------------------------------------------------------------------
# Workers (module level: picklable for any multiprocessing start method)
# ----------------------------------------------------------------------------------------------------------------

def _checked_pair(image, label, where: str) -> tuple[np.ndarray, np.ndarray]:
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape:
        raise CaseError(f"{where}: image shape {image.shape} differs from label shape {label.shape}; "
                        "expected identical shapes")
    check_finite(image, Path(where))
    return image, label


def convert_transunet_train_case(slices: list[str], out_image: str, out_label: str,
                                 mapping: dict[int, int]) -> CaseResult:
    """Stack a case's npz slices (axis 0 = slice index) into a volume and write image + remapped label."""
    images, labels = [], []
    for s in slices:
        try:
            with np.load(s) as z:
                if "image" not in z.files or "label" not in z.files:
                    raise CaseError(f"{s}: expected arrays 'image' and 'label', found {z.files}")
                image, label = _checked_pair(z["image"], z["label"], s)
        except CaseError:
            raise
        except Exception as e:  # zipfile/pickle errors of a damaged archive
            raise CaseError(f"{s}: cannot read this npz file (corrupt or not an npz archive: {e})")
        if image.ndim != 2:
            raise CaseError(f"{s}: expected a 2D slice, found shape {image.shape}")
        if images and image.shape != images[0].shape:
            raise CaseError(f"{s}: slice shape {image.shape} differs from {slices[0]} {images[0].shape}")
        images.append(image)
        labels.append(integer_labels(label, Path(s), range(9)))
    write_array_image(np.stack(images).astype(np.float32), Path(out_image))
    write_array_image(remap(np.stack(labels), mapping), Path(out_label))
    return CaseResult()


def convert_transunet_test_case(volume: str, out_image: str, out_label: str, mapping: dict[int, int]) -> CaseResult:
    """Write one ``caseXXXX.npy.h5`` test volume (datasets ``image``/``label``, slices along axis 0)."""
    import h5py

    try:
        with h5py.File(volume, "r") as f:
            if "image" not in f or "label" not in f:
                raise CaseError(f"{volume}: expected datasets 'image' and 'label', found {sorted(f.keys())}")
            image, label = _checked_pair(f["image"][()], f["label"][()], volume)
    except CaseError:
        raise
    except Exception as e:
        raise CaseError(f"{volume}: cannot read this HDF5 file (corrupt or not HDF5: {e})")
    if image.ndim != 3:
        raise CaseError(f"{volume}: expected a 3D volume (slices, rows, columns), found shape {image.shape}")
    label = integer_labels(label, Path(volume), range(9))
    write_array_image(image.astype(np.float32), Path(out_image))
    write_array_image(remap(label, mapping), Path(out_label))
    return CaseResult()
