"""End-to-end in 3D: FIAS-3D through nnU-Net's own commands on a tiny anisotropic dataset, on the CPU.

plan_and_preprocess (3d_fullres) -> nnUNetv2_train ID 3d_fullres 0 with the tiny-budget FIAS trainer of the test
shim (FIASTrainer with small widths: the configuration alone selects FIAS-3D) -> nnUNetv2_predict. Asserts on
artifacts, shapes and label sets, never on accuracy.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_env import (DATASET3D_ID, DATASET3D_NAME, LABELS_3D, NUM_TEST_3D, PACKAGE_SHIM_DIR, VOLUME_SHAPE,
                        nnunet_env, run_tool, tiny_fias_overrides)
from nnunetv2_fias.architectures import FIAS
from nnunetv2_fias.trainers import FIASTrainer

FIAS_TR = "FIASTrainer_e2eTiny"

pytestmark = pytest.mark.timeout(600)


def test_train_3d_fullres_and_predict(tiny_dataset_3d, test_shim, tmp_path_factory):
    root = tiny_dataset_3d
    plans = json.loads((root / "preprocessed" / DATASET3D_NAME / "nnUNetPlans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert len(config["patch_size"]) == 3
    results = tmp_path_factory.mktemp("e2e3d") / "results"
    env = nnunet_env(root, ext_dirs=[PACKAGE_SHIM_DIR, test_shim], nnUNet_results=str(results))

    run_tool("nnUNetv2_train", [DATASET3D_ID, "3d_fullres", 0, "-tr", FIAS_TR, "-device", "cpu"],
             dict(env, nnUNet_n_proc_DA="0"))
    model = results / DATASET3D_NAME / f"{FIAS_TR}__nnUNetPlans__3d_fullres"
    fold = model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "validation" / "summary.json").is_file()
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Deep supervision: 4 outputs" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(v.ndim == 5 for v in checkpoint["network_weights"].values())  # 3D convolutions: FIAS-3D
    caf = json.loads((fold / "caf_balance.json").read_text())
    assert len(caf["stage_strides"][0]) == 3

    out = root.parent / "pred3d"
    # -npp 0 -nps 0: nnU-Net predicts sequentially in this process (no worker pools to start for two volumes).
    run_tool("nnUNetv2_predict", ["-i", root / "raw" / DATASET3D_NAME / "imagesTs", "-o", out, "-d", DATASET3D_ID,
                                  "-c", "3d_fullres", "-f", 0, "-tr", FIAS_TR, "-device", "cpu", "-npp", 0, "-nps", 0],
             env)
    for i in range(NUM_TEST_3D):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"test_{i:03d}.nii.gz")))
        assert seg.shape == VOLUME_SHAPE
        assert set(np.unique(seg)) <= set(LABELS_3D.values())


class _Tiny3dTrainer(FIASTrainer):
    fias_overrides = tiny_fias_overrides()


def test_batch_fitting_measures_large_patches_at_a_smaller_patch(tiny_dataset_3d, tmp_path_factory, monkeypatch):
    import nnunetv2_fias.trainers.batch_fit as batch_fit

    root = tiny_dataset_3d
    for name, folder in (("nnUNet_raw", root / "raw"), ("nnUNet_preprocessed", root / "preprocessed"),
                         ("nnUNet_results", tmp_path_factory.mktemp("fit3d"))):
        monkeypatch.setenv(name, str(folder))
    pre = root / "preprocessed" / DATASET3D_NAME
    plans = dict(json.loads((pre / "nnUNetPlans.json").read_text()), continue_training=False)
    trainer = _Tiny3dTrainer(plans, "3d_fullres", 0, json.loads((pre / "dataset.json").read_text()),
                             torch.device("cpu"))
    monkeypatch.setattr(batch_fit, "MAX_MEASURED_VOXELS", 4000)  # the 24x32x32 patch counts as large here
    batch, reason = batch_fit.memory_fitted_batch_size(trainer, 2)
    assert batch == 2 and "measured at " in reason and "scaled by the voxel ratio" in reason
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 2, True)
    assert isinstance(net, FIAS) and net.ndim == 3
