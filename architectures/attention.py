"""Attention primitives of FIAS: dilated neighbourhood attention (MSDA), global multi-head self-attention.

All attention here computes its logits and softmax in fp32, also under autocast, because bf16/fp16 logits overflow
or lose the small differences a softmax over a few keys depends on.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int, dilation: int) -> None:
    if q.ndim != 5:
        raise ValueError(f"q must have shape (B, heads, H, W, head_dim), got {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")


def _window_geometry(kernel_size: int, dilation: int) -> dict:
    return dict(kernel_size=kernel_size, dilation=dilation, padding=(kernel_size // 2) * dilation)


def _windows(t: torch.Tensor, heads: int, kernel_size: int, dilation: int) -> torch.Tensor:
    """``(B, heads * d, H, W)`` -> ``(B, heads, d, K, K, H, W)``: the dilated neighbours of every position, zero
    outside the image.

    A strided view of the zero-padded input (no im2col copy); the layout matches ``F.unfold``/``F.fold``.
    """
    pad = (kernel_size // 2) * dilation
    span = (kernel_size - 1) * dilation + 1
    padded = F.pad(t, (pad, pad, pad, pad))
    win = padded.unfold(2, span, 1).unfold(3, span, 1)[..., ::dilation, ::dilation]  # (B, C, H, W, K, K)
    b, c, height, width = t.shape
    return win.permute(0, 1, 4, 5, 2, 3).view(b, heads, c // heads, kernel_size, kernel_size, height, width)


class _DilatedNeighborhoodAttention(torch.autograd.Function):
    """Dilated neighbourhood attention on channel-first groups ``(B, heads * head_dim, H, W)``.

    The ``K*K`` neighbours are gathered with one ``F.unfold`` (im2col) per tensor and scattered back with one
    ``F.fold`` (col2im, which sums overlapping windows) in backward. Only q, k, v and the ``K*K`` attention weights
    are saved; the unfolded keys/values are recomputed in backward, so memory stays that of the shifted-window
    version while a block issues about 25 kernels instead of several hundred (what dominated on CPU and in GPU launch
    overhead: each shifted slice allocated and zero-filled a padded gradient in backward).
    """

    @staticmethod
    def forward(ctx, q, k, v, heads: int, kernel_size: int, dilation: int, scale: float):
        b, c, height, width = q.shape
        d, kk = c // heads, kernel_size * kernel_size
        geom = _window_geometry(kernel_size, dilation)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        # Logits and softmax in fp32 regardless of autocast: the q*k products are summed over head_dim.
        k_win = _windows(k.float(), heads, kernel_size, dilation)
        logits = ((q.float() * scale).view(b, heads, d, 1, 1, height, width) * k_win).sum(2)
        logits = logits.view(b, heads, kk, height, width)
        del k_win
        # Neighbours outside the image are masked out of the softmax (the centre key is always inside).
        inside = F.unfold(torch.ones(1, 1, height, width, device=q.device), **geom).view(1, 1, kk, height, width)
        attn = logits.masked_fill_(inside == 0, float("-inf")).softmax(dim=2)
        v_win = _windows(v, heads, kernel_size, dilation)
        ks = kernel_size
        out = (attn.to(v.dtype).view(b, heads, 1, ks, ks, height, width) * v_win).sum((3, 4))
        ctx.save_for_backward(q, k, v, attn)
        ctx.geometry = (heads, kernel_size, dilation, scale)
        return out.view(b, c, height, width)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn = ctx.saved_tensors
        heads, kernel_size, dilation, scale = ctx.geometry
        b, c, height, width = q.shape
        d, kk = c // heads, kernel_size * kernel_size
        geom = _window_geometry(kernel_size, dilation)
        size = (height, width)
        ks = kernel_size
        g = grad_out.contiguous().view(b, heads, d, 1, 1, height, width)
        v_win = _windows(v, heads, kernel_size, dilation)
        g_attn = (g * v_win).sum(2).float().view(b, heads, kk, height, width)
        del v_win
        grad_v = None
        if ctx.needs_input_grad[2]:
            g_v_win = attn.to(v.dtype).view(b, heads, 1, ks, ks, height, width) * g
            grad_v = F.fold(g_v_win.view(b, c * kk, height * width), size, **geom)
            del g_v_win
        # Softmax backward; masked neighbours have attn == 0 and get no gradient.
        g_logits = attn * (g_attn - (attn * g_attn).sum(2, keepdim=True)) * scale
        g_logits = g_logits.view(b, heads, 1, ks, ks, height, width)
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            k_win = _windows(k.float(), heads, kernel_size, dilation)
            grad_q = (g_logits * k_win).sum((3, 4)).view(b, c, height, width).to(q.dtype)
            del k_win
        if ctx.needs_input_grad[1]:
            g_k_win = g_logits * q.float().view(b, heads, d, 1, 1, height, width)
            grad_k = F.fold(g_k_win.view(b, c * kk, height * width), size, **geom).to(k.dtype)
        return grad_q, grad_k, grad_v, None, None, None, None


def dilated_neighborhood_attention_channels_first(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    kernel_size: int = 3,
    dilation: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`dilated_neighborhood_attention` on channel-first tensors ``(B, heads * head_dim, H, W)``.

    Channel ``c`` belongs to head ``c // head_dim``. This is the layout MSDA produces without any copy, and the
    output has the same layout.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape (B, heads * head_dim, H, W), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if heads < 1 or q.shape[1] % heads:
        raise ValueError(f"heads={heads} must divide the channel count {q.shape[1]}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    scale = (q.shape[1] // heads) ** -0.5 if scale is None else float(scale)
    return _DilatedNeighborhoodAttention.apply(q, k, v, int(heads), int(kernel_size), int(dilation), scale)


def dilated_neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int = 3,
    dilation: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """Sliding-window attention over a dilated ``kernel_size x kernel_size`` neighbourhood (DilateFormer's MSDA core).

    Every query attends to the keys at ``(y + i * dilation, x + j * dilation)`` for ``i, j`` in
    ``-(kernel_size // 2) .. kernel_size // 2``. Keys outside the image are excluded from the softmax (the official
    unfold implementation lets zero-padded keys take part instead; its formulation is kept as
    :func:`nnunetv2_fias.benchmark.baselines.dilated_neighborhood_attention_unfold`).

    Implementation: a custom autograd function (unfold in forward, fold in backward, unfolded keys/values recomputed
    rather than saved); ``python -m nnunetv2_fias.benchmark.baselines`` compares it with the per-neighbour
    shifted-window formulation and the naive autograd unfold.

    Args:
        q, k, v: tensors of shape ``(B, heads, H, W, head_dim)``.
        kernel_size: odd neighbourhood size.
        dilation: spacing between sampled keys.
        scale: logit scale, ``head_dim ** -0.5`` when None.

    Returns:
        Tensor of shape ``(B, heads, H, W, head_dim)`` in the dtype of ``v``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 16, 20, 8)
        >>> dilated_neighborhood_attention(q, k, v, kernel_size=3, dilation=2).shape
        torch.Size([1, 2, 16, 20, 8])
    """
    _check_qkv(q, k, v, kernel_size, dilation)
    b, heads, height, width, d = q.shape

    def channels_first(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 1, 4, 2, 3).reshape(b, heads * d, height, width)

    out = dilated_neighborhood_attention_channels_first(channels_first(q), channels_first(k), channels_first(v),
                                                        heads, kernel_size, dilation, scale)
    return out.view(b, heads, d, height, width).permute(0, 1, 3, 4, 2)


def fp32_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention`` with logits and softmax in fp32.

    On CUDA the fused kernels (flash / memory-efficient) already accumulate logits and run the softmax in fp32 for
    bf16/fp16 inputs, so inputs stay in low precision there. Elsewhere (CPU math kernel) low-precision inputs are
    upcast first.
    """
    if q.dtype in (torch.float16, torch.bfloat16) and q.device.type != "cuda":
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def _check_heads(dim: int, num_heads: int, arg: str = "num_heads") -> None:
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"{arg}={num_heads} must divide the channel width {dim}")


