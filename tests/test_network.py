"""Contracts of the FIAS network in 2D and 3D: shapes, deep supervision, state dicts, gradients, blocks, compile, bad
arguments."""
import pytest
import torch
from torch import nn

from nnunetv2_fias.architectures import (FIAS, FIAS_PRESETS, CAF_VARIANTS, ContextAwareFusion,
                                         MonteCarloAttention)
from tiny_fias import SMALL_3D, conv_op, make_tiny, tiny_fias  # noqa: F401 (fixtures)

ANISO_3D = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
PATCHES = [  # (conv_op, patch, strides): nnU-Net's 2D patch sizes (not square, not powers of two), anisotropic volumes
    *[(nn.Conv2d, size, None) for size in [(64, 64), (40, 224), (256, 224), (20, 320), (512, 448)]],
    (nn.Conv3d, (4, 32, 64), ANISO_3D), (nn.Conv3d, (6, 16, 32), SMALL_3D), (nn.Conv3d, (5, 12, 20), SMALL_3D),
    (nn.Conv3d, (3, 8, 16), SMALL_3D),
]


def tiny(input_channels=1, num_classes=3, deep_supervision=False, **kwargs):
    return make_tiny(input_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision,
                     **kwargs)


def zero_gradient_by_construction(net: nn.Module) -> set[str]:
    """Biases of convolutions followed by BatchNorm (DilateFormer's downsamplings): the normalisation subtracts them
    again, so their true gradient in training is 0 and what backward gives is rounding noise."""
    names = set()
    for name, module in net.named_modules():
        if (isinstance(module, nn.Sequential) and len(module) > 1 and isinstance(module[0], (nn.Conv2d, nn.Conv3d))
                and module[0].bias is not None and isinstance(module[1], nn.modules.batchnorm._BatchNorm)):
            names.add(f"{name}.0.bias")
    return names


@pytest.mark.parametrize("op, size, strides", PATCHES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         and isinstance(v[0], int) else None)
def test_any_planned_patch_size_with_and_without_deep_supervision(op, size, strides):
    torch.manual_seed(0)
    net = make_tiny(op, input_channels=2, num_classes=4, **({"strides": strides} if strides else {})).eval()
    x = torch.randn(1, 2, *size)
    with torch.no_grad():
        outs = net(x)
        net.decoder.deep_supervision = False
        single = net(x)
    assert isinstance(outs, (list, tuple)) and len(outs) == 4
    scales = net.get_deep_supervision_scales(size)
    assert len(scales) == len(outs)
    for out, scale in zip(outs, scales):
        # Exactly what nnU-Net's deep-supervision target downsampling produces: round(size * scale).
        assert tuple(out.shape) == (1, 4) + tuple(round(s * f) for s, f in zip(size, scale))
    assert [tuple(o.shape[2:]) for o in outs] == net.output_sizes(size)
    assert outs[0].shape[2:] == size
    if op is nn.Conv2d:
        assert [tuple(o.shape[2:]) for o in outs[1:]] == [tuple(max(1, round(s / st)) for s in size)
                                                          for st in (8, 16, 32)]
    assert isinstance(single, torch.Tensor) and single.shape == (1, 4, *size)
    torch.testing.assert_close(single, outs[0])


@pytest.mark.parametrize("channels,classes", [(1, 2), (3, 14), (4, 1)])
def test_any_number_of_channels_and_classes(channels, classes):
    out = tiny(channels, classes).eval()(torch.randn(2, channels, 32, 48))
    assert out.shape == (2, classes, 32, 48)


def test_default_preset_forward_backward_gives_finite_gradients():
    torch.manual_seed(0)
    net = FIAS(1, 3, preset="T", deep_supervision=True)
    outs = net(torch.randn(2, 1, 64, 64))
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert sorted(zero_gradient_by_construction(net)) == [f"encoder.global_branch.downsamples.{s}.0.bias"
                                                          for s in (1, 2, 3)]


