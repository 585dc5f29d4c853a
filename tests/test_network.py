"""Contracts of the FIAS network: shapes, deep supervision, state dicts, gradients, blocks, compile, bad arguments."""
import pytest
import torch

from nnunetv2_fias.architectures import (FIAS, FIAS_PRESETS, CAF_VARIANTS, ContextAwareFusion,
                                         MonteCarloAttention)

# A narrow, shallow FIAS: every component of the real one, sized for fast CPU tests of shape logic.
TINY = dict(widths=(12, 24, 48, 96), global_depths=(1, 1, 1, 1), num_heads=(3, 3, 6, 6), local_depths=(1, 1, 1, 1))
PATCH_SIZES = [(64, 64), (40, 224), (256, 224), (20, 320), (512, 448)]


def tiny(input_channels=1, num_classes=3, deep_supervision=False, **kwargs):
    return FIAS(input_channels, num_classes, deep_supervision=deep_supervision, **{**TINY, **kwargs})


@pytest.mark.parametrize("size", PATCH_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_any_nnunet_patch_size_with_and_without_deep_supervision(size):
    torch.manual_seed(0)
    net = tiny(input_channels=2, num_classes=4, deep_supervision=True).eval()
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
    assert outs[0].shape[2:] == size
    assert [tuple(o.shape[2:]) for o in outs[1:]] == [tuple(max(1, round(s / st)) for s in size) for st in (8, 16, 32)]
    assert isinstance(single, torch.Tensor) and single.shape == (1, 4, *size)
    torch.testing.assert_close(single, outs[0])


@pytest.mark.parametrize("channels,classes", [(1, 2), (3, 14), (4, 1)])
def test_any_number_of_channels_and_classes(channels, classes):
    out = tiny(channels, classes).eval()(torch.randn(2, channels, 32, 48))
    assert out.shape == (2, classes, 32, 48)


def test_default_preset_forward_backward_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = FIAS(1, 3, preset="T", deep_supervision=True)
    outs = net(torch.randn(2, 1, 64, 64))
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    zero = [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


def test_without_deep_supervision_every_parameter_still_takes_part_in_training():
    # DDP without find_unused_parameters (nnU-Net -num_gpus) needs every parameter in the graph.
    net = tiny(deep_supervision=False)
    net(torch.randn(2, 1, 32, 32)).mean().backward()
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
def test_caf_weights_sum_to_one_and_are_exposed(variant):
    torch.manual_seed(0)
    caf = ContextAwareFusion(32, variant=variant)
    g, l = torch.randn(3, 32, 8, 10), torch.randn(3, 32, 8, 10) * 3
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


def test_monte_carlo_attention_deterministic_in_eval_stochastic_in_training():
    torch.manual_seed(0)
    mc = MonteCarloAttention(16)
    x = torch.randn(2, 16, 12, 12) + torch.linspace(-2, 2, 12)  # spatially varying, so subsets differ from GAP
    mc.eval()
    a, b = mc(x), mc(x)
    torch.testing.assert_close(a, b)
    expected = x * torch.sigmoid(mc.fc2(torch.relu(mc.fc1(x.mean((2, 3))))))[:, :, None, None]
    torch.testing.assert_close(a, expected)
    mc.train()
    outs = [mc(x) for _ in range(8)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])
    # A random subset of positions: the descriptor stays within the range of the per-position values.
    desc = mc.descriptor(x)
    assert desc.shape == (2, 16)
    assert (desc >= x.amin((2, 3)) - 1e-6).all() and (desc <= x.amax((2, 3)) + 1e-6).all()


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


def test_bad_input_raises():
    net = tiny()
    with pytest.raises(ValueError, match=r"2D network.*3D patch"):
        net(torch.randn(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="expected 1 input channels, got 2"):
        net(torch.randn(1, 2, 32, 32))


def test_fullgraph_compile_has_no_graph_breaks():
    torch._dynamo.reset()  # a fresh dynamo cache, as in a training process
    torch.manual_seed(0)
    net = tiny(deep_supervision=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 1, 40, 56)
    outs = compiled(x)  # training mode: Monte Carlo attention and drop-path randomness inside the graph
    sum(o.mean() for o in outs).backward()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], net(x)[0], rtol=1e-4, atol=1e-4)


def test_cpu_memory_layout_choices_do_not_change_the_numbers(monkeypatch):
    # On CPU stages from 16x16 up run channels-last; forcing one layout everywhere must give the same outputs and
    # gradients (64x64 input: stride-4 features are 16x16, coarser ones stay channels-first).
    import nnunetv2_fias.architectures.blocks as blocks
    import nnunetv2_fias.architectures.fias as fias_module

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
    for module in (blocks, fias_module):
        monkeypatch.setattr(module, "conv_memory_format", lambda t: torch.contiguous_format)
    ref_outs, ref_grads = run()
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(net.named_parameters(), grads, ref_grads):
        if name.startswith("encoder.global_branch.downsamples.") and name.endswith(".0.bias"):
            # DilateFormer's biased convolution before BatchNorm: the bias's true gradient is 0, both are noise.
            assert a.abs().max() < 1e-5 and b.abs().max() < 1e-5, name
            continue
        # Relative to the tensor's scale: summation order differs between layouts.
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8, name
