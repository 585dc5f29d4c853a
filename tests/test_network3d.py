"""What only FIAS-3D has: nnU-Net's 3D deep-supervision targets, strides and kernels from 3D plans, 3D operations
throughout, and FIASTrainer's 3D configurations. (Shapes, gradients, compile, checkpointing and batch 1 are tested for
2D and 3D alike in test_network.py and test_network_memory.py.)"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunetv2_fias.architectures import (FIAS, FIAS3d, GlobalSelfAttention, SafeBatchNorm3d,
                                         fias_stage_kernels_from_plan, fias_strides_from_plan)
from nnunetv2_fias.trainers import FIASTrainer
from nnunetv2_fias.trainers.batch_fit import measurement_patch

from tiny_fias import TINY, make_tiny


class TinyFIASTrainer(FIASTrainer):
    fias_overrides = TINY


def tiny(**kwargs):
    return make_tiny(nn.Conv3d, **kwargs)


def test_deep_supervision_scales_match_nnunets_3d_targets_exactly():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    for patch, strides in (((24, 32, 32), fias_strides_from_plan([[1, 1, 1], [1, 2, 2], [2, 2, 2]], (24, 32, 32))),
                           ((64, 160, 224), fias_strides_from_plan(
                               [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], (64, 160, 224)))):
        net = tiny(strides=strides)
        scales = net.get_deep_supervision_scales(patch)
        seg = torch.zeros(1, *patch, dtype=torch.int16)
        targets = DownsampleSegForDSTransform(ds_scales=scales)(image=torch.zeros(1, *patch), segmentation=seg)
        assert [tuple(t.shape[1:]) for t in targets["segmentation"]] == net.output_sizes(patch)
        assert all(p % d == 0 for p, d in zip(patch, net.size_divisor))  # nothing padded on planned patches


def test_strides_and_dmk_kernels_from_a_3d_plan():
    plan = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert fias_strides_from_plan(plan, (40, 160, 160)) == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2))
    # Completed with 2 where the remaining size is even.
    assert fias_strides_from_plan([[1, 1, 1], [1, 2, 2]], (24, 32, 32)) == (
        (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    kernels = [[1, 3, 3], [1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert fias_stage_kernels_from_plan(kernels, plan) == ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    net = tiny(stage_kernel_sizes=fias_stage_kernels_from_plan(kernels, plan))
    dw = [tuple(c[0].kernel_size) for c in net.encoder.local_branch.stages[0][0].dwconvs]
    assert dw == [(1, 3, 3), (1, 5, 5), (1, 7, 7)]
    assert tuple(net.encoder.local_branch.stages[1][0].dwconvs[2][0].kernel_size) == (7, 7, 7)
    with pytest.raises(ValueError, match="strides"):
        FIAS3d(1, 2, strides=((2, 2),) * 5)
    with pytest.raises(ValueError, match="stage_kernel_sizes"):
        FIAS3d(1, 2, stage_kernel_sizes=((3, 3, 3),) * 3)


def test_3d_blocks_are_the_3d_operations():
    net = tiny()
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert convs and all(isinstance(m, nn.Conv3d) for m in convs)
    assert all(isinstance(m, SafeBatchNorm3d) for m in net.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert isinstance(net.encoder.global_branch.stages[2][0].attn, GlobalSelfAttention)
    assert net.encoder.global_branch.stages[0][0].attn.kernel_size == (3, 3, 3)
    assert net.decoder.stages[0].mc_attn.ndim == 3 and net.interpolation == "trilinear"


def _plans(patch, strides, kernels) -> dict:
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": len(strides), "features_per_stage": [8 * 2 ** i for i in range(len(strides))],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": kernels, "strides": strides,
                            "n_conv_per_stage": [2] * len(strides),
                            "n_conv_per_stage_decoder": [2] * (len(strides) - 1),
                            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    config = {"data_identifier": "x", "patch_size": list(patch), "batch_size": 2, "architecture": arch}
    return {"dataset_name": "Dataset000_X", "plans_name": "nnUNetPlans",
            "configurations": {"3d_fullres": copy.deepcopy(config), "3d_lowres": copy.deepcopy(config),
                               "3d_cascade_fullres": copy.deepcopy(config),
                               "4d": dict(copy.deepcopy(config), patch_size=[2, 8, 16, 16])}}


def test_trainer_dispatches_3d_configurations_to_fias3d():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    kernels = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
    pm = PlansManager(_plans((16, 64, 64), strides, kernels))
    for configuration in ("3d_fullres", "3d_lowres", "3d_cascade_fullres"):
        net = TinyFIASTrainer.build_network_architecture(pm, pm.get_configuration(configuration), 2, 4, True)
        assert isinstance(net, FIAS) and net.ndim == 3 and net.input_channels == 2
        assert net.strides == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
        assert net.stage_kernel_sizes[0] == (3, 3, 3)
    # Inference builds on the class without deep supervision and loads the training checkpoint strictly.
    infer = TinyFIASTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 4, False)
    infer.load_state_dict(net.state_dict(), strict=True)
    assert not infer.decoder.deep_supervision
    with pytest.raises(ValueError, match=r"4D patch size.*-c 2d or -c 3d_fullres"):
        TinyFIASTrainer.build_network_architecture(pm, pm.get_configuration("4d"), 1, 2, True)


def test_fias3d_is_fias_with_3d_operations_and_2d_is_the_default():
    net = FIAS(1, 3, **TINY)
    assert all(isinstance(m, nn.Conv2d) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    torch.manual_seed(0)
    alias = FIAS3d(1, 3, **TINY)
    torch.manual_seed(0)
    plain = FIAS(1, 3, conv_op=nn.Conv3d, **TINY)
    assert alias.ndim == plain.ndim == 3
    for (name, a), b in zip(alias.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_measurement_patch_for_large_3d_patches():
    assert measurement_patch([64, 64, 64], [32, 32, 32]) == [64, 64, 64]
    small = measurement_patch([128, 128, 128], [32, 32, 32])
    assert small == [96, 96, 96] and all(s % 32 == 0 for s in small)
    small = measurement_patch([64, 160, 224], [16, 32, 32])
    assert all(s % d == 0 for s, d in zip(small, [16, 32, 32])) and small[0] * small[1] * small[2] <= 2_000_000


def test_benchmark_accepts_3d_patches(tmp_path, monkeypatch):
    from nnunetv2_fias import benchmark

    monkeypatch.setenv("nnUNet_compile", "f")
    out = tmp_path / "sizes.json"
    assert benchmark.main(["--skip-timing", "--patch", "16", "32", "32", "--batch", "1", "--device", "cpu",
                           "--json", str(out)]) == 0
    results = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"FIAS-T", "nnU-Net"}
    assert results["FIAS-T"]["patch"] == [16, 32, 32] and results["FIAS-T"]["activation_mb"] > 0
    assert results["FIAS-T"]["ratio_activation"] == pytest.approx(
        results["FIAS-T"]["activation_mb"] / results["nnU-Net"]["activation_mb"])
    arch = benchmark.default_nnunet_architecture([128, 128, 128])["arch_kwargs"]
    assert arch["conv_op"].endswith("Conv3d") and arch["features_per_stage"] == [32, 64, 128, 256, 320, 320]
