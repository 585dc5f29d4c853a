"""Suite-wide safety net: CPU-friendly nnU-Net settings and no access to the user's own nnU-Net folders.

Set before any test module imports nnunetv2, because nnU-Net reads some variables at import time.
Individual tests still point nnUNet_raw/preprocessed/results at their own tmp folders.
"""
import os
import tempfile

os.environ["nnUNet_compile"] = "f"  # compiling is slow on CPU and not what these tests check
os.environ.setdefault("nnUNet_def_n_proc", "1")  # 8 worker processes cost minutes and GBs per fold on 2 cores
os.environ.setdefault("MPLBACKEND", "Agg")
_guard = tempfile.mkdtemp(prefix="nnunetv2_fias_tests_")
for _name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ[_name] = os.path.join(_guard, _name)

from pathlib import Path  # noqa: E402  (after the variables above, which nnU-Net reads at import)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny 2D dataset (``nnunet_env.DATASET_NAME``) raw, planned and preprocessed once per test run; returns
    the folder holding raw/ and preprocessed/. Read-only: tests write results into folders of their own."""
    from nnunet_env import prepare_dataset

    return prepare_dataset(tmp_path_factory.mktemp("tiny_dataset"))


@pytest.fixture(scope="session")
def tiny_dataset_3d(tmp_path_factory) -> Path:
    """The tiny 3D dataset (``nnunet_env.DATASET3D_NAME``), planned and preprocessed for 3d_fullres; read-only."""
    from nnunet_env import prepare_dataset_3d

    return prepare_dataset_3d(tmp_path_factory.mktemp("tiny_dataset_3d"))


@pytest.fixture(scope="session")
def test_shim(tmp_path_factory) -> Path:
    """Folder of the test-only trainer shim (``FIASTrainer_e2eTiny``, ``nnUNetTrainer_e2eTiny``), for
    ``nnUNet_extTrainer``."""
    from nnunet_env import write_test_shim

    return write_test_shim(tmp_path_factory.mktemp("fias_test_shim")).parent


@pytest.fixture(scope="session")
def trained_folds(tiny_dataset, test_shim, tmp_path_factory) -> dict:
    """``nnUNetv2_train`` of both tiny trainers (FIAS and nnU-Net's U-Net at the same budget) on all five folds of
    the tiny dataset with ``--npz``, once per test run. Read-only: a test that changes a fold works on a copy
    (``nnunet_env.copy_results``). Returns the folders and the environments used."""
    from concurrent.futures import ThreadPoolExecutor

    from nnunet_env import DATASET_ID, E2E_TRAINERS, PACKAGE_SHIM_DIR, nnunet_env, run_tool

    results = tmp_path_factory.mktemp("trained_folds") / "results"
    env = nnunet_env(tiny_dataset, ext_dirs=[PACKAGE_SHIM_DIR, test_shim], nnUNet_results=str(results))
    # nnUNet_n_proc_DA=0: augmentation in the main process. Background workers only cost start-up time here.
    train_env = dict(env, nnUNet_n_proc_DA="0")

    def train_all_folds(trainer: str) -> None:
        for fold in range(5):
            run_tool("nnUNetv2_train", [DATASET_ID, "2d", fold, "-tr", trainer, "-device", "cpu", "--npz"],
                     train_env)

    # The two trainers' runs are independent; overlapping them hides much of nnU-Net's per-process start-up.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(train_all_folds, E2E_TRAINERS))
    return dict(root=tiny_dataset, results=results, env=env, train_env=train_env)

