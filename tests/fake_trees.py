"""Tiny fake copies of the Synapse and ACDC download layouts for the conversion tests.

Real file and folder names and label values, 32 x 32 x 4 voxels. Labels are built so that every value of the
release occurs, and the intensity of each image is a function of its case number, so tests can check remapping
voxel by voxel and that images were copied unchanged.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

# Published split IDs, each file naming its public source; the converters' own copies are checked against them.
SPLITS_DIR = Path(__file__).resolve().parent / "data" / "splits"


def load_split(name: str) -> dict:
    """A published split file from ``tests/data/splits``."""
    return json.loads((SPLITS_DIR / name).read_text())


@contextlib.contextmanager
def nnunet_env(base: Path):
    """Point nnU-Net's three folders (and its process/compile switches) at ``base`` for the duration."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (base / var).mkdir(parents=True, exist_ok=True)
            mp.setenv(var, str(base / var))
        mp.setenv("nnUNet_compile", "f")
        mp.setenv("nnUNet_def_n_proc", "1")
        yield base


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def assert_nothing_written(base: Path) -> None:
    """No dataset, no hidden staging folder, no split file left behind."""
    assert names(base / "nnUNet_raw") == set()
    assert list((base / "nnUNet_preprocessed").rglob("*")) == []


def integrity_warnings(dataset_folder: Path) -> list[str]:
    """nnU-Net's own check behind ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``: its errors raise,
    and what it only prints (geometry mismatches between image and label, label files with background only) is
    returned, one line per finding, from its per-case checks run in this process."""
    import io

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.verify_dataset_integrity import (check_cases, verify_dataset_integrity,
                                                                       verify_labels)
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    verify_dataset_integrity(str(dataset_folder), num_processes=1)
    dataset_json = load_json(str(dataset_folder / "dataset.json"))
    cases = list(get_filenames_of_train_images_and_targets(str(dataset_folder), dataset_json).values())
    reader = determine_reader_writer_from_dataset_json(dataset_json, cases[0]["images"][0])
    labels = LabelManager(dataset_json["labels"], regions_class_order=None).all_labels
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for case in cases:
            assert verify_labels(case["label"], reader, labels), case["label"]
            assert check_cases(case["images"], case["label"], len(dataset_json["channel_names"]), reader), case
    return [line for line in out.getvalue().splitlines() if line.lower().startswith(("warning", "error"))]

SHAPE_ZYX = (4, 32, 32)
SYNAPSE_SPACING = (0.8, 0.8, 3.0)
ACDC_SPACING = (1.5, 1.5, 10.0)
SYNAPSE_TRAIN = tuple(range(1, 11)) + tuple(range(21, 41))
SYNAPSE_TEST = tuple(range(61, 81))


def label_volume(max_value: int, seed: int) -> np.ndarray:
    """A label map holding every value 0..max_value in blocks, shuffled per seed."""
    rng = np.random.default_rng(seed)
    lbl = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    values = rng.permutation(np.arange(1, max_value + 1))
    for i, v in enumerate(values):
        z, r = divmod(i, 4)
        lbl[z % SHAPE_ZYX[0], 8 * r:8 * r + 6, 2:10 + (i % 5)] = v
    return lbl


def image_volume(seed: int, dtype=np.int16, low=-1000, high=1500) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, SHAPE_ZYX).astype(dtype)


def write(arr: np.ndarray, path: Path, spacing) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 5.0, 2.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def make_synapse_raw(root: Path, test_folder: str = "Testing") -> Path:
    """``root/RawData/{Training/img, Training/label, <test_folder>/img}`` like the BTCV download."""
    raw = root / "RawData"
    for n in SYNAPSE_TRAIN:
        write(image_volume(n), raw / "Training" / "img" / f"img{n:04d}.nii.gz", SYNAPSE_SPACING)
        write(label_volume(13, n), raw / "Training" / "label" / f"label{n:04d}.nii.gz", SYNAPSE_SPACING)
    for n in SYNAPSE_TEST:
        write(image_volume(n), raw / test_folder / "img" / f"img{n:04d}.nii.gz", SYNAPSE_SPACING)
    return raw


