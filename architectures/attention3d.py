"""Dilated neighbourhood attention on volumes: the 3D counterpart of :mod:`.attention`'s MSDA core.

torch has no 3D ``unfold``/``fold``, and materialising the ``Kz*Ky*Kx`` neighbours of every voxel would multiply
the memory of a volume by 27. So the neighbours are visited one offset at a time as shifted slices of a zero-padded
volume (views, no copy): logits and the weighted sum of values in forward, and in backward the key/value gradients are
added into the same shifted slices of a padded gradient buffer, then cropped. Only q, k, v and the fp32 attention
weights are kept for backward. Logits and softmax are at least fp32 whatever the input dtype, as in 2D (float64
stays float64). Kernel size and dilation may differ per axis, for anisotropic plans (e.g. a kernel of 1 along z).
"""
from __future__ import annotations

import operator
from itertools import product
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .attention import _check_heads

Triple = Tuple[int, int, int]
IntOrTriple = Union[int, Sequence[int]]


def _triple(value: IntOrTriple, name: str, odd: bool) -> Triple:
    """``value`` as a per-axis ``(z, y, x)`` triple; ValueError naming ``name`` otherwise."""
    expected = "a positive odd int or a 3-tuple of them" if odd else "an int >= 1 or a 3-tuple of them"
    items = value if isinstance(value, (tuple, list, torch.Size)) else (value,) * 3
    try:
        if len(items) != 3 or any(isinstance(v, bool) for v in items):
            raise TypeError
        out = tuple(operator.index(v) for v in items)
    except TypeError:
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if any(v < 1 or (odd and v % 2 == 0) for v in out):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return out


