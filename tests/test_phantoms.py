"""Synthetic Synapse phantoms: release layout, label values, geometry, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fias.phantoms import (
    SYNAPSE_LABELS,
    TESTING_CASES,
    TRAINING_CASES,
    generate_phantom,
    main,
    write_synapse_phantoms,
)


def test_case_numbers_match_the_release():
    assert len(TRAINING_CASES) == 30 and len(TESTING_CASES) == 20
    assert not set(range(11, 21)) & set(TRAINING_CASES)
    assert TESTING_CASES == tuple(range(61, 81))
    assert sorted(SYNAPSE_LABELS) == list(range(14))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    # Small grid keeps this fast; the layout does not depend on the size.
    return write_synapse_phantoms(tmp_path_factory.mktemp("ph"), seed=3, size=(32, 32, 6))


def test_layout_and_geometry(raw):
    imgs = sorted(p.name for p in (raw / "Training" / "img").iterdir())
    labels = sorted(p.name for p in (raw / "Training" / "label").iterdir())
    tests = sorted(p.name for p in (raw / "Testing" / "img").iterdir())
    assert imgs == [f"img{c:04d}.nii.gz" for c in TRAINING_CASES]
    assert labels == ["label" + n[3:] for n in imgs]
    assert tests == [f"img{c:04d}.nii.gz" for c in TESTING_CASES]
    assert not [p for p in raw.parent.iterdir() if p.name.startswith(".RawData")]
    img = sitk.ReadImage(str(raw / "Training" / "img" / "img0001.nii.gz"))
    lab = sitk.ReadImage(str(raw / "Training" / "label" / "label0001.nii.gz"))
    assert img.GetSize() == (32, 32, 6) == lab.GetSize()
    assert img.GetSpacing() == lab.GetSpacing() and img.GetOrigin() == lab.GetOrigin()
    sx, sy, sz = img.GetSpacing()
    assert sx == sy and sz > sx  # anisotropic: slices thicker than the in-plane spacing
    assert lab.GetPixelID() == sitk.sitkUInt8 and img.GetPixelID() == sitk.sitkInt16


def test_refuses_to_overwrite_unless_asked(raw):
    before = (raw / "Training" / "img" / "img0001.nii.gz").read_bytes()
    with pytest.raises(FileExistsError, match="RawData"):
        write_synapse_phantoms(raw.parent, seed=4, size=(32, 32, 6))
    assert (raw / "Training" / "img" / "img0001.nii.gz").read_bytes() == before
    assert main(["-o", str(raw.parent), "--size", "32x32x6"]) == 1


def test_default_size_has_all_13_organs_with_hu_like_values():
    cases = [generate_phantom(c, seed=0) for c in (1, 2, 40)]
    for p in cases:
        assert p.image.shape == p.label.shape == (16, 96, 96)  # (z, y, x)
        assert set(np.unique(p.label)) == set(range(14))
        # CT-like: air outside the body, fat, enhanced organs and vessels brighter than liver.
        assert p.image.min() <= -900 and p.image.dtype == np.int16
        liver = np.median(p.image[p.label == 6])
        assert 60 < liver < 140
        assert np.median(p.image[p.label == 8]) > liver + 60  # aorta (contrast)
        assert np.median(p.image[p.label == 4]) < liver - 50  # gallbladder (fluid)
    # Variation between cases: spacing, shapes and intensities differ.
    assert len({p.spacing for p in cases}) > 1
    assert not np.array_equal(cases[0].label, cases[1].label)
    assert abs(float(cases[0].image.mean()) - float(cases[1].image.mean())) > 0


def test_deterministic_and_order_independent():
    a = generate_phantom(5, seed=7)
    b = generate_phantom(5, seed=7)
    generate_phantom(6, seed=7)  # drawing another case in between changes nothing
    c = generate_phantom(5, seed=7)
    d = generate_phantom(5, seed=8)
    for x in (b, c):
        assert np.array_equal(a.image, x.image) and np.array_equal(a.label, x.label) and a.spacing == x.spacing
    assert not np.array_equal(a.image, d.image)


def test_written_files_are_deterministic(tmp_path):
    r1 = write_synapse_phantoms(tmp_path / "a", seed=1, size=(24, 24, 4), training_cases=(1, 2), testing_cases=(61,))
    r2 = write_synapse_phantoms(tmp_path / "b", seed=1, size=(24, 24, 4), training_cases=(2,), testing_cases=())
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(r1 / "Training" / "img" / "img0002.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(r2 / "Training" / "img" / "img0002.nii.gz")))
    assert np.array_equal(a, b)
    assert (r1 / "Testing" / "img" / "img0061.nii.gz").exists() and not (r2 / "Testing").exists()


@pytest.mark.parametrize("kwargs", [dict(size=(8, 8, 8)), dict(size=(32, 32)), dict(seed=-1)])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        generate_phantom(1, **kwargs)


def test_invalid_cases_leave_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="both"):
        write_synapse_phantoms(tmp_path, size=(24, 24, 4), training_cases=(1,), testing_cases=(1,))
    with pytest.raises(ValueError):
        write_synapse_phantoms(tmp_path, size=(8, 8, 8), training_cases=(1,), testing_cases=())
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_rawdata_and_leaves_no_staging_folder(tmp_path):
    kwargs = dict(size=(24, 24, 4), training_cases=(1,), testing_cases=())
    raw = write_synapse_phantoms(tmp_path, seed=1, **kwargs)
    (raw / "stale.txt").write_text("from the previous run")
    assert write_synapse_phantoms(tmp_path, seed=2, overwrite=True, **kwargs) == raw
    assert not (raw / "stale.txt").exists() and (raw / "Training" / "img" / "img0001.nii.gz").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["RawData"]
