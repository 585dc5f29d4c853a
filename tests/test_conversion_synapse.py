"""convert-synapse on tiny fake copies of the raw release and of TransUNet's preprocessed release."""
from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import fake_trees as ft
from nnunetv2_fias.dataset_conversion import split_ids
from nnunetv2_fias.dataset_conversion.common import ConversionError
from nnunetv2_fias.dataset_conversion.synapse import convert_synapse, main

# Dataset facts (label values, case lists, spacing rules), written out independently of the converter.
RAW = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "esophagus": 5, "liver": 6,
       "stomach": 7, "aorta": 8, "inferior_vena_cava": 9, "portal_vein_and_splenic_vein": 10, "pancreas": 11,
       "adrenal_gland_right": 12, "adrenal_gland_left": 13}
EIGHT = {"background": 0, "aorta": 1, "gallbladder": 2, "kidney_left": 3, "kidney_right": 4, "liver": 5,
         "pancreas": 6, "spleen": 7, "stomach": 8}
RAW_ORDER = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas"]


def lut_8() -> np.ndarray:
    lut = np.zeros(14, dtype=np.uint8)
    for organ, value in EIGHT.items():
        if organ != "background":
            lut[RAW[organ]] = value
    return lut


def case(n: int) -> str:
    return f"case{n:04d}"


@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory) -> Path:
    return ft.make_synapse_raw(tmp_path_factory.mktemp("synapse_src"), test_folder="Test")


@pytest.fixture(scope="module")
def transunet_split() -> dict:
    return ft.load_split("synapse_transunet_18train_12test.json")


@pytest.fixture(scope="module")
def transunet_dataset(raw_tree, tmp_path_factory):
    """Default conversion (--protocol transunet, 8 labels) of the fake raw release, through the CLI entry."""
    base = tmp_path_factory.mktemp("synapse_transunet")
    with ft.nnunet_env(base):
        assert main(["-i", str(raw_tree), "-d", "11", "-np", "1"]) == 0
        yield base, base / "nnUNet_raw" / "Dataset011_Synapse"


@pytest.fixture
def env(tmp_path):
    with ft.nnunet_env(tmp_path):
        yield tmp_path


def test_package_ids_match_split_files(transunet_split):
    assert sorted(split_ids.SYNAPSE_TRANSUNET_TRAIN) == sorted(transunet_split["train"])
    assert sorted(split_ids.SYNAPSE_TRANSUNET_TEST) == sorted(transunet_split["test"])
    monai = ft.load_split("btcv_monai_dataset0_24train_6val.json")
    assert sorted(split_ids.SYNAPSE_LABELLED) == sorted(monai["train"] + monai["val"])
    assert sorted(split_ids.SYNAPSE_UNLABELLED) == sorted(monai["test_unlabeled"])


def test_transunet_protocol_files_match_split(transunet_dataset, transunet_split):
    _, ds = transunet_dataset
    train, test = transunet_split["train"], transunet_split["test"]
    assert ft.names(ds / "imagesTr") == {f"{case(n)}_0000.nii.gz" for n in train}
    assert ft.names(ds / "labelsTr") == {f"{case(n)}.nii.gz" for n in train}
    assert ft.names(ds / "imagesTs") == {f"{case(n)}_0000.nii.gz" for n in test}
    assert ft.names(ds / "labelsTs") == {f"{case(n)}.nii.gz" for n in test}


def test_transunet_protocol_labels_and_images(transunet_dataset, raw_tree):
    _, ds = transunet_dataset
    lut = lut_8()
    for n in ft.SYNAPSE_TRAIN:
        sub = "Tr" if n in split_ids.SYNAPSE_TRANSUNET_TRAIN else "Ts"
        out = ft.read(ds / f"labels{sub}" / f"{case(n)}.nii.gz")
        src = ft.read(raw_tree / "Training" / "label" / f"label{n:04d}.nii.gz")
        np.testing.assert_array_equal(out, lut[src])
        assert set(np.unique(out)) == set(range(9))
        assert filecmp.cmp(ds / f"images{sub}" / f"{case(n)}_0000.nii.gz",
                           raw_tree / "Training" / "img" / f"img{n:04d}.nii.gz", shallow=False)
    img = sitk.ReadImage(str(ds / "labelsTr" / "case0005.nii.gz"))
    assert img.GetSpacing() == pytest.approx(ft.SYNAPSE_SPACING)


