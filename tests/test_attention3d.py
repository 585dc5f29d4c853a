"""3D dilated neighbourhood attention against a plain loop: borders, per-axis kernels/dilations, gradients, low
precision, argument checks, the MSDA module, and what is kept for backward."""
import itertools

import pytest
import torch

from torch import nn

from nnunetv2_fias.architectures.attention import (MultiScaleDilatedAttention, dilated_neighborhood_attention,
                                                   dilated_neighborhood_attention_channels_first)

# The 3D kernel behind the N-d functions: (B, heads, D, H, W, head_dim) inputs.
dilated_neighborhood_attention_3d = dilated_neighborhood_attention


def _triple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


def loop_reference(q, k, v, kernel_size, dilation, scale=None):
    """Per-voxel loop in float64: softmax over the in-volume keys of the dilated window (differentiable)."""
    q, k, v = q.double(), k.double(), v.double()
    _, _, depth, height, width, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    (kz, ky, kx), (dz, dy, dx) = _triple(kernel_size), _triple(dilation)
    rows = []
    for z, y, x in itertools.product(range(depth), range(height), range(width)):
        keys, vals = [], []
        for i, j, l in itertools.product(range(-(kz // 2), kz // 2 + 1), range(-(ky // 2), ky // 2 + 1),
                                         range(-(kx // 2), kx // 2 + 1)):
            nz, ny, nx = z + i * dz, y + j * dy, x + l * dx
            if 0 <= nz < depth and 0 <= ny < height and 0 <= nx < width:
                keys.append(k[:, :, nz, ny, nx])
                vals.append(v[:, :, nz, ny, nx])
        keys, vals = torch.stack(keys, -2), torch.stack(vals, -2)  # (B, heads, n, d)
        attn = ((q[:, :, z, y, x, None, :] * keys).sum(-1) * scale).softmax(-1)
        rows.append((attn[..., None] * vals).sum(-2))
    return torch.stack(rows, 2).unflatten(2, (depth, height, width))


def _qkv(shape, seed, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


CASES = [  # (kernel_size, dilation, (D, H, W)): every case has queries whose window crosses the border
    (3, 1, (3, 4, 5)),
    (3, 2, (3, 3, 5)),
    (3, 3, (4, 4, 5)),
    (3, (1, 2, 3), (3, 4, 7)),
    ((1, 3, 3), 1, (3, 4, 5)),
    ((1, 3, 3), (3, 2, 1), (3, 5, 4)),
    (3, 3, (2, 5, 4)),  # D=2: smaller than the dilated kernel (span 7) along z
    ((3, 5, 1), (2, 1, 1), (5, 4, 3)),
]


@pytest.mark.parametrize("kernel_size, dilation, size", CASES)
def test_forward_and_gradients_match_loop_reference(kernel_size, dilation, size):
    q, k, v = _qkv((2, 2, *size, 3), seed=sum(size), requires_grad=True)
    out = dilated_neighborhood_attention_3d(q, k, v, kernel_size=kernel_size, dilation=dilation)
    expected = loop_reference(q, k, v, kernel_size, dilation)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((out * weight).sum(), [q, k, v])
    ref_grads = torch.autograd.grad((expected * weight.double()).sum(), [q, k, v])
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_custom_scale_matches_loop_reference():
    q, k, v = _qkv((1, 2, 3, 4, 4, 5), seed=1)
    out = dilated_neighborhood_attention_3d(q, k, v, kernel_size=3, dilation=2, scale=0.7)
    torch.testing.assert_close(out.double(), loop_reference(q, k, v, 3, 2, scale=0.7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size, dilation", [(3, (1, 2, 1)), ((1, 3, 3), 2)])
def test_gradcheck_float64(kernel_size, dilation):
    q, k, v = _qkv((1, 2, 2, 3, 2, 2), seed=2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: dilated_neighborhood_attention_3d(a, b, c, kernel_size, dilation, scale=0.9), (q, k, v))


def test_gradients_when_only_some_inputs_require_them():
    full = _qkv((1, 2, 3, 4, 5, 4), seed=3, requires_grad=True)
    grads = torch.autograd.grad(dilated_neighborhood_attention_3d(*full, 3, 2).square().sum(), full)
    for which in range(3):
        inputs = [t.detach().requires_grad_(i == which) for i, t in enumerate(full)]
        (grad,) = torch.autograd.grad(dilated_neighborhood_attention_3d(*inputs, 3, 2).square().sum(),
                                      inputs[which])
        torch.testing.assert_close(grad, grads[which])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_finite_and_close(dtype):
    q, k, v = _qkv((1, 2, 3, 5, 4, 8), seed=4, dtype=dtype, requires_grad=True)
    out = dilated_neighborhood_attention_3d(q, k, v, kernel_size=3, dilation=(1, 2, 1))
    assert out.dtype == dtype and torch.isfinite(out).all()
    q32, k32, v32 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = loop_reference(q32, k32, v32, 3, (1, 2, 1))
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
    ref_grads = torch.autograd.grad(expected.square().sum(), [q32, k32, v32])
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=5e-2, atol=5e-2)


def test_logits_and_softmax_are_fp32_for_bfloat16_inputs():
    # Logits near 400 that differ by about 1: bf16 logits (spacing 2 at 400) would flatten or scramble the softmax.
    gen = torch.Generator().manual_seed(5)
    q = torch.full((1, 1, 3, 4, 4, 16), 10.0).bfloat16()
    k = (10 + 0.1 * torch.randn(1, 1, 3, 4, 4, 16, generator=gen)).bfloat16()
    v = torch.randn(1, 1, 3, 4, 4, 16, generator=gen).bfloat16()
    got = dilated_neighborhood_attention_3d(q, k, v, 3, 1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), loop_reference(q, k, v, 3, 1), rtol=2e-2, atol=2e-2)


def test_no_unfolded_neighbourhood_is_saved_for_backward():
    # head_dim 16: q, k, v and the fp32 attention weights (27 per voxel and head) come to 3 + 27/16 times q; the
    # unfolded keys alone would be 27 times q.
    q, k, v = _qkv((2, 2, 6, 7, 8, 16), seed=6, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = dilated_neighborhood_attention_3d(q, k, v, kernel_size=3, dilation=2)
    assert 0 < sum(saved) < 6 * q.numel() * q.element_size()
    out.sum().backward()  # what was saved suffices
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_channels_first_variant_matches():
    q, k, v = _qkv((2, 3, 3, 4, 5, 4), seed=7)
    expected = dilated_neighborhood_attention_3d(q, k, v, (1, 3, 3), (1, 2, 2))

    def channels_first(t):
        return t.permute(0, 1, 5, 2, 3, 4).reshape(2, 12, 3, 4, 5)

    got = dilated_neighborhood_attention_channels_first(*map(channels_first, (q, k, v)), 3, (1, 3, 3), (1, 2, 2))
    assert got.shape == (2, 12, 3, 4, 5)
    torch.testing.assert_close(got, channels_first(expected))


def test_bad_arguments_raise_naming_the_argument():
    q = torch.randn(1, 1, 3, 3, 3, 2)
    for bad in (2, 0, -1, (3, 3), (3, 2, 3), 3.0, True, "3"):
        with pytest.raises(ValueError, match="kernel_size"):
            dilated_neighborhood_attention_3d(q, q, q, kernel_size=bad)
    for bad in (0, (1, 0, 1), (1, 2), 1.5, None):
        with pytest.raises(ValueError, match="dilation"):
            dilated_neighborhood_attention_3d(q, q, q, dilation=bad)
    with pytest.raises(ValueError, match="shape"):
        dilated_neighborhood_attention_3d(q[0, 0], q[0, 0], q[0, 0])  # neither 2 nor 3 spatial axes
    with pytest.raises(ValueError, match="shape"):
        dilated_neighborhood_attention_3d(q, q, q[..., :1])
    x = torch.randn(1, 6, 3, 3, 3)
    with pytest.raises(ValueError, match="heads=4 must divide the channel count 6"):
        dilated_neighborhood_attention_channels_first(x, x, x, 4)


def test_msda3d_shape_and_per_group_reference_with_gradients():
    # Guards the qkv channel order (q/k/v, dilation group, head, head_dim) of the single split.
    torch.manual_seed(8)
    dilations = (1, (1, 2, 2), 3)
    attn = MultiScaleDilatedAttention(24, 6, dilations=dilations, kernel_size=(1, 3, 3), qkv_bias=False,
                                      conv_op=nn.Conv3d)
    assert attn.qkv.bias is None and attn.proj.weight.shape == (24, 24)
    x = torch.randn(2, 3, 5, 4, 24, requires_grad=True)
    out = attn(x)
    assert out.shape == x.shape
    b, depth, height, width, c = x.shape
    qkv = attn.qkv(x).view(b, depth, height, width, 3, 3, 2, 4).permute(4, 5, 0, 6, 1, 2, 3, 7)
    ref = torch.cat([dilated_neighborhood_attention_3d(qkv[0, g], qkv[1, g], qkv[2, g], (1, 3, 3), dil)
                     for g, dil in enumerate(dilations)], dim=1)
    ref = attn.proj(ref.permute(0, 2, 3, 4, 1, 5).reshape(b, depth, height, width, c))
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), [x, attn.qkv.weight])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, attn.qkv.weight])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
