"""Shared helpers for the trainer and end-to-end tests: a tiny generated 2D dataset, an isolated nnU-Net
environment, a test-only trainer shim and a runner for nnU-Net's own command-line tools.

Test modules import what they need from here; tests/conftest.py builds the datasets once per test run from it
(fixtures ``tiny_dataset``, ``tiny_dataset_3d``, ``test_shim``, ``trained_folds``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID:03d}_FIASTiny"
NUM_TRAIN = 10
NUM_TEST = 3
IMAGE_SIZE = 64
LABELS = {"background": 0, "disk": 1, "square": 2}

# Test-only trainers with a tiny budget. They live in a shim module that the tests write into a tmp folder and
# add to nnUNet_extTrainer, next to the package's own shim, so nnU-Net finds them by name like any user trainer.
# FIASTrainer_e2eTiny also shrinks the network (widths/depths) so five folds fit the CI budget; the real FIAS-T
# is measured separately. The epoch count reads FIAS_TEST_EPOCHS so that a `--c` test can extend a finished
# training (the class name, and thus the results folder, must stay the same).
TEST_SHIM_MODULE = "fias_test_tiny_trainers"
TINY_EPOCHS = 1
TINY_ITERS = 2
TINY_VAL_ITERS = 1
# Same block types and stage layout as FIAS-T, a sixth of its widths and one block per stage (~0.5 M parameters).
TINY_FIAS_OVERRIDES = dict(widths=(12, 24, 48, 96), global_depths=(1, 1, 1, 1), local_depths=(1, 1, 1, 1),
                           num_heads=(3, 3, 3, 3))

_SHIM_SOURCE = '''\
"""Test-only tiny-budget trainers (written by tests/nnunet_env.py)."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_fias.trainers import FIASTrainer

_EPOCHS = int(os.environ.get("FIAS_TEST_EPOCHS", "{epochs}"))


class FIASTrainer_e2eTiny(FIASTrainer):
    fias_overrides = {overrides}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = _EPOCHS
        self.num_iterations_per_epoch = {iters}
        self.num_val_iterations_per_epoch = {val_iters}