class MultiScaleDilatedAttention(nn.Module):
    """MSDA: heads split evenly into one group per dilation rate, each group attending to its dilated neighbourhood.

    Args:
        dim: channel width (tokens are channels-last, ``(B, H, W, dim)``).
        num_heads: total heads; must be divisible by ``len(dilations)`` and divide ``dim``.
        dilations: one dilation rate per head group (DilateFormer: 1, 2, 3).
        kernel_size: neighbourhood size (DilateFormer: 3).
        qkv_bias: bias of the q/k/v projection.
        attn_drop, proj_drop: dropout rates.
    """

    def __init__(self, dim: int, num_heads: int, dilations: Sequence[int] = (1, 2, 3), kernel_size: int = 3,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        dilations = tuple(int(d) for d in dilations)
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty sequence of integers >= 1, got {dilations}")
        _check_heads(dim, num_heads)
        if num_heads % len(dilations) != 0:
            raise ValueError(
                f"num_heads={num_heads} must be divisible by the number of dilation rates {len(dilations)} "
                f"(dilations={dilations}): heads are split evenly across dilations")
        if attn_drop > 0:
            raise ValueError("attn_drop is not supported by the fused dilated attention; use 0.0")
        self.dim, self.num_heads, self.dilations, self.kernel_size = dim, num_heads, dilations, kernel_size
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        groups = len(self.dilations)
        heads_per_group = self.num_heads // groups
        # (B, 3C, H, W) view of the channels-last projection; channel order (q/k/v, group, head, head_dim). One split
        # into 3 * groups parts: its backward is a single concatenation, where indexing each part separately would
        # allocate and zero-fill a full-size gradient per part.
        parts = self.qkv(x).permute(0, 3, 1, 2).split(c // groups, dim=1)
        outs = [dilated_neighborhood_attention_channels_first(parts[g], parts[groups + g], parts[2 * groups + g],
                                                              heads_per_group, self.kernel_size, dil)
                for g, dil in enumerate(self.dilations)]
        out = torch.cat(outs, dim=1).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over all positions, through ``scaled_dot_product_attention``.

    Args:
        dim: channel width of the queries (tokens are channels-last, ``(B, H, W, dim)``).
        num_heads: heads; must divide ``dim``.
        kv_reduction: keys and values are average-pooled by this factor first (1 = full attention); keeps
            attention at fine strides affordable (cost falls by ``kv_reduction ** 2``).
        qkv_bias: bias of the q/k/v projections.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, kv_reduction: int = 1, qkv_bias: bool = True,
                 proj_drop: float = 0.0):
        super().__init__()
        _check_heads(dim, num_heads)
        if kv_reduction < 1:
            raise ValueError(f"kv_reduction must be >= 1, got {kv_reduction}")
        self.num_heads, self.head_dim, self.kv_reduction = num_heads, dim // num_heads, int(kv_reduction)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q = self.q(x).view(b, h * w, self.num_heads, self.head_dim).transpose(1, 2)
        kv_src = x
        if self.kv_reduction > 1:
            r = self.kv_reduction
            # ceil_mode so that borders not divisible by r are still represented.
            kv_src = F.avg_pool2d(x.permute(0, 3, 1, 2), r, r, ceil_mode=True).permute(0, 2, 3, 1)
        n_kv = kv_src.shape[1] * kv_src.shape[2]
        # unbind, not kv[0] / kv[1]: its backward is one stack instead of a zero-filled full-size tensor per index.
        k, v = self.kv(kv_src).view(b, n_kv, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = fp32_sdpa(q, k, v).transpose(1, 2).reshape(b, h, w, c)
        return self.proj_drop(self.proj(out))
