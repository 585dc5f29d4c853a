"""Dilated neighbourhood attention on volumes: the 3D kernel behind :func:`.dilated_neighborhood_attention`.

torch has no 3D ``unfold``/``fold``, and materialising the ``Kz*Ky*Kx`` neighbours of every voxel would multiply
the memory of a volume by 27. So the neighbours are visited one offset at a time as shifted slices of a zero-padded
volume (views, no copy): logits and the weighted sum of values in forward, and in backward the key/value gradients are
added into the same shifted slices of a padded gradient buffer, then cropped. Only q, k, v and the attention weights
are kept for backward. Logits and softmax are at least fp32 whatever the input dtype (float64 stays float64).
"""
from __future__ import annotations

from itertools import product

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Triple = tuple[int, int, int]


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


class DilatedNeighborhoodAttention3d(torch.autograd.Function):
    """Dilated neighbourhood attention on channel-first groups ``(B, heads * head_dim, D, H, W)``; ``kernel_size``
    and ``dilation`` are per-axis triples (validated by the caller).

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
