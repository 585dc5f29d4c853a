"""Dilated neighbourhood attention against a plain loop, plus the fp32-logit guarantee under autocast."""
import pytest
import torch
from torch import nn

from nnunetv2_fias.architectures.attention import (GlobalSelfAttention, MultiScaleDilatedAttention,
                                                   dilated_neighborhood_attention)
from nnunetv2_fias.benchmark.baselines import (dilated_neighborhood_attention_shifted,
                                              dilated_neighborhood_attention_unfold)


def loop_reference(q, k, v, kernel_size, dilation, scale=None, mask=True):
    """Straightforward per-pixel loop in float64: softmax over the in-image keys of the dilated window."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, height, width, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    r = kernel_size // 2
    out = torch.zeros_like(q)
    for y in range(height):
        for x in range(width):
            keys, vals = [], []
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    ny, nx = y + dy * dilation, x + dx * dilation
                    if 0 <= ny < height and 0 <= nx < width:
                        keys.append(k[:, :, ny, nx])
                        vals.append(v[:, :, ny, nx])
                    elif not mask:  # zero padding taking part, as in the official unfold code
                        keys.append(torch.zeros_like(k[:, :, 0, 0]))
                        vals.append(torch.zeros_like(v[:, :, 0, 0]))
            keys, vals = torch.stack(keys, -2), torch.stack(vals, -2)  # (b, h, n, d)
            attn = ((q[:, :, y, x, None, :] * keys).sum(-1) * scale).softmax(-1)
            out[:, :, y, x] = (attn[..., None] * vals).sum(-2)
    return out


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_matches_loop_reference_including_borders(dilation, kernel_size):
    torch.manual_seed(dilation * 10 + kernel_size)
    # 7x9 with dilation 3: most queries have some keys outside the image, several have only a few inside.
    q, k, v = (torch.randn(2, 3, 7, 9, 4) for _ in range(3))
    expected = loop_reference(q, k, v, kernel_size, dilation)
    got = dilated_neighborhood_attention(q, k, v, kernel_size=kernel_size, dilation=dilation)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # The unfold baseline computes the same thing.
    torch.testing.assert_close(dilated_neighborhood_attention_unfold(q, k, v, kernel_size, dilation).double(),
                               expected, rtol=1e-5, atol=1e-5)
    # ... and so does the shifted-window baseline.
    torch.testing.assert_close(dilated_neighborhood_attention_shifted(q, k, v, kernel_size, dilation).double(),
                               expected, rtol=1e-5, atol=1e-5)


def test_unmasked_unfold_reproduces_the_official_zero_padding():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 6, 4) for _ in range(3))
    expected = loop_reference(q, k, v, 3, 2, mask=False)
    got = dilated_neighborhood_attention_unfold(q, k, v, 3, 2, mask_out_of_image=False)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # ... which differs from the masked version exactly at the border.
    masked = dilated_neighborhood_attention(q, k, v, 3, 2)
    assert not torch.allclose(masked[:, :, 0, 0], got[:, :, 0, 0])


def test_custom_scale_and_gradients_match_unfold():
    torch.manual_seed(2)
    inputs = [torch.randn(1, 2, 6, 5, 8, requires_grad=True) for _ in range(3)]
    out_a = dilated_neighborhood_attention(*inputs, kernel_size=3, dilation=2, scale=0.3)
    grads_a = torch.autograd.grad(out_a.square().sum(), inputs)
    out_b = dilated_neighborhood_attention_unfold(*inputs, kernel_size=3, dilation=2, scale=0.3)
    grads_b = torch.autograd.grad(out_b.square().sum(), inputs)
    torch.testing.assert_close(out_a, out_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_logits_and_softmax_are_fp32_under_low_precision_inputs():
    # Logits near 400 that differ by about 1: bf16 logits (spacing 2 at 400) would flatten or scramble the softmax.
    torch.manual_seed(3)
    q = torch.full((1, 1, 6, 6, 16), 10.0).bfloat16()
    k = (10 + 0.1 * torch.randn(1, 1, 6, 6, 16)).bfloat16()
    v = torch.randn(1, 1, 6, 6, 16).bfloat16()
    got = dilated_neighborhood_attention(q, k, v, 3, 1)
    assert got.dtype == torch.bfloat16
    expected = loop_reference(q.float(), k.float(), v.float(), 3, 1)
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("conv_op", [nn.Conv2d, nn.Conv3d], ids=["2d", "3d"])
@pytest.mark.parametrize("module", ["msda", "global"])
def test_attention_modules_under_cpu_autocast_match_fp32(module, conv_op):
    torch.manual_seed(4)
    attn = (MultiScaleDilatedAttention(24, 3, conv_op=conv_op) if module == "msda" else
            GlobalSelfAttention(24, 3, kv_reduction=2, conv_op=conv_op))
    x = torch.randn(2, 9, 11, 24) if conv_op is nn.Conv2d else torch.randn(1, 4, 5, 6, 24)
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, rtol=5e-2, atol=5e-2)


def test_bad_arguments_raise():
    q = torch.randn(1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        dilated_neighborhood_attention(q, q, q, kernel_size=2)
    with pytest.raises(ValueError, match="dilation"):
        dilated_neighborhood_attention(q, q, q, dilation=0)
    with pytest.raises(ValueError, match="shape"):
        dilated_neighborhood_attention(q[0], q[0], q[0])


@pytest.mark.parametrize("conv_op", [nn.Conv2d, nn.Conv3d], ids=["2d", "3d"])
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=4, dilations=(1, 2, 3)), "num_heads=4 must be divisible by the number of dilation rates 3"),
    (dict(num_heads=5, dilations=(1,)), "num_heads=5 must divide the channel width 24"),
    (dict(num_heads=3, dilations=(1, 0, 2)), "dilations"),
    (dict(num_heads=3, dilations=()), "dilations"),
    (dict(num_heads=3, kernel_size=2), "kernel_size"),
    (dict(num_heads=3, kernel_size=(1, 2, 3)), "kernel_size"),
])
def test_attention_modules_check_their_arguments_when_built(conv_op, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleDilatedAttention(24, conv_op=conv_op, **kwargs)
    with pytest.raises(ValueError, match="num_heads=5 must divide the channel width 24"):
        GlobalSelfAttention(24, 5, conv_op=conv_op)


def test_msda_module_matches_per_group_unfold_reference_with_gradients():
    # Guards the qkv channel order (q/k/v, dilation group, head, head_dim) of the single split in MSDA.
    torch.manual_seed(5)
    attn = MultiScaleDilatedAttention(36, 6, dilations=(1, 2, 3))
    x = torch.randn(2, 9, 11, 36, requires_grad=True)
    out = attn(x)
    b, h, w, c = x.shape
    qkv = attn.qkv(x).view(b, h, w, 3, 3, 2, 6).permute(3, 4, 0, 5, 1, 2, 6)  # (3, groups, B, heads, H, W, d)
    ref = torch.cat([dilated_neighborhood_attention_unfold(qkv[0, g], qkv[1, g], qkv[2, g], 3, dil)
                     for g, dil in enumerate((1, 2, 3))], dim=1)
    ref = attn.proj(ref.permute(0, 2, 3, 1, 4).reshape(b, h, w, c))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, attn.qkv.weight])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, attn.qkv.weight])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_fused_attention_gradients_for_low_precision_inputs():
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 2, 6, 7, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = dilated_neighborhood_attention(q, k, v, 3, 2)
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
    assert all(g.dtype == torch.bfloat16 for g in grads)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = dilated_neighborhood_attention_unfold(q32, k32, v32, 3, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), [q32, k32, v32])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2)
