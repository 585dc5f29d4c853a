"""Dilated neighbourhood attention on images: the 2D kernel behind :func:`.dilated_neighborhood_attention`.

The ``Ky*Kx`` neighbours are gathered as a strided view of the zero-padded input (no im2col copy) in forward and
scattered back with one ``F.fold`` (col2im, which sums overlapping windows) in backward. Only q, k, v and the
attention weights are saved; the unfolded keys/values are recomputed in backward. A block thus issues a few dozen
kernels instead of one per neighbour, which is what dominated on CPU and in GPU launch overhead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Pair = tuple[int, int]


def _window_geometry(kernel_size: Pair, dilation: Pair) -> dict:
    return dict(kernel_size=kernel_size, dilation=dilation,
                padding=tuple((k // 2) * d for k, d in zip(kernel_size, dilation)))


def _windows(t: torch.Tensor, heads: int, kernel_size: Pair, dilation: Pair) -> torch.Tensor:
    """``(B, heads * d, H, W)`` -> ``(B, heads, d, Ky, Kx, H, W)``: the dilated neighbours of every position, zero
    outside the image, in the layout of ``F.unfold``/``F.fold``."""
    (ky, kx), (dy, dx) = kernel_size, dilation
    py, px = (ky // 2) * dy, (kx // 2) * dx
    padded = F.pad(t, (px, px, py, py))
    win = padded.unfold(2, (ky - 1) * dy + 1, 1).unfold(3, (kx - 1) * dx + 1, 1)[..., ::dy, ::dx]
    b, c, height, width = t.shape
    return win.permute(0, 1, 4, 5, 2, 3).view(b, heads, c // heads, ky, kx, height, width)


class DilatedNeighborhoodAttention2d(torch.autograd.Function):
    """Dilated neighbourhood attention on channel-first groups ``(B, heads * head_dim, H, W)``; ``kernel_size`` and
    ``dilation`` are per-axis pairs (validated by the caller). Logits and softmax in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int, kernel_size: Pair, dilation: Pair, scale: float):
        b, c, height, width = q.shape
        (ky, kx), d = kernel_size, c // heads
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        # Logits and softmax in fp32 regardless of autocast: the q*k products are summed over head_dim.
        k_win = _windows(k.float(), heads, kernel_size, dilation)
        logits = ((q.float() * scale).view(b, heads, d, 1, 1, height, width) * k_win).sum(2)
        logits = logits.view(b, heads, ky * kx, height, width)
        del k_win
        # Neighbours outside the image are masked out of the softmax (the centre key is always inside).
        ones = torch.ones(1, 1, height, width, device=q.device)
        inside = F.unfold(ones, **_window_geometry(kernel_size, dilation)).view(1, 1, ky * kx, height, width)
        attn = logits.masked_fill_(inside == 0, float("-inf")).softmax(dim=2)
        v_win = _windows(v, heads, kernel_size, dilation)
        out = (attn.to(v.dtype).view(b, heads, 1, ky, kx, height, width) * v_win).sum((3, 4))
        ctx.save_for_backward(q, k, v, attn)
        ctx.geometry = (heads, kernel_size, dilation, scale)
        return out.view(b, c, height, width)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn = ctx.saved_tensors
        heads, kernel_size, dilation, scale = ctx.geometry
        b, c, height, width = q.shape
        (ky, kx), d = kernel_size, c // heads
        geom, size = _window_geometry(kernel_size, dilation), (height, width)
        g = grad_out.contiguous().view(b, heads, d, 1, 1, height, width)
        v_win = _windows(v, heads, kernel_size, dilation)
        g_attn = (g * v_win).sum(2).float().view(b, heads, ky * kx, height, width)
        del v_win
        grad_v = None
        if ctx.needs_input_grad[2]:
            g_v_win = attn.to(v.dtype).view(b, heads, 1, ky, kx, height, width) * g
            grad_v = F.fold(g_v_win.view(b, c * ky * kx, height * width), size, **geom)
            del g_v_win
        # Softmax backward; masked neighbours have attn == 0 and get no gradient.
        g_logits = attn * (g_attn - (attn * g_attn).sum(2, keepdim=True)) * scale
        g_logits = g_logits.view(b, heads, 1, ky, kx, height, width)
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            k_win = _windows(k.float(), heads, kernel_size, dilation)
            grad_q = (g_logits * k_win).sum((3, 4)).view(b, c, height, width).to(q.dtype)
            del k_win
        if ctx.needs_input_grad[1]:
            g_k_win = g_logits * q.float().view(b, heads, d, 1, 1, height, width)
            grad_k = F.fold(g_k_win.view(b, c * ky * kx, height * width), size, **geom).to(k.dtype)
        return grad_q, grad_k, grad_v, None, None, None, None
