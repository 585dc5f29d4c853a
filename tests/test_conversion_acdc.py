"""convert-acdc on tiny fake copies of the ACDC release and of the preprocessed mirror."""
from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import fake_trees as ft
from nnunetv2_fias.dataset_conversion import split_ids
from nnunetv2_fias.dataset_conversion.acdc import convert_acdc, main
from nnunetv2_fias.dataset_conversion.common import ConversionError

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}


def frames_of(n: int, layout: str = "release") -> list[str]:
    if layout == "mirror":
        return [f"patient{n:03d}_ed", f"patient{n:03d}_es"]
    return [f"patient{n:03d}_frame{f:02d}" for f in ft.acdc_frames(n)]


def cases(patients, layout="release") -> list[str]:
    return sorted(c for n in patients for c in frames_of(n, layout))


def patient_of(case: str) -> int:
    return int(case[len("patient"):len("patient000")])


def assert_patient_grouped(splits: list[dict]) -> None:
    for fold in splits:
        train = {patient_of(c) for c in fold["train"]}
        val = {patient_of(c) for c in fold["val"]}
        assert not train & val
        # both frames of every patient on the same side
        assert sorted(fold["train"] + fold["val"]) == sorted(set(fold["train"] + fold["val"]))
        for side in (fold["train"], fold["val"]):
            assert len(side) == 2 * len({patient_of(c) for c in side})


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """Release tree with the 2017 nesting testing/testing; test patient 103 has no _gt files."""
    return ft.make_acdc_release(tmp_path_factory.mktemp("acdc_src")).parent


@pytest.fixture(scope="module")
def nnunet_dataset(release, tmp_path_factory):
    base = tmp_path_factory.mktemp("acdc_nnunet")
    with ft.nnunet_env(base):
        assert main(["-i", str(release), "-d", "27", "-np", "1"]) == 0
        yield base, base / "nnUNet_raw" / "Dataset027_ACDC"


@pytest.fixture
def env(tmp_path):
    with ft.nnunet_env(tmp_path):
        yield tmp_path


def test_package_ids_match_split_files():
    mt = ft.load_split("acdc_mtunet_70train_10val_20test.json")
    assert sorted(split_ids.ACDC_MTUNET_TRAIN) == mt["train"]
    assert sorted(split_ids.ACDC_MTUNET_VAL) == mt["val"]
    assert sorted(split_ids.ACDC_MTUNET_TEST) == mt["test"]
    nf = ft.load_split("acdc_nnformer_70train_10val_20test.json")
    assert sorted(split_ids.ACDC_NNFORMER_TRAIN) == nf["train"]
    assert sorted(split_ids.ACDC_NNFORMER_VAL) == nf["val"]
    assert sorted(split_ids.ACDC_NNFORMER_TEST) == nf["test"]


def test_nnunet_protocol_files(nnunet_dataset, release):
    _, ds = nnunet_dataset
    train = cases(range(1, 101))
    assert ft.names(ds / "imagesTr") == {f"{c}_0000.nii.gz" for c in train}  # ED/ES from Info.cfg, no _4d
    assert ft.names(ds / "labelsTr") == {f"{c}.nii.gz" for c in train}
    assert ft.names(ds / "imagesTs") == {f"{c}_0000.nii.gz" for c in cases([101, 102, 103])}
    assert ft.names(ds / "labelsTs") == {f"{c}.nii.gz" for c in cases([101, 102])}
    for n in (3, 50):
        for c in frames_of(n):
            src = release / "database" / "training" / f"patient{n:03d}"
            assert filecmp.cmp(ds / "imagesTr" / f"{c}_0000.nii.gz", src / f"{c}.nii.gz", shallow=False)
            out = ft.read(ds / "labelsTr" / f"{c}.nii.gz")
            np.testing.assert_array_equal(out, ft.read(src / f"{c}_gt.nii.gz"))
            assert set(np.unique(out)) == {0, 1, 2, 3}