def test_transunet_protocol_dataset_json(transunet_dataset):
    _, ds = transunet_dataset
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == EIGHT
    assert dj["numTraining"] == 18
    assert dj["file_ending"] == ".nii.gz"


def test_transunet_protocol_split_is_nnunet_default_over_18(transunet_dataset, transunet_split):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    base, _ = transunet_dataset
    splits = json.loads((base / "nnUNet_preprocessed" / "Dataset011_Synapse" / "splits_final.json").read_text())
    train = sorted(case(n) for n in transunet_split["train"])
    assert len(splits) == 5
    assert sorted(c for s in splits for c in s["val"]) == train
    for s in splits:
        assert sorted(s["train"] + s["val"]) == train
    # What nnU-Net's trainer computes itself when splits_final.json is absent (nnUNetTrainer.do_split).
    expected = generate_crossval_split(train, seed=12345, n_splits=5)
    assert [(sorted(s["train"]), sorted(s["val"])) for s in splits] == \
           [(sorted(map(str, e["train"])), sorted(map(str, e["val"]))) for e in expected]


def test_transunet_protocol_passes_nnunet_integrity_check(transunet_dataset):
    assert ft.integrity_warnings(transunet_dataset[1]) == []  # its errors raise; its warnings are listed


def test_protocol_all_13_labels_and_default_split(raw_tree, env):
    assert main(["-i", str(raw_tree.parent), "-d", "12", "--protocol", "all", "-np", "2"]) == 0
    ds = env / "nnUNet_raw" / "Dataset012_Synapse"
    assert ft.names(ds / "imagesTr") == {f"{case(n)}_0000.nii.gz" for n in ft.SYNAPSE_TRAIN}
    assert ft.names(ds / "labelsTr") == {f"{case(n)}.nii.gz" for n in ft.SYNAPSE_TRAIN}
    assert ft.names(ds / "imagesTs") == {f"{case(n)}_0000.nii.gz" for n in ft.SYNAPSE_TEST}
    assert not (ds / "labelsTs").exists()
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, **RAW}
    assert dj["numTraining"] == 30 and dj["channel_names"] == {"0": "CT"}
    for n in (1, 40):
        np.testing.assert_array_equal(ft.read(ds / "labelsTr" / f"{case(n)}.nii.gz"),
                                      ft.read(raw_tree / "Training" / "label" / f"label{n:04d}.nii.gz"))
    assert filecmp.cmp(ds / "imagesTs" / "case0061_0000.nii.gz", raw_tree / "Test" / "img" / "img0061.nii.gz",
                       shallow=False)
    reference = ft.load_split("btcv_nnunet_default_5fold_computed.json")["folds"]
    splits = json.loads((env / "nnUNet_preprocessed" / "Dataset012_Synapse" / "splits_final.json").read_text())
    assert [(sorted(s["train"]), sorted(s["val"])) for s in splits] == \
           [(sorted(case(n) for n in f["train"]), sorted(case(n) for n in f["val"])) for f in reference]


def test_transunet_protocol_with_13_labels_keeps_release_values(raw_tree, env):
    assert main(["-i", str(raw_tree), "-d", "13", "--labels", "13", "-np", "1"]) == 0
    ds = env / "nnUNet_raw" / "Dataset013_Synapse"
    assert json.loads((ds / "dataset.json").read_text())["labels"] == {"background": 0, **RAW}
    np.testing.assert_array_equal(ft.read(ds / "labelsTs" / "case0001.nii.gz"),
                                  ft.read(raw_tree / "Training" / "label" / "label0001.nii.gz"))
    assert len(ft.names(ds / "imagesTr")) == 18


# --------------------------------------------------------------------------------------------------------------
# TransUNet's preprocessed release
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def npz_tree(tmp_path_factory, transunet_split) -> Path:
    pytest.importorskip("h5py")
    return ft.make_synapse_transunet(tmp_path_factory.mktemp("synapse_npz") / "Synapse",
                                     transunet_split["train"], transunet_split["test"])


