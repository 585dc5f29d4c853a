"""FIAS sized by the plan (FIASTrainer_planSized): the level each of nnU-Net's plans gets, the network and learning
rate it gives, FIASTrainer and the ImageNet trainers keeping the preset, and prediction rebuilding exactly the
network a fold was trained with."""
from __future__ import annotations

import copy

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_env import planned_small_3d_dataset, planned_thin_dataset
from nnunetv2_fias.architectures import FIAS, FIAS_PRESETS, fias_size_from_plan, fias_stage1_positions
from nnunetv2_fias.benchmark.models import default_nnunet_architecture
from nnunetv2_fias.trainers import TRAINERS, FIASTrainer, FIASTrainer_ImageNet, FIASTrainer_planSized

pytestmark = pytest.mark.timeout(600)


def _arch(patch) -> dict:
    return default_nnunet_architecture(patch)["arch_kwargs"]


@pytest.mark.parametrize("patch, positions, level", [
    ((512, 512), 128 * 128, "preset"),
    ((128, 128), 32 * 32, "preset"),
    ((96, 96), 24 * 24, "narrow"),
    ((64, 64), 16 * 16, "narrow"),
    ((32, 48), 8 * 12, "small"),
    ((128, 128, 128), 32 * 32 * 32, "preset"),
])
def test_level_follows_the_positions_of_the_first_stage(patch, positions, level):
    arch = _arch(patch)
    assert fias_stage1_positions(patch, arch["strides"]) == positions
    assert fias_size_from_plan(patch, arch)[0] == level


@pytest.mark.parametrize("preset", list(FIAS_PRESETS))
def test_smaller_levels_keep_heads_with_head_dimensions_that_are_multiples_of_8(preset):
    layout = FIAS_PRESETS[preset]
    level, narrow = fias_size_from_plan((96, 96), _arch((96, 96)), preset)
    assert level == "narrow"
    assert narrow["widths"] == tuple(16 * h for h in layout["num_heads"])
    assert narrow["global_depths"] == layout["global_depths"]
    level, small = fias_size_from_plan((32, 48), _arch((32, 48)), preset)
    assert level == "small"
    assert small["widths"] == tuple(8 * h for h in layout["num_heads"])
    assert small["global_depths"] == tuple((d + 1) // 2 for d in layout["global_depths"])
    assert small["local_depths"] == tuple((d + 1) // 2 for d in layout["local_depths"])
    for size in (narrow, small):
        net = FIAS(1, 3, preset=preset, **size)  # valid: heads divide widths, MSDA heads divide by the dilations
        assert all(w // h % 8 == 0 for w, h in zip(net.config.widths, net.config.num_heads))


@pytest.fixture(scope="module")
def nnunet_plans(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return {"thin": (load_json(str(planned_thin_dataset(base))), "2d"),
            "small 3D": (load_json(str(planned_small_3d_dataset(base))), "3d_fullres")}


def _build(trainer, plans: dict, configuration: str, deep_supervision: bool = True):
    pm = PlansManager(copy.deepcopy(plans))
    return trainer.build_network_architecture(pm, pm.get_configuration(configuration), 1, 2, deep_supervision)


def test_nnunets_own_plans_thin_2d_is_small_and_small_3d_keeps_the_preset(nnunet_plans):
    plans, configuration = nnunet_plans["thin"]
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert plans["configurations"]["2d"]["patch_size"] == [16, 72]
    sized, preset = _build(FIASTrainer_planSized, plans, configuration), _build(FIASTrainer, plans, configuration)
    assert sized.config.widths == (24, 48, 96, 192) and sized.config.global_depths == (1, 1, 3, 1)
    assert preset.config.widths == FIAS_PRESETS["T"]["widths"]
    # The U-Net nnU-Net plans there has 7.4 M parameters; FIAS-T has 27 M.
    assert sum(p.numel() for p in sized.parameters()) < 0.15 * sum(p.numel() for p in preset.parameters())
    assert FIASTrainer_planSized.plan_size_lr_factor([16, 72], arch) == 3.0  # 72 / 24 channels at stage 1
    assert FIASTrainer.plan_size_lr_factor([16, 72], arch) == 1.0
    plans, configuration = nnunet_plans["small 3D"]
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [24, 96, 96]
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert _build(FIASTrainer_planSized, plans, configuration).config.widths == FIAS_PRESETS["T"]["widths"]
    assert FIASTrainer_planSized.plan_size_lr_factor([24, 96, 96], arch) == 1.0


def test_prediction_rebuilds_the_trained_network(nnunet_plans):
    # nnU-Net's predictor calls build_network_architecture on the class, without deep supervision, then loads the
    # checkpoint strictly: the sized network must come out the same.
    plans, configuration = nnunet_plans["thin"]

    class PlanSizedB(FIASTrainer_planSized):
        fias_preset = "B"

    for trainer in (FIASTrainer, FIASTrainer_planSized, PlanSizedB):
        trained = _build(trainer, plans, configuration, deep_supervision=True)
        rebuilt = _build(trainer, plans, configuration, deep_supervision=False)
        rebuilt.load_state_dict(trained.state_dict())  # strict
    with pytest.raises(RuntimeError, match=r"stage widths differ \(checkpoint \[24, 48, 96, 192\], network \[72, "):
        _build(FIASTrainer, plans, configuration).load_state_dict(
            _build(FIASTrainer_planSized, plans, configuration).state_dict())


def test_only_the_plan_sized_variant_sizes_fias():
    on = {cls.__name__ for cls in TRAINERS if issubclass(cls, FIASTrainer) and cls.fias_plan_sized}
    assert on == {"FIASTrainer_planSized"}
    thin = {"strides": [[1, 1], [2, 1], [2, 2], [1, 2], [1, 2]]}
    assert FIASTrainer.fias_size((16, 72), thin) == FIASTrainer_ImageNet.fias_size((16, 72), thin) == ("preset", {})


def test_overrides_win_over_the_plan_size(nnunet_plans):
    plans, configuration = nnunet_plans["thin"]

    class Wide(FIASTrainer_planSized):
        fias_overrides = {"widths": (48, 96, 192, 384)}

    net = _build(Wide, plans, configuration)
    assert net.config.widths == (48, 96, 192, 384) and net.config.global_depths == (1, 1, 3, 1)
    assert Wide.plan_size_lr_factor([16, 72], plans["configurations"]["2d"]["architecture"]["arch_kwargs"]) == 1.5


def test_standalone_constructor_keeps_the_preset():
    net = FIAS(1, 2, strides=((2, 1), (2, 2), (1, 2), (1, 2), (2, 1)))
    assert net.config.widths == FIAS_PRESETS["T"]["widths"]
    x = torch.randn(1, 1, 16, 72)
    assert net.eval()(x).shape == (1, 2, 16, 72)