def test_nnunet_protocol_dataset_json(nnunet_dataset):
    dj = json.loads((nnunet_dataset[1] / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "cineMRI"}
    assert dj["labels"] == LABELS
    assert dj["numTraining"] == 200
    assert dj["file_ending"] == ".nii.gz"


def test_nnunet_protocol_split_matches_dataset027(nnunet_dataset):
    from nnunetv2.dataset_conversion.Dataset027_ACDC import create_ACDC_split

    base, ds = nnunet_dataset
    splits = json.loads((base / "nnUNet_preprocessed" / "Dataset027_ACDC" / "splits_final.json").read_text())
    reference = ft.load_split("acdc_nnunet_dataset027_5fold_computed.json")["folds"]
    assert len(splits) == 5
    for fold, ref in zip(splits, reference):
        assert sorted(fold["val"]) == cases(ref["val_patients"])
        assert sorted(fold["train"]) == cases(set(range(1, 101)) - set(ref["val_patients"]))
    assert_patient_grouped(splits)
    # identical to what nnU-Net's own ACDC converter writes for these files
    own = create_ACDC_split(str(ds / "labelsTr"))
    assert [(sorted(s["train"]), sorted(s["val"])) for s in splits] == \
           [(sorted(s["train"]), sorted(s["val"])) for s in own]


def test_nnunet_protocol_passes_nnunet_integrity_check(nnunet_dataset):
    assert ft.integrity_warnings(nnunet_dataset[1]) == []  # its errors raise; its warnings are listed


@pytest.mark.parametrize("protocol,split_file", [("transunet", "acdc_mtunet_70train_10val_20test.json"),
                                                 ("nnformer", "acdc_nnformer_70train_10val_20test.json")])
def test_70_10_20_protocols(release, env, protocol, split_file):
    mt = ft.load_split(split_file)
    assert main(["-i", str(release / "database"), "-d", "28", "--protocol", protocol, "-np", "2"]) == 0
    ds = env / "nnUNet_raw" / "Dataset028_ACDC"
    assert ft.names(ds / "imagesTr") == {f"{c}_0000.nii.gz" for c in cases(mt["train"] + mt["val"])}
    assert ft.names(ds / "labelsTr") == {f"{c}.nii.gz" for c in cases(mt["train"] + mt["val"])}
    assert ft.names(ds / "imagesTs") == {f"{c}_0000.nii.gz" for c in cases(mt["test"])}
    assert ft.names(ds / "labelsTs") == {f"{c}.nii.gz" for c in cases(mt["test"])}
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 160
    splits = json.loads((env / "nnUNet_preprocessed" / "Dataset028_ACDC" / "splits_final.json").read_text())
    assert len(splits) == 1
    assert sorted(splits[0]["train"]) == cases(mt["train"])
    assert sorted(splits[0]["val"]) == cases(mt["val"])
    assert_patient_grouped(splits)


def test_flat_testing_folder(release, env, tmp_path):
    src = tmp_path / "database"
    shutil.copytree(release / "database", src)
    for p in (src / "testing" / "testing").iterdir():
        p.rename(src / "testing" / p.name)
    (src / "testing" / "testing").rmdir()
    assert main(["-i", str(src), "-d", "29", "-np", "1"]) == 0
    ds = env / "nnUNet_raw" / "Dataset029_ACDC"
    assert ft.names(ds / "imagesTs") == {f"{c}_0000.nii.gz" for c in cases([101, 102, 103])}


def test_mirror_layout(env, tmp_path):
    src = ft.make_acdc_mirror(tmp_path / "acdc_mirror")
    assert main(["-i", str(src), "-d", "30", "-np", "1"]) == 0
    ds = env / "nnUNet_raw" / "Dataset030_ACDC"
    train = cases(range(1, 101), "mirror")
    assert ft.names(ds / "imagesTr") == {f"{c}_0000.nii.gz" for c in train}  # _sax_t never converted
    assert ft.names(ds / "labelsTs") == {f"{c}.nii.gz" for c in cases([101, 102], "mirror")}
    assert filecmp.cmp(ds / "imagesTr" / "patient007_es_0000.nii.gz",
                       src / "train" / "patient007" / "patient007_sax_es.nii.gz", shallow=False)
    splits = json.loads((env / "nnUNet_preprocessed" / "Dataset030_ACDC" / "splits_final.json").read_text())
    reference = ft.load_split("acdc_nnunet_dataset027_5fold_computed.json")["folds"]
    assert [sorted(f["val"]) for f in splits] == [cases(r["val_patients"], "mirror") for r in reference]
    assert_patient_grouped(splits)
    assert ft.integrity_warnings(ds) == []


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def bad_copy(release, tmp_path) -> Path:
    dst = tmp_path / "acdc"
    shutil.copytree(release / "database", dst / "database")
    return dst / "database" / "training"


def expect_problem(src: Path, *fragments: str, protocol: str = "nnunet") -> list[str]:
    with pytest.raises(ConversionError) as e:
        convert_acdc(src, 31, protocol=protocol)
    assert any(all(f in p for f in fragments) for p in e.value.problems), e.value.problems
    return e.value.problems


def test_structural_problems_all_reported(bad_copy, env):
    (bad_copy / "patient010" / "Info.cfg").unlink()
    cfg = bad_copy / "patient011" / "Info.cfg"
    cfg.write_text("\n".join(ln for ln in cfg.read_text().splitlines() if not ln.startswith("ES")))
    es = ft.acdc_frames(12)[1]
    (bad_copy / "patient012" / f"patient012_frame{es:02d}.nii.gz").unlink()
    ed = ft.acdc_frames(14)[0]
    (bad_copy / "patient014" / f"patient014_frame{ed:02d}_gt.nii.gz").unlink()
    shutil.rmtree(bad_copy / "patient015")
    src = bad_copy.parent.parent
    expect_problem(src, "patient010", "Info.cfg")
    expect_problem(src, "patient011/Info.cfg", "ES")
    expect_problem(src, f"patient012_frame{es:02d}.nii.gz", "ES")
    expect_problem(src, f"patient014_frame{ed:02d}_gt.nii.gz")
    expect_problem(src, "015", "missing")
    assert main(["-i", str(src), "-d", "31"]) == 1
    ft.assert_nothing_written(env)


def test_test_patient_without_info_cfg(bad_copy, env):
    (bad_copy.parent / "testing" / "testing" / "patient101" / "Info.cfg").unlink()
    expect_problem(bad_copy.parent.parent, "patient101", "Info.cfg")
    ft.assert_nothing_written(env)


def test_per_case_problems_all_reported(bad_copy, env):
    def replace(n: int, suffix: str, arr, spacing=ft.ACDC_SPACING):
        f = bad_copy / f"patient{n:03d}" / f"{frames_of(n)[0]}{suffix}.nii.gz"
        f.unlink()
        ft.write(arr, f, spacing)
        return f.name

    shape = replace(1, "_gt", np.zeros((4, 32, 30), np.uint8))
    spacing = replace(4, "_gt", ft.label_volume(3, 4), (1.5, 1.5, 6.0))
    lbl = ft.label_volume(3, 5)
    lbl[1, 1, 1] = 4
    values = replace(5, "_gt", lbl)
    corrupt = bad_copy / "patient006" / f"{frames_of(6)[1]}.nii.gz"
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) - 40])
    src = bad_copy.parent.parent
    problems = expect_problem(src, shape, "size", protocol="transunet")
    assert any(spacing in p and "spacing" in p for p in problems)
    assert any(values in p and "{4}" in p for p in problems)
    assert any(corrupt.name in p and "truncated" in p for p in problems)
    ft.assert_nothing_written(env)


