"""FIAS fitted to nnU-Net's plans: per-axis strides from the plan, decoding to full resolution, deep-supervision
targets that match exactly for anisotropic strides."""
from __future__ import annotations

import copy

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_env import planned_thin_dataset, tiny_fias_overrides
from nnunetv2_fias.architectures import FIAS, fias_kwargs_from_plan, fias_strides_from_plan
from nnunetv2_fias.trainers import FIASTrainer

pytestmark = pytest.mark.timeout(300)

TINY = dict(widths=(12, 24, 48, 96), global_depths=(1, 1, 1, 1), num_heads=(3, 3, 6, 6), local_depths=(1, 1, 1, 1))
SQUARE_512 = [[1, 1]] + [[2, 2]] * 7


class TinyFIASTrainer(FIASTrainer):
    fias_overrides = tiny_fias_overrides()


@pytest.fixture(scope="module")
def thin_plans(tmp_path_factory):
    return load_json(str(planned_thin_dataset(tmp_path_factory.getbasetemp())))


@pytest.mark.parametrize("plan, patch, expected", [
    (SQUARE_512, (512, 512), ((2, 2),) * 5),
    ([[1, 1]] + [[2, 2]] * 4, (64, 64), ((2, 2),) * 5),  # four downsamplings, completed where divisible
    ([[1, 1], [2, 1], [2, 2], [1, 2], [1, 2]], (16, 72), ((2, 1), (2, 2), (1, 2), (1, 2), (2, 1))),
    ([[1, 1], [2, 2], [2, 2]], (20, 12), ((2, 2), (2, 2), (1, 1), (1, 1), (1, 1))),
    ([[2, 2]] * 6, (256, 256), ((2, 2),) * 5),  # no leading input stage
])
def test_strides_from_plan(plan, patch, expected):
    strides = fias_strides_from_plan(plan, patch)
    assert strides == expected
    for axis, size in enumerate(patch):  # never anything to pad
        total = 1
        for s in strides:
            total *= s[axis]
        assert size % total == 0


def test_strides_from_plan_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="do not match the 2D patch size"):
        fias_strides_from_plan([[1, 1, 1], [2, 2, 2]], (64, 64))


def test_square_power_of_two_plans_give_todays_network_exactly():
    torch.manual_seed(0)
    default = FIAS(1, 4, deep_supervision=True, **TINY)
    planned = FIAS(1, 4, deep_supervision=True, strides=fias_strides_from_plan(SQUARE_512, (512, 512)), **TINY)
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in planned.state_dict().items()}
    planned.load_state_dict(default.state_dict())
    default.eval(), planned.eval()
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        for a, b in zip(default(x), planned(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parameters_do_not_depend_on_the_strides(thin_plans):
    config = thin_plans["configurations"]["2d"]
    thin = FIAS(1, 2, strides=fias_strides_from_plan(config["architecture"]["arch_kwargs"]["strides"],
                                                      config["patch_size"]), **TINY)
    square = FIAS(1, 2, **TINY)
    assert {k: v.shape for k, v in thin.state_dict().items()} == {k: v.shape for k, v in square.state_dict().items()}
    assert thin.load_state_dict(square.state_dict()) is not None  # strict: a key or shape mismatch would raise
    assert all(torch.equal(a, b) for a, b in zip(thin.state_dict().values(), square.state_dict().values()))


def test_trainer_builds_fias_from_an_anisotropic_plan_without_padding(thin_plans):
    config = thin_plans["configurations"]["2d"]
    patch = config["patch_size"]
    assert patch == [16, 72] and config["architecture"]["arch_kwargs"]["strides"] == [[1, 1], [2, 1], [2, 2],
                                                                                    [1, 2], [1, 2]]
    pm = PlansManager(copy.deepcopy(thin_plans))
    cm = pm.get_configuration("2d")
    net = TinyFIASTrainer.build_network_architecture(pm, cm, 1, 2, True)
    assert net.strides == ((2, 1), (2, 2), (1, 2), (1, 2), (2, 1))
    assert [list(s) for s in net.encoder.strides] == [[4, 2], [4, 4], [4, 8], [8, 8]]
    assert all(p % d == 0 for p, d in zip(patch, net.size_divisor))  # nothing is padded

    seen = []
    hook = net.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    outputs = net.train()(torch.randn(2, 1, *patch))
    hook.remove()
    assert seen == [tuple(patch)]
    scales = net.get_deep_supervision_scales(patch)
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 72), (4, 18), (4, 9), (2, 9)]
    # nnU-Net's target pyramid for these scales matches every output exactly.
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    seg = torch.randint(0, 2, (1, *patch)).to(torch.int16)
    targets = DownsampleSegForDSTransform(ds_scales=scales)(image=torch.zeros(1, *patch), segmentation=seg)
    assert [tuple(t.shape[1:]) for t in targets["segmentation"]] == [tuple(o.shape[2:]) for o in outputs]
    sum(o.mean() for o in outputs).backward()


