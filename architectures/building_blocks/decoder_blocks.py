"""The MixAtt decoder's blocks: Monte Carlo channel attention, the MixAtt stage, and the light convolutional stage
used at the stems' resolutions."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import GlobalSelfAttention
from .convs import ConvNormAct
from .helpers import channel_permutations, conv_memory_format, convert_conv_op_to_dim, get_matching_interpolation


def upsample_and_concat(d: torch.Tensor, skip: torch.Tensor, mode: str) -> torch.Tensor:
    """``concat(up(d), skip)`` in the memory format the following convolution runs fastest in."""
    d = F.interpolate(d, size=skip.shape[2:], mode=mode, align_corners=False)
    x = torch.cat([d, skip], dim=1)
    return x.contiguous(memory_format=conv_memory_format(x))


class MonteCarloAttention(nn.Module):
    """SvANet's Monte Carlo channel attention: ``out = x * sigmoid(fc2(relu(fc1(descriptor(x)))))``.

    In training the descriptor is stochastic: a pooling size ``k`` is drawn from ``pool_sizes``, the spatial positions
    are shuffled, and one cell of the ``k x k`` average pooling is taken. A random cell of a pooled random
    permutation is the mean over a random subset of ``H*W / k**2`` positions (in 3D of ``D*H*W / k**3`` positions,
    a cell of ``k x k x k`` pooling), which is what is computed (no full
    shuffled copy). All candidates are computed and one is selected by a random index, so the graph is static under
    ``torch.compile``. In evaluation the descriptor is global average pooling.

    Args:
        channels: width of ``x``.
        pool_sizes: candidate pooling sizes (SvANet: 1, 2, 3).
        reduction: hidden width is ``max(channels // reduction, min_hidden)``.
        min_hidden: lower bound of the hidden width.
        conv_op: ``nn.Conv2d`` for images, ``nn.Conv3d`` for volumes.
    """

    def __init__(self, channels: int, pool_sizes: Sequence[int] = (1, 2, 3), reduction: int = 4, min_hidden: int = 32,
                 conv_op: type[nn.Module] = nn.Conv2d):
        super().__init__()
        pool_sizes = tuple(int(k) for k in pool_sizes)
        if not pool_sizes or any(k < 1 for k in pool_sizes):
            raise ValueError(f"mc_pool_sizes must be a non-empty sequence of integers >= 1, got {pool_sizes}")
        self.pool_sizes = pool_sizes
        ndim = convert_conv_op_to_dim(conv_op)
        self.ndim, self.spatial_dims, self.ones = ndim, tuple(range(2, ndim + 2)), (1,) * ndim
        hidden = max(channels // reduction, min_hidden)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x.mean(self.spatial_dims)
        flat = x.flatten(2)
        n = flat.shape[2]
        perm = torch.randperm(n, device=x.device)
        candidates = []
        for k in self.pool_sizes:
            size = max(n // k ** self.ndim, 1)
            candidates.append(flat.mean(-1) if size >= n else flat.index_select(2, perm[:size]).mean(-1))
        choice = torch.randint(len(candidates), (1,), device=x.device)
        return torch.stack(candidates).index_select(0, choice).squeeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(self.descriptor(x)))))
        return x * w.view(*w.shape, *self.ones)


class MixAttBlock(nn.Module):
    """One MixAtt decoder stage.

    ``X = ConvNormAct(concat(up(D), F_s))``; ``S = SelfAttention(LN(X))``; ``M = MCAttn(X)``;
    ``D_s = ConvNormAct(X + S + M)``.

    Args:
        in_channels: width of the coarser decoder feature ``D``.
        skip_channels: width of the fused encoder feature ``F_s``; also the output width.
        num_heads: heads of the self-attention.
        kv_reduction: key/value average-pooling factor of the self-attention.
        mc_pool_sizes: Monte Carlo attention pooling sizes.
        norm_op, norm_kwargs, nonlin, nonlin_kwargs, conv_op: operations of the convolutions (see ``ConvNormAct``).
    """

    def __init__(self, in_channels: int, skip_channels: int, num_heads: int, kv_reduction: int = 1,
                 mc_pool_sizes: Sequence[int] = (1, 2, 3), norm_op=None, norm_kwargs=None, nonlin=nn.GELU,
                 nonlin_kwargs=None, conv_op=nn.Conv2d):
        super().__init__()
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                   conv_op=conv_op)
        self.fuse = ConvNormAct(in_channels + skip_channels, skip_channels, kernel_size=3, **ops)
        self.norm = nn.LayerNorm(skip_channels)
        self.attn = GlobalSelfAttention(skip_channels, num_heads, kv_reduction=kv_reduction, conv_op=conv_op)
        self.mc_attn = MonteCarloAttention(skip_channels, mc_pool_sizes, conv_op=conv_op)
        self.out = ConvNormAct(skip_channels, skip_channels, kernel_size=3, **ops)
        self.mode = get_matching_interpolation(conv_op)
        self.to_channels_first, self.to_channels_last = channel_permutations(conv_op)

    def forward(self, d: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.fuse(upsample_and_concat(d, skip, self.mode))
        s = self.attn(self.norm(x.permute(self.to_channels_last))).permute(self.to_channels_first)
        return self.out(x + s + self.mc_attn(x))


class UpConvBlock(nn.Module):
    """A light convolutional decoder stage at a stem's resolution: the coarser feature is projected to
    ``out_channels`` (1x1, at its own resolution, where it is cheap), upsampled, concatenated with the skip and fused
    by one 3x3 ``ConvNormAct``. (Attention or a second 3x3 convolution at full resolution would cost more than they
    are worth there.)
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm_op=None, norm_kwargs=None,
                 nonlin=nn.GELU, nonlin_kwargs=None, conv_op=nn.Conv2d):
        super().__init__()
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                   conv_op=conv_op)
        self.project = ConvNormAct(in_channels, out_channels, kernel_size=1, **ops)
        self.fuse = ConvNormAct(out_channels + skip_channels, out_channels, kernel_size=3, **ops)
        self.mode = get_matching_interpolation(conv_op)

    def forward(self, d: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(upsample_and_concat(self.project(d), skip, self.mode))