def make_synapse_transunet(root: Path, train_ids, test_ids) -> Path:
    """TransUNet's preprocessed release: ``train_npz/caseXXXX_sliceYYY.npz`` and ``test_vol_h5/caseXXXX.npy.h5``."""
    import h5py

    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir(parents=True)
    for n in train_ids:
        img = (image_volume(n, np.float32, 0, 1000) / 1000).astype(np.float32)
        lbl = label_volume(8, n).astype(np.float32)
        for z in range(SHAPE_ZYX[0]):
            np.savez(root / "train_npz" / f"case{n:04d}_slice{z:03d}.npz", image=img[z], label=lbl[z])
    for n in test_ids:
        img = (image_volume(n, np.float32, 0, 1000) / 1000).astype(np.float32)
        with h5py.File(root / "test_vol_h5" / f"case{n:04d}.npy.h5", "w") as f:
            f.create_dataset("image", data=img)
            f.create_dataset("label", data=label_volume(8, n).astype(np.float32))
    return root


def acdc_frames(n: int) -> tuple[int, int]:
    """ED/ES frame numbers of fake patient n: deliberately not always 1, so nothing can assume them."""
    return (1 if n % 3 else 4), 9 + n % 7


def _acdc_patient(folder: Path, n: int, with_gt: bool, decoy: bool = True) -> None:
    pid = f"patient{n:03d}"
    ed, es = acdc_frames(n)
    d = folder / pid
    d.mkdir(parents=True)
    (d / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 20\nWeight: 75.0\n")
    for f in (ed, es):
        write(image_volume(1000 * n + f, np.int16, 0, 400), d / f"{pid}_frame{f:02d}.nii.gz", ACDC_SPACING)
        if with_gt:
            write(label_volume(3, 1000 * n + f), d / f"{pid}_frame{f:02d}_gt.nii.gz", ACDC_SPACING)
    if decoy and ed != 1:  # a frame the converter must not take for ED just because it is frame 01
        write(image_volume(7, np.int16, 0, 400), d / f"{pid}_frame01.nii.gz", ACDC_SPACING)
    cine = sitk.JoinSeries([sitk.GetImageFromArray(image_volume(n, np.int16, 0, 400)) for _ in range(3)])
    sitk.WriteImage(cine, str(d / f"{pid}_4d.nii.gz"), useCompression=True)


def make_acdc_release(root: Path, test_patients=(101, 102, 103), nested_testing: bool = True,
                      test_without_gt=(103,)) -> Path:
    """``root/database/{training, testing[/testing]}/patientNNN`` like the ACDC download."""
    db = root / "database"
    for n in range(1, 101):
        _acdc_patient(db / "training", n, with_gt=True)
    test_dir = db / "testing" / "testing" if nested_testing else db / "testing"
    for n in test_patients:
        _acdc_patient(test_dir, n, with_gt=n not in test_without_gt)
    return db


def make_acdc_mirror(root: Path, test_patients=(101, 102)) -> Path:
    """The preprocessed mirror: ``train/patientNNN/patientNNN_sax_{ed,es}[_gt].nii.gz`` (+ ``_sax_t``), ``test/``."""
    for split, patients in (("train", range(1, 101)), ("test", test_patients)):
        for n in patients:
            d = root / split / f"patient{n:03d}"
            for i, phase in enumerate(("ed", "es")):
                write(image_volume(10 * n + i, np.uint8, 0, 255), d / f"patient{n:03d}_sax_{phase}.nii.gz",
                      (1.0, 1.0, 10.0))
                write(label_volume(3, 10 * n + i), d / f"patient{n:03d}_sax_{phase}_gt.nii.gz", (1.0, 1.0, 10.0))
            cine = sitk.JoinSeries([sitk.GetImageFromArray(image_volume(n, np.uint8, 0, 255)) for _ in range(2)])
            sitk.WriteImage(cine, str(d / f"patient{n:03d}_sax_t.nii.gz"), useCompression=True)
    return root
