"""Functional attention: dilated neighbourhood attention on 2D and 3D maps, and SDPA with fp32 logits.

All attention here computes its logits and softmax in fp32, also under autocast, because bf16/fp16 logits overflow
or lose the small differences a softmax over a few keys depends on.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

from ..building_blocks.helpers import per_axis
from .kernel2d import DilatedNeighborhoodAttention2d
from .kernel3d import DilatedNeighborhoodAttention3d

IntOrTuple = Union[int, Sequence[int]]
# The kernel for each number of spatial axes.
_KERNELS = {2: DilatedNeighborhoodAttention2d, 3: DilatedNeighborhoodAttention3d}


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check ``(B, heads, *spatial, head_dim)`` inputs; return the per-axis kernel size and dilation."""
    if q.ndim - 3 not in _KERNELS:
        raise ValueError(f"q must have shape (B, heads, H, W, head_dim) or (B, heads, D, H, W, head_dim), got "
                         f"{tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return per_axis(kernel_size, q.ndim - 3, "kernel_size", odd=True), per_axis(dilation, q.ndim - 3, "dilation")


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           kernel_size: tuple[int, ...], dilation: tuple[int, ...], scale: float | None
                           ) -> torch.Tensor:
    """The kernel for ``q``'s dimensionality on checked channel-first inputs (per-axis ``kernel_size`` and
    ``dilation``); what MSDA calls after validating its arguments once."""
    scale = (q.shape[1] // heads) ** -0.5 if scale is None else float(scale)
    return _KERNELS[q.ndim - 2].apply(q, k, v, heads, kernel_size, dilation, scale)


def dilated_neighborhood_attention_channels_first(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    kernel_size: IntOrTuple = 3,
    dilation: IntOrTuple = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`dilated_neighborhood_attention` on channel-first tensors ``(B, heads * head_dim, *spatial)``.

    Channel ``c`` belongs to head ``c // head_dim``. This is the layout MSDA produces without any copy, and the
    output has the same layout.
    """
    if q.ndim - 2 not in _KERNELS or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape (B, heads * head_dim, H, W) or (B, heads * head_dim, D, "
                         f"H, W), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or q.shape[1] % heads:
        raise ValueError(f"heads={heads!r} must divide the channel count {q.shape[1]}")
    ndim = q.ndim - 2
    return neighborhood_attention(q, k, v, heads, per_axis(kernel_size, ndim, "kernel_size", odd=True),
                                  per_axis(dilation, ndim, "dilation"), scale)


def dilated_neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrTuple = 3,
    dilation: IntOrTuple = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """Sliding-window attention over a dilated neighbourhood of every position (DilateFormer's MSDA core), on images
    or volumes.

    Every query attends to the keys at ``position + i * dilation`` per axis, for ``i`` in
    ``-(kernel_size // 2) .. kernel_size // 2``. Keys outside the image are excluded from the softmax (the official
    unfold implementation lets zero-padded keys take part instead).

    Args:
        q, k, v: tensors of shape ``(B, heads, H, W, head_dim)`` or ``(B, heads, D, H, W, head_dim)``.
        kernel_size: odd neighbourhood size, an int or one per spatial axis (e.g. ``(1, 3, 3)``).
        dilation: spacing between sampled keys, an int or one per spatial axis.
        scale: logit scale, ``head_dim ** -0.5`` when None.

    Returns:
        Tensor of ``q``'s shape in the dtype of ``v``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 16, 20, 8)
        >>> dilated_neighborhood_attention(q, k, v, kernel_size=3, dilation=2).shape
        torch.Size([1, 2, 16, 20, 8])
    """
    kernel_size, dilation = _check_qkv(q, k, v, kernel_size, dilation)
    b, heads, *spatial, d = q.shape
    to_first = (0, 1, q.ndim - 1, *range(2, q.ndim - 1))

    def channels_first(t: torch.Tensor) -> torch.Tensor:
        return t.permute(to_first).reshape(b, heads * d, *spatial)

    out = neighborhood_attention(channels_first(q), channels_first(k), channels_first(v), heads, kernel_size,
                                 dilation, scale)
    return out.view(b, heads, d, *spatial).permute(0, 1, *range(3, q.ndim), 2)


def fp32_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention`` with logits and softmax in fp32.

    On CUDA the fused kernels (flash / memory-efficient) already accumulate logits and run the softmax in fp32 for
    bf16/fp16 inputs, so inputs stay in low precision there. Elsewhere (CPU math kernel) low-precision inputs are
    upcast first.
    """
    if q.dtype in (torch.float16, torch.bfloat16) and q.device.type != "cuda":
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v)
