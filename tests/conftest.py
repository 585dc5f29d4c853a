"""Suite-wide safety net: CPU-friendly nnU-Net settings and no access to the user's own nnU-Net folders.

Set before any test module imports nnunetv2, because nnU-Net reads some variables at import time.
Individual tests still point nnUNet_raw/preprocessed/results at their own tmp folders.
"""
import os
import tempfile

os.environ["nnUNet_compile"] = "f"  # compiling is slow on CPU and not what these tests check
os.environ.setdefault("nnUNet_def_n_proc", "1")  # 8 worker processes cost minutes and GBs per fold on 2 cores
os.environ.setdefault("MPLBACKEND", "Agg")
if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test` runs two xdist workers on this project's 2 cores: one thread each (also for the nnU-Net commands
    # they start), and idle OpenMP threads sleep, so the workers do not steal each other's cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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



# ------------------------------------------------------------------------------------------------ xdist grouping
# `make test` runs the suite in two xdist workers (setup.cfg). Each test module goes to one worker as a whole, so
# its module fixtures are built once, and the modules that read `trained_folds` go to the same worker, so the five
# folds are trained once. Groups are handed out in collection order, the longest first (seconds on 2 cores), so that
# no long group starts last and runs alone. (xdist's own `--dist loadgroup` cannot do this with pytest 9, whose
# node ids ignore the group suffix xdist adds.)
_TRAINED_FOLDS_MODULES = ("test_e2e_pipeline.py", "test_finetune_e2e.py")
_LONGEST_GROUPS_FIRST = ("test_study.py", "trained_folds", "test_demo.py", "test_torchrun.py", "test_network.py",
                         "test_e2e_3d.py", "test_trainer_processes.py", "test_benchmark.py")


def _group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "trained_folds" if module in _TRAINED_FOLDS_MODULES else module


@pytest.hookimpl(optionalhook=True)  # a hook of xdist: `-p no:xdist` still runs the suite in one process
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # keep the collection order below
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    strays = sorted({item.path.name for item in items if "trained_folds" in getattr(item, "fixturenames", ())
                     and _group(item.nodeid) != "trained_folds"})
    if strays:
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(strays)} to _TRAINED_FOLDS_MODULES (its tests "
                                "read trained_folds, which must be trained in one worker)")
    rank = {name: i for i, name in enumerate(_LONGEST_GROUPS_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))  # stable: the order within a group kept