class nnUNetTrainer_e2eTiny(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = _EPOCHS
        self.num_iterations_per_epoch = {iters}
        self.num_val_iterations_per_epoch = {val_iters}
'''

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_SHIM_DIR = REPO_ROOT / "nnunetv2_fias" / "nnunet_ext"
BIN_DIR = Path(sys.executable).parent


def tiny_fias_overrides() -> dict:
    """Network overrides that make FIAS small enough for five CPU folds in CI."""
    return dict(TINY_FIAS_OVERRIDES)


def write_test_shim(folder: Path) -> Path:
    """Writes the test-only trainer shim module into ``folder`` (which must hold nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TEST_SHIM_MODULE}.py"
    path.write_text(_SHIM_SOURCE.format(epochs=TINY_EPOCHS, iters=TINY_ITERS, val_iters=TINY_VAL_ITERS,
                                        overrides=repr(tiny_fias_overrides())))
    return path


def _draw_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image/label pair: a bright disk (1) and a dark square (2) on a noisy background."""
    yy, xx = np.mgrid[:size, :size]
    seg = np.zeros((size, size), np.uint8)
    r = rng.integers(size // 10, size // 5)
    cy, cx = rng.integers(r + 1, size - r - 1, size=2)
    seg[(yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2] = 1
    s = int(rng.integers(size // 8, size // 4))
    y0, x0 = rng.integers(0, size - s, size=2)
    seg[y0:y0 + s, x0:x0 + s][seg[y0:y0 + s, x0:x0 + s] == 0] = 2
    img = rng.normal(100.0, 15.0, (size, size))
    img[seg == 1] += 80.0
    img[seg == 2] -= 60.0
    return img.astype(np.float32), seg


def _write_2d(arr: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    # One-slice 3D NIfTI: nnU-Net plans a 2d configuration for it (and a 3d one that the trainer must reject).
    img = sitk.GetImageFromArray(arr[None])
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path))


def make_raw_dataset(raw_root: Path, seed: int = 0, test_labels: bool = False) -> Path:
    """Generates the tiny dataset in nnU-Net's raw format under ``raw_root`` and returns its folder (with
    ``labelsTs`` for the test images when ``test_labels``)."""
    from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    folder = raw_root / DATASET_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs") + (("labelsTs",) if test_labels else ()):
        maybe_mkdir_p(str(folder / sub))
    rng = np.random.default_rng(seed)
    for i in range(NUM_TRAIN):
        img, seg = _draw_case(rng, IMAGE_SIZE)
        _write_2d(img, folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        _write_2d(seg, folder / "labelsTr" / f"case_{i:03d}.nii.gz")
    for i in range(NUM_TEST):
        img, seg = _draw_case(rng, IMAGE_SIZE)
        _write_2d(img, folder / "imagesTs" / f"test_{i:03d}_0000.nii.gz")
        if test_labels:
            _write_2d(seg, folder / "labelsTs" / f"test_{i:03d}.nii.gz")
    generate_dataset_json(str(folder), {0: "MR"}, LABELS, NUM_TRAIN, ".nii.gz", dataset_name=DATASET_NAME)
    return folder


def nnunet_env(root: Path, ext_dirs: list[Path] | None = None, **extra: str) -> dict[str, str]:
    """Environment for nnU-Net subprocesses: every nnU-Net folder under ``root``, CPU-friendly settings."""
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_compile": "f",
        "nnUNet_def_n_proc": "1",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        "MPLBACKEND": "Agg",
        # Idle OpenMP threads sleep instead of spinning: on 2 shared cores, spinning threads of concurrent nnU-Net
        # processes steal each other's CPU (measured: a tiny fold 22 s -> 15 s CPU).
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONWARNINGS": "ignore",
    })
    env.pop("nnUNet_n_proc_DA", None)
    if ext_dirs is not None:
        env["nnUNet_extTrainer"] = os.pathsep.join(str(d) for d in ext_dirs)
    env.update(extra)
    return env


def run_tool(name: str, args: list[str], env: dict[str, str], timings: dict | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs one of nnU-Net's console scripts and fails with its output if it does not exit 0."""
    exe = BIN_DIR / name
    cmd = [str(exe) if exe.exists() else name, *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if timings is not None:
        timings.setdefault(name, []).append(round(time.perf_counter() - t0, 1))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


# The trainers of the test shim, FIAS and nnU-Net's U-Net at the same budget (tests/conftest.py: trained_folds).
E2E_TRAINERS = ("FIASTrainer_e2eTiny", "nnUNetTrainer_e2eTiny")


def copy_results(trained: dict, destination: Path) -> dict:
    """``trained`` (the ``trained_folds`` fixture) with its results folder copied to ``destination``, for a test
    that changes the trained folds."""
    shutil.copytree(trained["results"], destination)
    folder = {"nnUNet_results": str(destination)}
    return dict(trained, results=destination, env=dict(trained["env"], **folder),
                train_env=dict(trained["train_env"], **folder))


def prepare_dataset(root: Path) -> Path:
    """Raw + planned + preprocessed (2d) tiny dataset under ``root`` (raw/, preprocessed/); returns ``root``."""
    make_raw_dataset(root / "raw")
    run_tool("nnUNetv2_plan_and_preprocess",
             ["-d", DATASET_ID, "-c", "2d", "-np", "1", "-npfp", "1", "--verify_dataset_integrity"], nnunet_env(root))
    return root


THIN_DATASET_ID = 988
THIN_DATASET_NAME = f"Dataset{THIN_DATASET_ID:03d}_FIASThin"
SMALL3D_DATASET_ID = 989
SMALL3D_DATASET_NAME = f"Dataset{SMALL3D_DATASET_ID:03d}_FIASSmall3d"


def _planned_blob_dataset(base: Path, dataset_id: int, name: str, shape: tuple[int, int, int],
                          spacing_xyz: tuple[float, float, float], configuration: str) -> Path:
    """8 volumes of ``shape`` (z, y, x) with one ellipsoidal blob each, planned (not preprocessed) for
    ``configuration`` by nnU-Net's default planner under ``base/name``; returns its nnUNetPlans.json."""
    from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    import SimpleITK as sitk

    root = base / name
    plans = root / "preprocessed" / name / "nnUNetPlans.json"
    if plans.is_file():
        return plans
    folder = root / "raw" / name
    for sub in ("imagesTr", "labelsTr"):
        maybe_mkdir_p(str(folder / sub))
    rng = np.random.default_rng(0)
    grid = np.mgrid[:shape[0], :shape[1], :shape[2]]
    axes = range(3) if shape[0] > 8 else range(1, 3)  # a few slices: the same ellipse in each
    for i in range(8):
        centre = [rng.uniform(0.3 * n, 0.7 * n) for n in shape]
        radii = [max(1.0, rng.uniform(0.1 * n, 0.25 * n)) for n in shape]
        seg = (sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in axes) <= 1).astype(np.uint8)
        img = rng.normal(100.0, 15.0, seg.shape) + 80.0 * seg
        for arr, path in ((img.astype(np.float32), folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                          (seg, folder / "labelsTr" / f"case_{i:03d}.nii.gz")):
            image = sitk.GetImageFromArray(arr)
            image.SetSpacing(spacing_xyz)
            sitk.WriteImage(image, str(path))
    generate_dataset_json(str(folder), {0: "MR"}, {"background": 0, "blob": 1}, 8, ".nii.gz", dataset_name=name)
    run_tool("nnUNetv2_plan_and_preprocess", ["-d", dataset_id, "-c", configuration, "-npfp", "1", "--no_pp"],
             nnunet_env(root))
    return plans


def planned_thin_dataset(base: Path) -> Path:
    """A thin anisotropic dataset (6 slices of 15x67 pixels, in-plane spacing 1 x 2 mm), planned (not preprocessed)
    by nnU-Net's default planner; returns its nnUNetPlans.json. nnU-Net plans a 16x72 2D patch with anisotropic
    strides for it."""
    return _planned_blob_dataset(base, THIN_DATASET_ID, THIN_DATASET_NAME, (6, 15, 67), (2.0, 1.0, 4.0), "2d")


def planned_small_3d_dataset(base: Path) -> Path:
    """Small volumes (24 slices of 96x96 voxels, 1 x 1 x 2.5 mm), planned (not preprocessed) for 3d_fullres by
    nnU-Net's default planner; returns its nnUNetPlans.json (a 24x96x96 patch)."""
    return _planned_blob_dataset(base, SMALL3D_DATASET_ID, SMALL3D_DATASET_NAME, (24, 96, 96), (1.0, 1.0, 2.5),
                                 "3d_fullres")


def load_plans_and_dataset_json(root: Path) -> tuple[dict, dict]:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    pre = root / "preprocessed" / DATASET_NAME
    return load_json(str(pre / "nnUNetPlans.json")), load_json(str(pre / "dataset.json"))


def make_trainer(trainer_cls, root: Path, fold=0, configuration: str = "2d", results: Path | None = None):
    """Constructs ``trainer_cls`` on CPU for the tiny dataset without touching the environment permanently.

    nnunetv2.paths reads the environment lazily, so the nnU-Net folders are set for the constructor only.
    """
    import torch

    plans, dataset_json = load_plans_and_dataset_json(root)
    plans["continue_training"] = False
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(results if results is not None else root / "results")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return trainer_cls(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                           device=torch.device("cpu"))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------------------------
# DistributedDataParallel check (gloo, CPU). nnU-Net's own DDP path is CUDA/NCCL only and its trainer forces a
# CUDA device when a process group exists, so each rank builds the trainer first (CPU), then joins the group and
# wraps the network in DDP the way nnU-Net does (no find_unused_parameters).

def tiny_ddp_trainer_class(deep_supervision: bool):
    """A tiny FIAS trainer with (FIASTrainer) or without (FIASTrainerNoDS) deep supervision."""
    from nnunetv2_fias.trainers import FIASTrainer, FIASTrainerNoDS

    base = FIASTrainer if deep_supervision else FIASTrainerNoDS
    return type(f"{base.__name__}_ddpTiny", (base,), {"fias_overrides": tiny_fias_overrides()})


def ddp_worker(rank: int, world_size: int, root: str, results: str, port: int, deep_supervision: bool,
               report_dir: str, patch_size: list[int] | None = None, split_batch: bool = False) -> None:
    """Two training steps per rank; ``split_batch`` splits the planned batch across the ranks as nnU-Net's
    ``-num_gpus`` does (batch 2 on two ranks: 1 each), ``patch_size`` overrides the planned patch."""
    import json

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(rank)
    torch.set_num_threads(1)
    trainer = make_trainer(tiny_ddp_trainer_class(deep_supervision), Path(root), fold=0, results=Path(results))
    if patch_size is not None:
        trainer.configuration_manager.configuration["patch_size"] = list(patch_size)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        trainer.initialize()
        trainer.network = DDP(trainer.network)  # as nnU-Net: no find_unused_parameters
        trainer.is_ddp = True
        if split_batch:
            trainer._set_batch_size_and_oversample()
        batch = trainer.batch_size
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
        trainer.network.train()
        patch = trainer.configuration_manager.patch_size
        scales = trainer._get_deep_supervision_scales()
        losses = []
        for _ in range(2):  # an unused parameter makes DDP fail at the start of the *second* step
            data = torch.randn(batch, trainer.num_input_channels, *patch)
            if scales is None:
                target = torch.randint(0, 3, (batch, 1, *patch)).float()
            else:
                target = [torch.randint(0, 3, (batch, 1, *[round(p * s) for p, s in zip(patch, sc)])).float()
                          for sc in scales]
            losses.append(float(trainer.train_step({"data": data, "target": target})["loss"]))
        # DDP averaged the gradients: after identical updates the replicas must still agree.
        flat = torch.cat([p.detach().flatten() for p in trainer.network.module.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        max_diff = max(float((g - flat).abs().max()) for g in gathered)
        n_outputs = len(scales) if scales is not None else 1
        with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"losses": losses, "max_param_diff": max_diff, "n_outputs": n_outputs, "batch_size": batch,
                       "weights": list(getattr(trainer.loss, "weight_factors", []) or [])}, f)
    finally:
        dist.destroy_process_group()


def ddp_cases(rank: int, world_size: int, root: str, results: str, cases: list) -> None:
    """:func:`ddp_worker` for each ``(name, report_dir, port, deep_supervision, patch_size, split_batch)`` in turn,
    each in a process group of its own."""
    for name, report_dir, port, deep_supervision, patch_size, split_batch in cases:
        os.makedirs(report_dir, exist_ok=True)
        ddp_worker(rank, world_size, root, os.path.join(results, name), port, deep_supervision, report_dir,
                   patch_size, split_batch)


# ----------------------------------------------------------------------------------------------------------------
# A tiny anisotropic 3D dataset for the 3d_fullres end-to-end test.

DATASET3D_ID = 989
DATASET3D_NAME = f"Dataset{DATASET3D_ID:03d}_FIASTiny3D"
NUM_TRAIN_3D = 8
NUM_TEST_3D = 2
VOLUME_SHAPE = (24, 32, 32)  # z, y, x
VOLUME_SPACING = (1.0, 1.0, 2.5)  # x, y, z in mm (SimpleITK order): thick slices
LABELS_3D = {"background": 0, "ball": 1}


def _draw_volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One volume/label pair: a bright ellipsoid (1), flattened along z like an organ in thick slices."""
    zz, yy, xx = np.mgrid[:VOLUME_SHAPE[0], :VOLUME_SHAPE[1], :VOLUME_SHAPE[2]]
    cz, cy, cx = rng.uniform(8, 16), rng.uniform(10, 22), rng.uniform(10, 22)
    rz, ry, rx = rng.uniform(3, 6), rng.uniform(4, 8), rng.uniform(4, 8)
    seg = (((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    img = rng.normal(100.0, 15.0, VOLUME_SHAPE) + 80.0 * seg
    return img.astype(np.float32), seg


def make_raw_dataset_3d(raw_root: Path, seed: int = 0) -> Path:
    """Generates the tiny anisotropic 3D dataset in nnU-Net's raw format under ``raw_root``; returns its folder."""
    import SimpleITK as sitk
    from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    folder = raw_root / DATASET3D_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        maybe_mkdir_p(str(folder / sub))
    rng = np.random.default_rng(seed)

    def write(arr: np.ndarray, path: Path) -> None:
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing(VOLUME_SPACING)
        sitk.WriteImage(image, str(path))

    for i in range(NUM_TRAIN_3D):
        img, seg = _draw_volume(rng)
        write(img, folder / "imagesTr" / f"vol_{i:03d}_0000.nii.gz")
        write(seg, folder / "labelsTr" / f"vol_{i:03d}.nii.gz")
    for i in range(NUM_TEST_3D):
        write(_draw_volume(rng)[0], folder / "imagesTs" / f"test_{i:03d}_0000.nii.gz")
    generate_dataset_json(str(folder), {0: "CT"}, LABELS_3D, NUM_TRAIN_3D, ".nii.gz", dataset_name=DATASET3D_NAME)
    return folder


def prepare_dataset_3d(root: Path) -> Path:
    """Raw + planned + preprocessed (3d_fullres) tiny 3D dataset under ``root``; returns ``root``."""
    make_raw_dataset_3d(root / "raw")
    run_tool("nnUNetv2_plan_and_preprocess",
             ["-d", DATASET3D_ID, "-c", "3d_fullres", "-np", "1", "-npfp", "1", "--verify_dataset_integrity"],
             nnunet_env(root))
    return root