@pytest.mark.parametrize("order", ["raw", "alphabetical", ",".join(reversed(RAW_ORDER))])
def test_transunet_release_reassembled_with_explicit_label_order(npz_tree, env, transunet_split, order):
    import h5py

    assert main(["-i", str(npz_tree), "-d", "14", "--label-order", order, "-np", "1"]) == 0
    ds = env / "nnUNet_raw" / "Dataset014_Synapse"
    names_in_order = {"raw": RAW_ORDER, "alphabetical": sorted(RAW_ORDER)}.get(order, order.split(","))
    lut = np.array([0] + [EIGHT[name] for name in names_in_order], dtype=np.uint8)
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"] == EIGHT and dj["numTraining"] == 18
    assert dj["channel_names"] == {"0": "noNorm"}  # already clipped/scaled: no CT normalisation again
    assert ft.names(ds / "labelsTs") == {f"{case(n)}.nii.gz" for n in transunet_split["test"]}
    n = transunet_split["train"][0]
    slices = [np.load(npz_tree / "train_npz" / f"{case(n)}_slice{z:03d}.npz") for z in range(ft.SHAPE_ZYX[0])]
    np.testing.assert_array_equal(ft.read(ds / "imagesTr" / f"{case(n)}_0000.nii.gz"),
                                  np.stack([s["image"] for s in slices]))
    np.testing.assert_array_equal(ft.read(ds / "labelsTr" / f"{case(n)}.nii.gz"),
                                  lut[np.stack([s["label"] for s in slices]).astype(int)])
    t = transunet_split["test"][0]
    with h5py.File(npz_tree / "test_vol_h5" / f"{case(t)}.npy.h5") as f:
        np.testing.assert_array_equal(ft.read(ds / "imagesTs" / f"{case(t)}_0000.nii.gz"), f["image"][()])
        np.testing.assert_array_equal(ft.read(ds / "labelsTs" / f"{case(t)}.nii.gz"),
                                      lut[f["label"][()].astype(int)])
    if order == "raw":
        assert ft.integrity_warnings(ds) == []


@pytest.mark.parametrize("extra", [[], ["--protocol", "all", "--label-order", "raw"],
                                   ["--labels", "13", "--label-order", "raw"], ["--label-order", "liver,spleen"]])
def test_transunet_release_bad_options(npz_tree, env, extra):
    assert main(["-i", str(npz_tree), "-d", "15", *extra]) == 1
    ft.assert_nothing_written(env)


def test_label_order_rejected_for_raw_release(raw_tree, env):
    assert main(["-i", str(raw_tree), "-d", "15", "--label-order", "raw"]) == 1
    ft.assert_nothing_written(env)


