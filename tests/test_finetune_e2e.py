"""Fine-tuning across label sets through nnU-Net's own command: a tiny FIAS trained on the 3-label dataset
(background, disk, square; fold 0 of the session's ``trained_folds``), then ``nnUNetv2_train ... -pretrained_weights`` on a 2-label one (background, disk).

nnU-Net's loader transfers every tensor except those whose key contains ``.seg_layers.``; FIAS's heads carry that
name, so the encoder and decoder start from the first training and only the heads are new.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_env import DATASET_NAME, E2E_TRAINERS, PACKAGE_SHIM_DIR, nnunet_env, run_tool, tiny_fias_overrides

pytestmark = pytest.mark.timeout(600)

FT_ID = 988
FT_NAME = f"Dataset{FT_ID:03d}_FIASTinyDiskOnly"
TRAINER = "FIASTrainer_ftTiny"
START_WEIGHTS = "weights_at_start.pt"

_SHIM = '''\
"""Test-only trainer (written by tests/test_finetune_e2e.py)."""
import os

import torch

from nnunetv2_fias.trainers import FIASTrainer


class FIASTrainer_ftTiny(FIASTrainer):
    fias_overrides = {overrides}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def on_train_start(self):
        super().on_train_start()
        # The weights the first training step starts from, for the test to compare with the pretrained checkpoint.
        torch.save(self._fias().state_dict(), os.path.join(self.output_folder, "{start}"))
'''


def _two_label_dataset(src: Path, dst: Path) -> None:
    """The 3-label dataset's images with the square merged into the background."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    shutil.copytree(src / "imagesTr", dst / "imagesTr")
    (dst / "labelsTr").mkdir()
    for label in sorted((src / "labelsTr").glob("*.nii.gz")):
        img = sitk.ReadImage(str(label))
        arr = sitk.GetArrayFromImage(img)
        out = sitk.GetImageFromArray(np.where(arr == 1, 1, 0).astype(np.uint8))
        out.CopyInformation(img)
        sitk.WriteImage(out, str(dst / "labelsTr" / label.name))
    generate_dataset_json(str(dst), {0: "MR"}, {"background": 0, "disk": 1},
                          len(list((dst / "labelsTr").glob("*.nii.gz"))), ".nii.gz", dataset_name=FT_NAME)


def test_finetune_into_a_dataset_with_fewer_labels(trained_folds, tmp_path_factory):
    root = trained_folds["root"]
    work = tmp_path_factory.mktemp("finetune")
    shim = work / "shim"
    shim.mkdir()
    (shim / "fias_test_finetune_trainers.py").write_text(
        _SHIM.format(overrides=repr(tiny_fias_overrides()), start=START_WEIGHTS))
    # Own raw/preprocessed folders for the 2-label dataset: the shared tiny dataset stays untouched.
    ft_root = work / "nnunet"
    _two_label_dataset(root / "raw" / DATASET_NAME, ft_root / "raw" / FT_NAME)
    ext = [PACKAGE_SHIM_DIR, shim]
    run_tool("nnUNetv2_plan_and_preprocess", ["-d", FT_ID, "-c", "2d", "-np", "1", "-npfp", "1"],
             nnunet_env(ft_root, ext))
    # The same tiny network as FIASTrainer_ftTiny, trained on the 3-label dataset.
    pretrained = (trained_folds["results"] / DATASET_NAME / f"{E2E_TRAINERS[0]}__nnUNetPlans__2d" / "fold_0"
                  / "checkpoint_final.pth")
    results = work / "results"
    run_tool("nnUNetv2_train", [FT_ID, "2d", 0, "-tr", TRAINER, "-device", "cpu", "-pretrained_weights", pretrained],
             nnunet_env(ft_root, ext, nnUNet_results=str(results), nnUNet_n_proc_DA="0"))

    fold = results / FT_NAME / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    source = torch.load(pretrained, map_location="cpu", weights_only=False)["network_weights"]
    start = torch.load(fold / START_WEIGHTS, map_location="cpu", weights_only=True)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    heads = [k for k in start if ".seg_layers." in k]
    assert len(heads) == 8  # main + three deep-supervision heads, weight and bias each
    for key, value in start.items():
        if key not in heads:
            assert torch.equal(value, source[key]), key  # everything but the heads starts from the first training
    assert source["decoder.seg_layers.0.weight"].shape[0] == 3
    assert start["decoder.seg_layers.0.weight"].shape[0] == final["decoder.seg_layers.0.weight"].shape[0] == 2
    assert all(final[k].shape[0] == 2 for k in heads)
    assert (fold / "validation" / "summary.json").is_file()  # the fine-tuned model also went through validation