@pytest.mark.parametrize("layout", ["missing", "empty", "unknown"])
def test_missing_empty_or_unknown_input(env, tmp_path, layout):
    src = tmp_path / "in"
    if layout != "missing":
        src.mkdir()
    if layout == "unknown":
        (src / "training").mkdir()
        (src / "training" / "notes.txt").write_text("no patients")
    assert main(["-i", str(src), "-d", "32"]) == 1
    ft.assert_nothing_written(env)


def test_nnunet_raw_unset(release, env, monkeypatch):
    monkeypatch.delenv("nnUNet_raw")
    assert main(["-i", str(release), "-d", "33"]) == 1
    ft.assert_nothing_written(env)


def test_existing_dataset_needs_overwrite(release, env):
    ds = env / "nnUNet_raw" / "Dataset034_ACDC"
    ds.mkdir()
    assert main(["-i", str(release), "-d", "34", "--protocol", "transunet"]) == 1
    assert ft.names(ds) == set()
    assert not (env / "nnUNet_preprocessed" / "Dataset034_ACDC").exists()


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "--protocol" in capsys.readouterr().out
    assert main(["-i", "x", "-d", "1", "--protocol", "mtunet"]) == 2


def test_release_without_testing_folder(bad_copy, env):
    shutil.rmtree(bad_copy.parent / "testing")
    assert main(["-i", str(bad_copy.parent), "-d", "35", "-np", "1"]) == 0
    ds = env / "nnUNet_raw" / "Dataset035_ACDC"
    assert len(ft.names(ds / "imagesTr")) == 200 and not (ds / "imagesTs").exists()


def test_missing_nnunet_raw_fails_first_and_is_not_created(release, env, monkeypatch, capsys, tmp_path):
    """As in `nnunetv2_fias doctor`, a missing nnUNet_raw is an error: nothing is read, created or written."""
    missing = tmp_path / "not_created" / "nnUNet_raw"
    monkeypatch.setenv("nnUNet_raw", str(missing))
    assert main(["-i", str(release), "-d", "36"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"nnUNet_raw={missing}" in errors[0]
    assert not (tmp_path / "not_created").exists()
    assert list((env / "nnUNet_preprocessed").iterdir()) == []


@pytest.mark.parametrize("argv, status", [
    (["--no-such-option"], 2), (["-d", "5"], 2), (["-i", "x", "-d", "5", "--protocol", "mtunet"], 2),
    (["-i", "/no/such/folder", "-d", "5"], 1), (["-h"], 0),
])
def test_exit_status_through_the_console_command(env, argv, status):
    from nnunetv2_fias import cli

    assert cli.main(["convert-acdc", *argv]) == status
    ft.assert_nothing_written(env)