def test_transunet_release_corrupt_and_incomplete(npz_tree, env, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(npz_tree, bad)
    (bad / "train_npz" / "case0005_slice001.npz").unlink()
    (bad / "test_vol_h5" / "case0001.npy.h5").write_bytes(b"not hdf5")
    with pytest.raises(ConversionError) as e:
        convert_synapse(bad, 16, label_order="raw")
    assert any("case0005" in p and "001" in p for p in e.value.problems)
    (bad / "train_npz" / "case0005_slice001.npz").write_bytes(b"PK broken")
    with pytest.raises(ConversionError) as e:
        convert_synapse(bad, 16, label_order="raw")
    text = "\n".join(e.value.problems)
    assert "case0005_slice001.npz" in text and "case0001.npy.h5" in text
    ft.assert_nothing_written(env)


# --------------------------------------------------------------------------------------------------------------
# Bad input: clear error naming the file, exit code 1, nothing written
# --------------------------------------------------------------------------------------------------------------

def copy_tree(raw_tree: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src" / "RawData"
    shutil.copytree(raw_tree, dst)
    return dst


def replace(path: Path, arr: np.ndarray, spacing) -> None:
    path.unlink()
    ft.write(arr, path, spacing)


@pytest.fixture(scope="module")
def per_case_failure(raw_tree, tmp_path_factory):
    """One conversion of a tree with a different per-case fault in several cases; all must be reported."""
    base = tmp_path_factory.mktemp("synapse_bad")
    src = copy_tree(raw_tree, base)
    tr = src / "Training"
    replace(tr / "label" / "label0005.nii.gz", np.zeros((4, 30, 32), np.uint8), ft.SYNAPSE_SPACING)
    replace(tr / "label" / "label0006.nii.gz", ft.label_volume(13, 6), (0.8, 0.8, 5.0))
    lbl = ft.label_volume(13, 7)
    lbl[0, 0, 0] = 14
    replace(tr / "label" / "label0007.nii.gz", lbl, ft.SYNAPSE_SPACING)
    replace(tr / "label" / "label0009.nii.gz", ft.label_volume(13, 9).astype(np.float32) + 0.5, ft.SYNAPSE_SPACING)
    data = (tr / "img" / "img0010.nii.gz").read_bytes()
    (tr / "img" / "img0010.nii.gz").write_bytes(data[: len(data) // 2])  # truncated download
    (tr / "label" / "label0021.nii.gz").write_bytes(b"this is not a NIfTI file")
    with ft.nnunet_env(base / "out"):
        with pytest.raises(ConversionError) as e:
            convert_synapse(src.parent, 17, num_processes=1)
        ft.assert_nothing_written(base / "out")
        assert main(["-i", str(src.parent), "-d", "17", "-np", "1"]) == 1
        ft.assert_nothing_written(base / "out")
    return e.value.problems


@pytest.mark.parametrize("file, what", [
    ("label0005.nii.gz", "size"), ("label0006.nii.gz", "spacing"), ("label0007.nii.gz", "14"),
    ("label0009.nii.gz", "non-integer"), ("img0010.nii.gz", "truncated"), ("label0021.nii.gz", "cannot read"),
])
def test_per_case_problem_reported(per_case_failure, file, what):
    assert any(file in p and what in p for p in per_case_failure), per_case_failure


def test_image_without_label_and_label_without_image(raw_tree, env, tmp_path):
    src = copy_tree(raw_tree, tmp_path)
    (src / "Training" / "label" / "label0005.nii.gz").unlink()
    (src / "Training" / "img" / "img0006.nii.gz").unlink()
    with pytest.raises(ConversionError) as e:
        convert_synapse(src, 18)
    assert any("img0005.nii.gz" in p and "label0005.nii.gz" in p for p in e.value.problems)
    assert any("label0006.nii.gz" in p and "img0006.nii.gz" in p for p in e.value.problems)
    ft.assert_nothing_written(env)


def test_missing_and_unexpected_cases(raw_tree, env, tmp_path):
    src = copy_tree(raw_tree, tmp_path)
    for sub, prefix in (("img", "img"), ("label", "label")):
        (src / "Training" / sub / f"{prefix}0040.nii.gz").rename(src / "Training" / sub / f"{prefix}0015.nii.gz")
    with pytest.raises(ConversionError) as e:
        convert_synapse(src, 18)
    text = "\n".join(e.value.problems)
    assert "0040" in text and "0015" in text
    ft.assert_nothing_written(env)


@pytest.mark.parametrize("layout", ["missing", "empty", "no_training", "empty_img"])
def test_missing_or_empty_input(env, tmp_path, raw_tree, layout):
    src = tmp_path / "in"
    if layout != "missing":
        src.mkdir()
    if layout == "no_training":
        (src / "readme.txt").write_text("x")
    if layout == "empty_img":
        src = copy_tree(raw_tree, tmp_path)
        shutil.rmtree(src / "Training" / "img")
        (src / "Training" / "img").mkdir()
    assert main(["-i", str(src), "-d", "19"]) == 1
    ft.assert_nothing_written(env)


def test_two_test_folders_is_ambiguous(raw_tree, env, tmp_path):
    src = copy_tree(raw_tree, tmp_path)
    shutil.copytree(src / "Test", src / "Testing")
    with pytest.raises(ConversionError) as e:
        convert_synapse(src, 19, protocol="all")
    assert any("Testing" in p and "Test" in p for p in e.value.problems)


@pytest.mark.parametrize("var", ["nnUNet_raw", "nnUNet_preprocessed"])
def test_nnunet_folder_unset(raw_tree, env, monkeypatch, var):
    monkeypatch.delenv(var)
    assert main(["-i", str(raw_tree), "-d", "20"]) == 1
    ft.assert_nothing_written(env)


def test_existing_dataset_needs_overwrite_and_survives_failures(raw_tree, env, tmp_path):
    ds = env / "nnUNet_raw" / "Dataset021_Synapse"
    ds.mkdir()
    (ds / "marker").write_text("old")
    assert main(["-i", str(raw_tree), "-d", "21"]) == 1
    assert (ds / "marker").read_text() == "old"
    # --overwrite with bad input: the old dataset must survive untouched.
    bad = copy_tree(raw_tree, tmp_path)
    (bad / "Training" / "label" / "label0039.nii.gz").write_bytes(b"garbage")
    assert main(["-i", str(bad), "-d", "21", "--overwrite"]) == 1
    assert ft.names(ds) == {"marker"}
    assert ft.names(env / "nnUNet_raw") == {"Dataset021_Synapse"}
    assert main(["-i", str(raw_tree), "-d", "21", "--overwrite"]) == 0
    assert not (ds / "marker").exists() and (ds / "dataset.json").is_file()
    assert ft.names(env / "nnUNet_raw") == {"Dataset021_Synapse"}


def test_dataset_id_used_by_another_name(raw_tree, env):
    other = env / "nnUNet_raw" / "Dataset022_Other"
    other.mkdir()
    assert main(["-i", str(raw_tree), "-d", "22"]) == 1
    assert other.is_dir()
    assert main(["-i", str(raw_tree), "-d", "22", "--overwrite"]) == 0
    assert ft.names(env / "nnUNet_raw") == {"Dataset022_Synapse"}
    # Preprocessed data or trained models of another dataset are never deleted, even with --overwrite.
    (env / "nnUNet_results" / "Dataset023_Trained").mkdir()
    assert main(["-i", str(raw_tree), "-d", "23", "--overwrite"]) == 1
    assert (env / "nnUNet_results" / "Dataset023_Trained").is_dir()
    assert not (env / "nnUNet_raw" / "Dataset023_Synapse").exists()


def test_differing_split_file_needs_overwrite(raw_tree, env):
    split = env / "nnUNet_preprocessed" / "Dataset024_Synapse" / "splits_final.json"
    split.parent.mkdir()
    split.write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    assert main(["-i", str(raw_tree), "-d", "24"]) == 1
    assert json.loads(split.read_text()) == [{"train": ["a"], "val": ["b"]}]
    assert not (env / "nnUNet_raw" / "Dataset024_Synapse").exists()
    assert main(["-i", str(raw_tree), "-d", "24", "--overwrite"]) == 0
    assert len(json.loads(split.read_text())) == 5


def test_input_inside_replaced_dataset_is_refused(raw_tree, env):
    inside = env / "nnUNet_raw" / "Dataset025_Synapse" / "RawData"
    shutil.copytree(raw_tree, inside)
    assert main(["-i", str(inside), "-d", "25", "--overwrite"]) == 1
    assert (inside / "Training" / "img" / "img0001.nii.gz").is_file()


def test_help_and_usage_errors(capsys):
    assert main(["-h"]) == 0
    assert "--label-order" in capsys.readouterr().out
    assert main(["-i", "x"]) == 2  # -d missing
    assert main(["-i", "x", "-d", "1", "--labels", "9"]) == 2


@pytest.mark.parametrize("dataset_id", ["0", "1000"])
def test_dataset_id_out_of_range(raw_tree, env, dataset_id):
    assert main(["-i", str(raw_tree), "-d", dataset_id]) == 1
    ft.assert_nothing_written(env)


def test_protocol_all_without_test_folder(raw_tree, env, tmp_path):
    src = copy_tree(raw_tree, tmp_path)
    shutil.rmtree(src / "Test")
    assert main(["-i", str(src), "-d", "26", "--protocol", "all", "-np", "1"]) == 0
    ds = env / "nnUNet_raw" / "Dataset026_Synapse"
    assert len(ft.names(ds / "imagesTr")) == 30 and not (ds / "imagesTs").exists()


@pytest.mark.parametrize("var", ["nnUNet_raw", "nnUNet_preprocessed"])
def test_missing_nnunet_folder_fails_first_and_is_not_created(env, monkeypatch, capsys, tmp_path, var):
    """As in `nnunetv2_fias doctor`, a missing nnU-Net folder is an error, reported before the input is read."""
    missing = tmp_path / "not_created" / var
    monkeypatch.setenv(var, str(missing))
    assert main(["-i", str(tmp_path / "no_such_input"), "-d", "27"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{var}={missing}" in errors[0] and "does not exist" in errors[0]
    assert not (tmp_path / "not_created").exists()
    ft.assert_nothing_written(env)


@pytest.mark.parametrize("argv, status", [
    (["--no-such-option"], 2), (["-i", "x"], 2), (["-i", "x", "-d", "5", "-np", "0"], 2),
    (["-i", "/no/such/folder", "-d", "5"], 1), (["-h"], 0),
])
def test_exit_status_through_the_console_command(env, argv, status):
    from nnunetv2_fias import cli

    assert cli.main(["convert-synapse", *argv]) == status
    ft.assert_nothing_written(env)