@pytest.mark.parametrize("full_resolution", [True, False])
def test_main_output_resolution_and_gradients(full_resolution):
    net = FIAS(2, 3, deep_supervision=True, full_resolution_decoder=full_resolution, **TINY).train()
    outputs = net(torch.randn(2, 2, 40, 56))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 40, 56), (2, 3, 5, 7), (2, 3, 2, 4), (2, 3, 1, 2)]
    sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert hasattr(net.decoder, "stem_stages") == full_resolution
    assert net.decoder.seg_layers[0].in_channels == (16 if full_resolution else 12)


def test_full_resolution_decoder_sees_the_stems_features():
    assert not FIAS(1, 2, **TINY).decoder.full_resolution  # the default: chosen on the demo phantoms
    net = FIAS(1, 2, full_resolution_decoder=True, **TINY).eval()
    shapes = []
    for block in net.decoder.stem_stages:
        block.register_forward_hook(lambda m, args, out: shapes.append((tuple(args[1].shape), tuple(out.shape))))
    with torch.no_grad():
        net(torch.randn(1, 1, 32, 64))
    # half resolution: skip from the stem's 32-channel layer; full resolution: its 16-channel first layer
    assert shapes == [((1, 32, 16, 32), (1, 32, 16, 32)), ((1, 16, 32, 64), (1, 16, 32, 64))]


@pytest.mark.parametrize("patch, strides, kernels, conv_op", [
    ((16, 72), [[1, 1], [2, 1], [2, 2], [1, 2], [1, 2]], [[3, 3]] * 5, torch.nn.Conv2d),
    ((16, 64, 64), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
     torch.nn.Conv3d),
])
def test_one_plan_mapping_for_2d_and_3d(patch, strides, kernels, conv_op):
    kwargs = fias_kwargs_from_plan(patch, {"strides": strides, "kernel_sizes": kernels})
    assert kwargs["conv_op"] is conv_op and kwargs["strides"] == fias_strides_from_plan(strides, patch)
    torch.manual_seed(0)
    net = FIAS(1, 2, deep_supervision=True, **{**TINY, **kwargs})
    assert all(p % d == 0 for p, d in zip(patch, net.size_divisor))
    if conv_op is torch.nn.Conv2d:
        # A 2D plan convolves 3x3 everywhere: the same network as without the plan's kernels, bit for bit.
        torch.manual_seed(0)
        plain = FIAS(1, 2, deep_supervision=True, strides=kwargs["strides"], **TINY)
        for (name, a), b in zip(net.state_dict().items(), plain.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    else:
        assert net.stage_kernel_sizes[0] == (3, 3, 3)  # FIAS stage 1 is the plan's third stage
    assert [tuple(o.shape[2:]) for o in net(torch.randn(1, 1, *patch))] == net.output_sizes(patch)
