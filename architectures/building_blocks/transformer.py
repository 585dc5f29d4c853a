"""The DilateFormer block: conditional position encoding, attention and MLP on channels-last tokens."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..attention import GlobalSelfAttention, MultiScaleDilatedAttention
from .helpers import DropPath, Mlp, channel_permutations

# DilateFormer's LayerNorm epsilon (its blocks and final norm), kept so that its ImageNet weights behave as trained.
LN_EPS = 1e-6


class DilateBlock(nn.Module):
    """DilateFormer block on channels-last tokens ``(B, *spatial, C)``.

    ``x = x + dwconv3x3(x)`` (conditional position encoding), ``x = x + DropPath(Attn(LN(x)))``,
    ``x = x + DropPath(MLP(LN(x)))``. ``attention="msda"`` uses multi-scale dilated attention, ``"global"`` global
    multi-head self-attention. ``conv_op`` (``nn.Conv2d`` or ``nn.Conv3d``) sets the dimensionality.
    """

    def __init__(self, dim: int, num_heads: int, attention: str = "msda", dilations: Sequence = (1, 2, 3),
                 kernel_size=3, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 conv_op: type[nn.Module] = nn.Conv2d):
        super().__init__()
        self.to_channels_first, self.to_channels_last = channel_permutations(conv_op)
        self.cpe = conv_op(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        if attention == "msda":
            self.attn = MultiScaleDilatedAttention(dim, num_heads, dilations=dilations, kernel_size=kernel_size,
                                                   qkv_bias=qkv_bias, conv_op=conv_op)
        elif attention == "global":
            self.attn = GlobalSelfAttention(dim, num_heads, qkv_bias=qkv_bias, conv_op=conv_op)
        else:
            raise ValueError(f"attention must be 'msda' or 'global', got {attention!r}")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels-last tensor permuted to channels-first is in channels_last layout: no copy for the conv.
        x = x + self.cpe(x.permute(self.to_channels_first)).permute(self.to_channels_last)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