def _offsets(kernel_size: Triple, dilation: Triple):
    """For every neighbour: its index in the window and, per axis, the start of its slice in the padded volume
    and its signed shift from the query."""
    ranges = [[(i * d, (i - k // 2) * d) for i in range(k)] for k, d in zip(kernel_size, dilation)]
    for n, per_axis in enumerate(product(*ranges)):
        starts = tuple(start for start, _ in per_axis)
        shifts = tuple(shift for _, shift in per_axis)
        yield n, starts, shifts


def _pad_groups(t: torch.Tensor, heads: int, kernel_size: Triple, dilation: Triple, dtype: torch.dtype
                ) -> torch.Tensor:
    """``(B, heads * d, D, H, W)`` -> ``(B, heads, d, D + 2pz, H + 2py, W + 2px)``, zero-padded by the reach of
    the dilated kernel."""
    pz, py, px = ((ks // 2) * dl for ks, dl in zip(kernel_size, dilation))
    return F.pad(t.to(dtype), (px, px, py, py, pz, pz)).unflatten(1, (heads, -1))


def _shifted(padded: torch.Tensor, starts: Triple, size: Triple) -> torch.Tensor:
    """The view of a padded volume holding, at every voxel, its neighbour at one offset."""
    (sz, sy, sx), (d, h, w) = starts, size
    return padded[..., sz:sz + d, sy:sy + h, sx:sx + w]


def _mask_outside(logits_n: torch.Tensor, shifts: Triple) -> None:
    """Set to -inf, in place, the logits of ``(..., D, H, W)`` whose key at ``shifts`` lies outside the volume.

    The out-of-volume voxels of one offset are slabs at the borders, so plain slicing suffices (no mask tensor).
    """
    for axis, shift in zip((-3, -2, -1), shifts):
        index = [slice(None)] * logits_n.ndim
        if shift < 0:
            index[axis] = slice(None, -shift)
        elif shift > 0:
            index[axis] = slice(max(logits_n.shape[axis] - shift, 0), None)
        else:
            continue
        logits_n[tuple(index)] = float("-inf")


class _DilatedNeighborhoodAttention3d(torch.autograd.Function):
    """Dilated neighbourhood attention on channel-first groups ``(B, heads * head_dim, D, H, W)``.

    One pass over the ``Kz*Ky*Kx`` offsets each way, with temporaries the size of q per offset, never the unfolded
    neighbourhood. Keys/values are re-padded in backward instead of being saved.
    """

    @staticmethod
    def forward(ctx, q, k, v, heads: int, kernel_size: Triple, dilation: Triple, scale: float):
        size = tuple(q.shape[2:])
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        n_keys = kernel_size[0] * kernel_size[1] * kernel_size[2]
        # At least fp32 (float64 stays float64, for gradcheck).
        acc = torch.promote_types(q.dtype, torch.float32)
        qs = (q.to(acc) * scale).unflatten(1, (heads, -1))
        k_pad = _pad_groups(k, heads, kernel_size, dilation, acc)
        logits = q.new_empty((qs.shape[0], heads, n_keys, *size), dtype=acc)
        for n, starts, shifts in _offsets(kernel_size, dilation):
            logits[:, :, n] = (qs * _shifted(k_pad, starts, size)).sum(2)
            _mask_outside(logits[:, :, n], shifts)
        del qs, k_pad
        # Softmax in place over the neighbours; the centre key is always inside, so no row is all -inf.
        attn = logits.sub_(logits.amax(2, keepdim=True)).exp_()
        attn.div_(attn.sum(2, keepdim=True))
        v_pad = _pad_groups(v, heads, kernel_size, dilation, acc)
        out = q.new_zeros(q.shape, dtype=acc).unflatten(1, (heads, -1))
        for n, starts, _ in _offsets(kernel_size, dilation):
            out.addcmul_(attn[:, :, n].unsqueeze(2), _shifted(v_pad, starts, size))
        ctx.save_for_backward(q, k, v, attn)
        ctx.geometry = (heads, kernel_size, dilation, scale)
        return out.flatten(1, 2).to(v.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, attn = ctx.saved_tensors
        heads, kernel_size, dilation, scale = ctx.geometry
        size = tuple(q.shape[2:])
        pz, py, px = ((ks // 2) * dl for ks, dl in zip(kernel_size, dilation))

        def cropped(t_pad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            inner = t_pad[..., pz:pz + size[0], py:py + size[1], px:px + size[2]]
            return inner.flatten(1, 2).to(like.dtype).contiguous()

        acc = attn.dtype
        g = grad_out.to(acc).unflatten(1, (heads, -1))
        v_pad = _pad_groups(v, heads, kernel_size, dilation, acc)
        g_attn = torch.empty_like(attn)
        grad_v_pad = torch.zeros_like(v_pad) if ctx.needs_input_grad[2] else None
        for n, starts, _ in _offsets(kernel_size, dilation):
            g_attn[:, :, n] = (g * _shifted(v_pad, starts, size)).sum(2)
            if grad_v_pad is not None:
                _shifted(grad_v_pad, starts, size).addcmul_(attn[:, :, n].unsqueeze(2), g)
        del v_pad
        grad_v = cropped(grad_v_pad, v) if grad_v_pad is not None else None
        del grad_v_pad
        # Softmax backward in place: g_logits = attn * (g_attn - sum(attn * g_attn)) * scale. Keys outside the
        # volume have attn == 0 and get no gradient.
        g_logits = g_attn.sub_((attn * g_attn).sum(2, keepdim=True)).mul_(attn).mul_(scale)
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            k_pad = _pad_groups(k, heads, kernel_size, dilation, acc)
            grad_q = torch.zeros_like(g)
            for n, starts, _ in _offsets(kernel_size, dilation):
                grad_q.addcmul_(g_logits[:, :, n].unsqueeze(2), _shifted(k_pad, starts, size))
            del k_pad
            grad_q = grad_q.flatten(1, 2).to(q.dtype)
        if ctx.needs_input_grad[1]:
            qf = q.to(acc).unflatten(1, (heads, -1))
            grad_k_pad = torch.zeros(*qf.shape[:3], *(s + 2 * p for s, p in zip(size, (pz, py, px))),
                                     dtype=acc, device=q.device)
            for n, starts, _ in _offsets(kernel_size, dilation):
                _shifted(grad_k_pad, starts, size).addcmul_(g_logits[:, :, n].unsqueeze(2), qf)
            grad_k = cropped(grad_k_pad, k)
        return grad_q, grad_k, grad_v, None, None, None, None


def dilated_neighborhood_attention_3d_channels_first(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    kernel_size: IntOrTriple = 3,
    dilation: IntOrTriple = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`dilated_neighborhood_attention_3d` on channel-first tensors ``(B, heads * head_dim, D, H, W)``.

    Channel ``c`` belongs to head ``c // head_dim``; the output has the same layout (the one a 3D MSDA produces
    from its projection without a copy).
    """
    if q.ndim != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape (B, heads * head_dim, D, H, W), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or q.shape[1] % heads:
        raise ValueError(f"heads={heads!r} must divide the channel count {q.shape[1]}")
    kernel_size = _triple(kernel_size, "kernel_size", odd=True)
    dilation = _triple(dilation, "dilation", odd=False)
    scale = (q.shape[1] // heads) ** -0.5 if scale is None else float(scale)
    return _DilatedNeighborhoodAttention3d.apply(q, k, v, heads, kernel_size, dilation, scale)


def dilated_neighborhood_attention_3d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTriple = 3,
    dilation: IntOrTriple = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """Sliding-window attention over a dilated ``Kz x Ky x Kx`` neighbourhood of every voxel.

    Every query at ``(z, y, x)`` attends to the keys at ``(z + i * dz, y + j * dy, x + l * dx)`` for ``i, j, l`` in
    ``-(K // 2) .. K // 2`` of each axis. Keys outside the volume are excluded from the softmax.

    Args:
        q, k, v: tensors of shape ``(B, heads, D, H, W, head_dim)``.
        kernel_size: odd neighbourhood size, one int or a per-axis ``(Kz, Ky, Kx)`` (e.g. ``(1, 3, 3)``).
        dilation: spacing between sampled keys, one int or a per-axis ``(dz, dy, dx)``.
        scale: logit scale, ``head_dim ** -0.5`` when None.

    Returns:
        Tensor of shape ``(B, heads, D, H, W, head_dim)`` in the dtype of ``v``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 4, 6, 5, 8)
        >>> dilated_neighborhood_attention_3d(q, k, v, kernel_size=(1, 3, 3), dilation=2).shape
        torch.Size([1, 2, 4, 6, 5, 8])
    """
    if q.ndim != 6 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape (B, heads, D, H, W, head_dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, heads, depth, height, width, d = q.shape

    def channels_first(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 1, 5, 2, 3, 4).reshape(b, heads * d, depth, height, width)

    out = dilated_neighborhood_attention_3d_channels_first(channels_first(q), channels_first(k), channels_first(v),
                                                           heads, kernel_size, dilation, scale)
    return out.view(b, heads, d, depth, height, width).permute(0, 1, 3, 4, 5, 2)


class MultiScaleDilatedAttention3d(nn.Module):
    """3D MSDA: heads split evenly into one group per dilation rate, each attending to its dilated neighbourhood.

    Args:
        dim: channel width (tokens are channels-last, ``(B, D, H, W, dim)``).
        num_heads: total heads; must be divisible by ``len(dilations)`` and divide ``dim``.
        dilations: one dilation rate per head group, each an int or a per-axis ``(dz, dy, dx)``.
        kernel_size: neighbourhood size, an int or a per-axis ``(Kz, Ky, Kx)``.
        qkv_bias: bias of the q/k/v projection.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, dilations: Sequence[IntOrTriple] = (1, 2, 3),
                 kernel_size: IntOrTriple = 3, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if isinstance(dilations, (int, str)) or not dilations:
            raise ValueError(f"dilations must be a non-empty sequence of dilation rates, got {dilations!r}")
        _check_heads(dim, num_heads)
        if num_heads % len(dilations) != 0:
            raise ValueError(
                f"num_heads={num_heads} must be divisible by the number of dilation rates {len(dilations)} "
                f"(dilations={tuple(dilations)}): heads are split evenly across dilations")
        dilations = tuple(_triple(d, "dilations", odd=False) for d in dilations)
        self.dim, self.num_heads, self.dilations = dim, num_heads, dilations
        self.kernel_size = _triple(kernel_size, "kernel_size", odd=True)
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        groups = len(self.dilations)
        heads_per_group = self.num_heads // groups
        # Channel order of the projection: (q/k/v, group, head, head_dim); one split, whose backward is a single
        # concatenation (as in 2D).
        parts = self.qkv(x).permute(0, 4, 1, 2, 3).split(c // groups, dim=1)
        outs = [dilated_neighborhood_attention_3d_channels_first(parts[g], parts[groups + g], parts[2 * groups + g],
                                                                 heads_per_group, self.kernel_size, dil)
                for g, dil in enumerate(self.dilations)]
        out = torch.cat(outs, dim=1).permute(0, 2, 3, 4, 1)
        return self.proj_drop(self.proj(out))