def test_every_parameter_gets_a_real_gradient(tiny_fias):
    # In float64, where rounding noise (~1e-15) cannot pass for a gradient: every parameter but the biases that
    # BatchNorm cancels gets one, at every stage, in both branches, CAF (concat variant: spatial gate too) and decoder.
    torch.manual_seed(0)
    kwargs = dict(caf_variant="concat")
    if tiny_fias.conv_op is nn.Conv3d:
        kwargs["stage_kernel_sizes"] = ((1, 3, 3),) + ((3, 3, 3),) * 3
    net = tiny_fias(**kwargs).double().train()
    outs = net(tiny_fias.input().double())
    sum(o.square().mean() for o in outs).backward()
    noise = zero_gradient_by_construction(net)
    assert noise
    grads = {n: p.grad for n, p in net.named_parameters()}
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not missing, missing
    weak = [n for n, g in grads.items() if n not in noise and g.abs().max() < 1e-9]
    assert not weak, f"parameters without a real gradient: {weak}"
    assert all(grads[n].abs().max() < 1e-9 for n in noise)


def test_without_deep_supervision_every_parameter_still_takes_part_in_training(tiny_fias):
    # DDP without find_unused_parameters (nnU-Net -num_gpus) needs every parameter in the graph.
    net = tiny_fias(deep_supervision=False).train()
    net(tiny_fias.input()).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_state_dict_does_not_depend_on_deep_supervision():
    torch.manual_seed(0)
    with_ds = tiny(deep_supervision=True)
    without = tiny(deep_supervision=False)
    sd_a, sd_b = with_ds.state_dict(), without.state_dict()
    assert list(sd_a) == list(sd_b)
    assert all(sd_a[k].shape == sd_b[k].shape for k in sd_a)
    # nnU-Net inference: rebuild with deep supervision off, load the training checkpoint strictly.
    without.load_state_dict(sd_a, strict=True)
    x = torch.randn(1, 1, 40, 40)
    with_ds.eval(), without.eval()
    with torch.no_grad():
        torch.testing.assert_close(with_ds(x)[0], without(x))


def test_presets_grow_and_overrides_apply():
    counts = {name: sum(p.numel() for p in FIAS(1, 9, preset=name).parameters()) for name in FIAS_PRESETS}
    assert counts["T"] < counts["S"] < counts["B"]
    net = FIAS(1, 9, preset="B", widths=(48, 96, 192, 384), caf_variant="sigmoid")
    assert net.encoder.output_channels == (48, 96, 192, 384)
    assert net.encoder.strides == ((4, 4), (8, 8), (16, 16), (32, 32))
    assert all(f.variant == "sigmoid" for f in net.encoder.fusions)


def test_initialisation():
    net = FIAS(1, 2)
    linear = net.encoder.global_branch.stages[0][0].mlp.fc1
    assert abs(linear.weight.std().item() - 0.02) < 0.005 and linear.bias.abs().sum() == 0
    norm = net.encoder.global_branch.stages[0][0].norm1
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    conv = net.encoder.local_branch.stages[0][0].project[0]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.2 * (2 / fan_out) ** 0.5


@pytest.mark.parametrize("variant", CAF_VARIANTS)
def test_caf_weights_sum_to_one_and_are_exposed(variant, conv_op):
    torch.manual_seed(0)
    caf = ContextAwareFusion(32, variant=variant, conv_op=conv_op)
    size = (8, 10) if conv_op is nn.Conv2d else (3, 8, 10)
    g, l = torch.randn(3, 32, *size), torch.randn(3, 32, *size) * 3
    a_g, a_l = caf.branch_weights(g, l)
    torch.testing.assert_close(a_g + a_l, torch.ones_like(a_g + a_l))
    assert ((a_g > 0) & (a_g < 1)).all()
    fused = caf(g, l)
    torch.testing.assert_close(fused, a_g * g + a_l * l)
    assert caf.last_global_weight.item() == pytest.approx(a_g.mean().item(), abs=1e-6)
    assert "last_global_weight" not in caf.state_dict()


def test_network_reports_caf_balance_per_stage():
    net = tiny().eval()
    assert all(w != w for w in net.caf_global_weights())  # NaN before any forward
    with torch.inference_mode():  # nnU-Net's predictor runs under inference mode
        net(torch.randn(1, 1, 32, 32))
    weights = net.caf_global_weights()
    assert len(weights) == 4 and all(0 < w < 1 for w in weights)


def test_monte_carlo_attention_deterministic_in_eval_stochastic_in_training(conv_op):
    torch.manual_seed(0)
    mc = MonteCarloAttention(16, conv_op=conv_op)
    size = (12, 12) if conv_op is nn.Conv2d else (4, 6, 6)
    x = torch.randn(2, 16, *size) + torch.linspace(-2, 2, size[-1])  # spatially varying: subsets differ from GAP
    axes = tuple(range(2, x.ndim))
    mc.eval()
    a, b = mc(x), mc(x)
    torch.testing.assert_close(a, b)
    expected = x * torch.sigmoid(mc.fc2(torch.relu(mc.fc1(x.mean(axes))))).view(2, 16, *(1,) * len(size))
    torch.testing.assert_close(a, expected)
    mc.train()
    outs = [mc(x) for _ in range(8)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])
    # A random subset of positions: the descriptor stays within the range of the per-position values.
    desc = mc.descriptor(x)
    assert desc.shape == (2, 16)
    assert (desc >= x.amin(axes) - 1e-6).all() and (desc <= x.amax(axes) + 1e-6).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(preset="XL"), "preset must be one of"),
    (dict(num_heads=(4, 6, 12, 24)), r"num_heads\[0\]=4 must be divisible by the number of dilation rates 3"),
    (dict(widths=(72, 144, 288, 500)), r"num_heads\[3\]=24 must divide widths\[3\]=500"),
    (dict(widths=(72, 144, 288)), "widths needs one value per stage"),
    (dict(caf_variant="mean"), "caf_variant must be one of"),
    (dict(decoder_kv_reduction=(4, 2)), "decoder_kv_reduction needs three factors"),
    (dict(dilations=(1, 0, 3)), "dilations"),
    (dict(dmk_kernel_sizes=(3, 4)), "dmk_kernel_sizes"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FIAS(1, 2, **kwargs)


def test_bad_input_raises(tiny_fias):
    net = tiny_fias()
    wrong_dims = torch.randn(1, 1, 16, 32, 32) if tiny_fias.conv_op is nn.Conv2d else torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"2D network.*3D patch" if tiny_fias.conv_op is nn.Conv2d else
                       r"3D network.*2D patch"):
        net(wrong_dims)
    with pytest.raises(ValueError, match="expected 1 input channels, got 2"):
        net(tiny_fias.input(channels=2))


def test_fullgraph_compile_has_no_graph_breaks(tiny_fias):
    # nnU-Net compiles the network on CUDA by default. A fresh dynamo cache, as in a training process: 2D and 3D
    # FIAS share their forward code, and a second shape seen by the same code would make dynamo recompile it with
    # dynamic shapes. In 3D one MSDA stage: tracing its offsets is most of the time.
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = tiny_fias(**({"msda_stages": (0,)} if tiny_fias.conv_op is nn.Conv3d else {})).train()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = tiny_fias.input()
    outs = compiled(x)  # training mode: Monte Carlo attention and drop-path randomness inside the graph
    sum(o.mean() for o in outs).backward()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], net(x)[0], rtol=1e-4, atol=1e-4)


def test_cpu_memory_layout_choices_do_not_change_the_numbers(monkeypatch):
    # On CPU stages from 16x16 up run channels-last; forcing one layout everywhere must give the same outputs and
    # gradients (64x64 input: stride-4 features are 16x16, coarser ones stay channels-first).
    import nnunetv2_fias.architectures.building_blocks.decoder_blocks as decoder_blocks
    import nnunetv2_fias.architectures.encoder as encoder

    torch.manual_seed(0)
    net = tiny(deep_supervision=True)
    x = torch.randn(2, 1, 64, 64)

    def run():
        torch.manual_seed(1)  # same drop-path and Monte Carlo draws
        net.zero_grad(set_to_none=True)
        outs = net(x)
        sum(o.square().mean() for o in outs).backward()
        return [o.detach() for o in outs], [p.grad.clone() for p in net.parameters()]

    outs, grads = run()
    for module in (decoder_blocks, encoder):
        monkeypatch.setattr(module, "conv_memory_format", lambda t: torch.contiguous_format)
    ref_outs, ref_grads = run()
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    noise = zero_gradient_by_construction(net)
    for (name, _), a, b in zip(net.named_parameters(), grads, ref_grads):
        if name in noise:  # true gradient 0: both are rounding noise
            assert a.abs().max() < 1e-5 and b.abs().max() < 1e-5, name
            continue
        # Relative to the tensor's scale: summation order differs between layouts.
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8, name
