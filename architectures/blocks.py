"""Building blocks of FIAS: stems, DilateFormer and DMK blocks, Context-Aware Fusion, Monte Carlo attention.

Convolutional parts take their ops as arguments (``norm_op`` + ``norm_kwargs``, ``nonlin`` + ``nonlin_kwargs``), as in
dynamic-network-architectures. Transformer parts work on channels-last tokens ``(B, H, W, C)``.

The same blocks serve the 3D network: ``conv_op=nn.Conv3d`` (or ``ndim=3`` where a block has no convolution to pass)
switches them to volumes ``(B, C, D, H, W)`` and tokens ``(B, D, H, W, C)``. Everything that depends on the
dimensionality is resolved in ``__init__``, so the 2D forward passes run the same operations as before.
"""
from __future__ import annotations

import warnings
from typing import Sequence, Type

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    # timm's import applies torch.jit.interface, which torch 2.14 deprecates with a FutureWarning that every command
    # importing FIAS would print first; nothing here uses TorchScript.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.* is deprecated", category=FutureWarning)
    from timm.layers import DropPath, Mlp, trunc_normal_

from .attention import GlobalSelfAttention, MultiScaleDilatedAttention, fp32_sdpa
from .attention3d import MultiScaleDilatedAttention3d

# DilateFormer's LayerNorm epsilon (its blocks and final norm), kept so that its ImageNet weights behave as trained.
LN_EPS = 1e-6


def init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02) for Linear, He (fan-out) for convolutions, unit norms, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
                             nn.modules.instancenorm._InstanceNorm)):
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Memory format in which convolutions on ``x`` (NCHW) run fastest here.

    On CPU (oneDNN), channels-last from 16x16 up: depthwise 3/5/7 and dense 3x3 convolutions (fwd+bwd) are 1.1-2x
    faster there than channels-first, while at 8x8 and below channels-last is up to 6x slower (measured with
    torch 2.14, see docs/benchmarks.md). On other devices the layout is left as it comes.
    """
    if x.ndim == 5:  # volumes: left in the layout they come in (no copy; not measured)
        return torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else \
            torch.contiguous_format
    if x.device.type != "cpu":
        return torch.preserve_format
    return torch.channels_last if x.shape[-2] * x.shape[-1] >= 256 else torch.contiguous_format


def _ndim(conv_op: Type[nn.Module]) -> int:
    """Spatial dimensionality of a convolution class (``nn.Conv2d`` -> 2, ``nn.Conv3d`` -> 3)."""
    if issubclass(conv_op, nn.Conv3d):
        return 3
    if issubclass(conv_op, nn.Conv2d):
        return 2
    raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op!r}")


def interpolation_mode(ndim: int) -> str:
    """Linear interpolation mode of ``F.interpolate`` for 2D (``bilinear``) or 3D (``trilinear``) maps."""
    return {2: "bilinear", 3: "trilinear"}[ndim]


def permutations(ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(to_channels_first, to_channels_last)`` permutations of an ``ndim``-D batch (``(0, 3, 1, 2)`` and
    ``(0, 2, 3, 1)`` in 2D)."""
    return (0, ndim + 1, *range(1, ndim + 1)), (0, *range(2, ndim + 2), 1)


class _SingleValueSafe:
    """Mixin of the batch-1-safe BatchNorm classes below (see :class:`BatchNorm2d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class BatchNorm2d(_SingleValueSafe, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also trains on a single value per channel (batch 1 at a 1x1 stage).

    nnU-Net's ``-num_gpus`` splits the planned batch across processes, so a rank may see one sample; at the coarsest
    stage of a small patch that is one value per channel, where batch statistics do not exist and plain BatchNorm
    raises. There this layer normalises with its running statistics and leaves them unchanged. Same parameters,
    buffers and state-dict keys as ``nn.BatchNorm2d`` (nnU-Net's DDP path converts it to ``SyncBatchNorm``, whose
    statistics span all processes).
    """


class BatchNorm3d(_SingleValueSafe, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that also trains on a single value per channel (batch 1 at a 1x1x1 stage), as
    :class:`BatchNorm2d`."""


def _padding(kernel_size):
    return tuple(k // 2 for k in kernel_size) if isinstance(kernel_size, (tuple, list)) else kernel_size // 2


class ConvNormAct(nn.Sequential):
    """``conv -> norm -> (nonlin)``; ``groups=channels`` gives a depthwise conv. ``kernel_size`` may be per axis."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, groups: int = 1,
                 norm_op: Type[nn.Module] = BatchNorm2d, norm_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = nn.GELU, nonlin_kwargs: dict | None = None, bias: bool = False,
                 conv_op: Type[nn.Module] = nn.Conv2d):
        layers = [conv_op(in_channels, out_channels, kernel_size, stride, _padding(kernel_size), groups=groups,
                          bias=bias),
                  norm_op(out_channels, **(norm_kwargs or {}))]
        if nonlin is not None:
            layers.append(nonlin(**(nonlin_kwargs or {})))
        super().__init__(*layers)


class OverlapStem(nn.Sequential):
    """DilateFormer's overlapping stem to stride 4, in its official layout (so ImageNet weights load one to one):
    3x3 convs without bias at strides 1, 2, 1, 2, widths ``hidden``, ``2 * hidden``, ``4 * hidden``,
    ``out_channels``, BatchNorm and GELU after all but the last.

    DilateFormer uses ``hidden = 16`` for every model size: 16 channels at full and 32/64 at half resolution keep
    the full-resolution activations small (a third of a ``out_channels / 2``-wide stem's at 512x512).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16, norm_op=BatchNorm2d, norm_kwargs=None,
                 nonlin=nn.GELU, nonlin_kwargs=None, strides=(2, 2), conv_op=nn.Conv2d):
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                   conv_op=conv_op)
        super().__init__(
            ConvNormAct(in_channels, hidden, 3, 1, **ops),
            ConvNormAct(hidden, 2 * hidden, 3, strides[0], **ops),
            ConvNormAct(2 * hidden, 4 * hidden, 3, 1, **ops),
            conv_op(4 * hidden, out_channels, 3, strides[1], 1, bias=False),
        )
        self.out_channels = (hidden, 2 * hidden, out_channels)

    def forward_with_skips(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem's output, its full-resolution feature and its first half-resolution feature."""
        full = self[0](x)
        half = self[1](full)
        return self[3](self[2](half)), [full, half]


class ConvStem(nn.Sequential):
    """DMK branch stem to stride 4: two 3x3 stride-2 convs with norm and activation."""

    def __init__(self, in_channels: int, out_channels: int, norm_op=BatchNorm2d, norm_kwargs=None,
                 nonlin=nn.GELU, nonlin_kwargs=None, strides=(2, 2), conv_op=nn.Conv2d):
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                   conv_op=conv_op)
        super().__init__(ConvNormAct(in_channels, max(out_channels // 2, 1), 3, strides[0], **ops),
                         ConvNormAct(max(out_channels // 2, 1), out_channels, 3, strides[1], **ops))


class UpConvBlock(nn.Module):
    """A light convolutional decoder stage at a stem's resolution: the coarser feature is projected to
    ``out_channels`` (1x1, at its own resolution, where it is cheap), upsampled, concatenated with the skip and fused
    by one 3x3 ``ConvNormAct``.

    Attention at full resolution would cost more than the rest of the network, and at these widths a second 3x3
    convolution per stage would add about a tenth to FIAS-T's training step (docs/benchmarks.md).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm_op=BatchNorm2d, norm_kwargs=None,
                 nonlin=nn.GELU, nonlin_kwargs=None, conv_op=nn.Conv2d):
        super().__init__()
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                   conv_op=conv_op)
        self.project = ConvNormAct(in_channels, out_channels, 1, **ops)
        self.fuse = ConvNormAct(out_channels + skip_channels, out_channels, 3, **ops)
        self.mode = interpolation_mode(_ndim(conv_op))

    def forward(self, d: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        d = F.interpolate(self.project(d), size=skip.shape[2:], mode=self.mode, align_corners=False)
        x = torch.cat([d, skip], dim=1)
        return self.fuse(x.contiguous(memory_format=conv_memory_format(x)))


class DilateBlock(nn.Module):
    """DilateFormer block on channels-last tokens.

    ``x = x + dwconv3x3(x)`` (conditional position encoding), ``x = x + DropPath(Attn(LN(x)))``,
    ``x = x + DropPath(MLP(LN(x)))``. ``attention="msda"`` uses multi-scale dilated attention, ``"global"`` global
    multi-head self-attention. With ``conv_op=nn.Conv3d`` it works on volume tokens ``(B, D, H, W, C)``.
    """

    def __init__(self, dim: int, num_heads: int, attention: str = "msda", dilations: Sequence[int] = (1, 2, 3),
                 kernel_size: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 conv_op=nn.Conv2d):
        super().__init__()
        ndim = _ndim(conv_op)
        self.to_channels_first, self.to_channels_last = permutations(ndim)
        self.cpe = conv_op(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        if attention == "msda":
            msda = MultiScaleDilatedAttention if ndim == 2 else MultiScaleDilatedAttention3d
            self.attn = msda(dim, num_heads, dilations, kernel_size, qkv_bias)
        elif attention == "global":
            self.attn = (GlobalSelfAttention if ndim == 2 else GlobalSelfAttention3d)(dim, num_heads,
                                                                                      qkv_bias=qkv_bias)
        else:
            raise ValueError(f"attention must be 'msda' or 'global', got {attention!r}")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels-last tensor permuted to NCHW is in torch.channels_last layout: no copy for the conv.
        x = x + self.cpe(x.permute(self.to_channels_first)).permute(self.to_channels_last)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DMKBlock(nn.Module):
    """Depthwise multi-kernel block: ``y = act(pw(x))``; ``m = sum_k norm(dwconv_k(y))``; ``x + norm(pw(act(m)))``.

    Args:
        channels: input/output width.
        kernel_sizes: the parallel depthwise kernels (default 3, 5, 7); each an int or per axis (``(1, 5, 5)``).
        expansion: hidden width factor of the inverted bottleneck.
        drop_path: stochastic depth rate of the residual branch.
    """

    def __init__(self, channels: int, kernel_sizes: Sequence[int] = (3, 5, 7), expansion: float = 2.0,
                 drop_path: float = 0.0, norm_op=BatchNorm2d, norm_kwargs=None, nonlin=nn.GELU, nonlin_kwargs=None,
                 conv_op=nn.Conv2d):
        super().__init__()
        flat = [v for k in kernel_sizes for v in (k if isinstance(k, (tuple, list)) else (k,))]
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in flat):
            raise ValueError(f"dmk_kernel_sizes must be positive odd integers, got {tuple(kernel_sizes)}")
        hidden = max(int(round(channels * expansion)), 1)
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, conv_op=conv_op)
        self.expand = ConvNormAct(channels, hidden, 1, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs, **ops)
        self.dwconvs = nn.ModuleList(ConvNormAct(hidden, hidden, k, groups=hidden, nonlin=None, **ops)
                                     for k in kernel_sizes)
        self.act = nonlin(**(nonlin_kwargs or {}))
        self.project = ConvNormAct(hidden, channels, 1, nonlin=None, **ops)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x)
        m = self.dwconvs[0](y)
        for conv in self.dwconvs[1:]:
            m = m + conv(y)
        return x + self.drop_path(self.project(self.act(m)))


CAF_VARIANTS = ("select", "sigmoid", "concat")


class ContextAwareFusion(nn.Module):
    """Context-Aware Fusion of the global (G) and local (L) features of one stage: ``F = a_G * G + a_L * L``.

    Variants:
        ``"select"`` (default): selective-kernel gating. ``z = act(LN(fc(GAP(G + L))))``; two heads give per-channel
            logits; a softmax across the two branches gives ``a_G + a_L = 1``.
        ``"sigmoid"``: one head, ``a_G = sigmoid(.)``, ``a_L = 1 - a_G`` (per channel).
        ``"concat"``: channel logits from ``GAP(concat(G, L))`` plus spatial logits from a 7x7 conv over the
            channel-mean/-max of the concatenation; ``a_G = sigmoid(channel + spatial)`` per channel and position.

    After each forward pass ``last_global_weight`` holds the mean ``a_G`` and ``last_global_share`` the global
    branch's effective share of the fused feature, ``mean|a_G G| / (mean|a_G G| + mean|a_L L|)`` (scalar buffers,
    not saved in the state dict): they make the balance between the branches observable. The two differ because the
    branches differ in scale.

    Args:
        channels: width of G and L.
        variant: one of ``CAF_VARIANTS``.
        reduction: hidden width is ``max(channels // reduction, min_hidden)``.
        min_hidden: lower bound of the hidden width.
        ndim: 2 for images, 3 for volumes.
    """

    def __init__(self, channels: int, variant: str = "select", reduction: int = 4, min_hidden: int = 16,
                 ndim: int = 2):
        super().__init__()
        if variant not in CAF_VARIANTS:
            raise ValueError(f"caf_variant must be one of {CAF_VARIANTS}, got {variant!r}")
        if reduction < 1:
            raise ValueError(f"caf_reduction must be >= 1, got {reduction}")
        self.variant = variant
        self.spatial_dims, self.ones = tuple(range(2, ndim + 2)), (1,) * ndim
        hidden = max(channels // reduction, min_hidden)
        in_features = 2 * channels if variant == "concat" else channels
        # LayerNorm, not BatchNorm: the descriptor is one vector per sample, and BN fails on batch size 1.
        self.squeeze = nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.heads = nn.Linear(hidden, 2 * channels if variant == "select" else channels)
        if variant == "concat":
            self.spatial = (nn.Conv2d if ndim == 2 else nn.Conv3d)(2, 1, 7, padding=3)
        self.register_buffer("last_global_weight", torch.full((), float("nan")), persistent=False)
        self.register_buffer("last_global_share", torch.full((), float("nan")), persistent=False)

    def branch_weights(self, g: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(a_G, a_L)``, broadcastable to ``g``, with ``a_G + a_L == 1``."""
        b, c = g.shape[:2]
        if self.variant == "concat":
            u = torch.cat([g, l], dim=1)
            channel = self.heads(self.squeeze(u.mean(self.spatial_dims))).view(b, c, *self.ones)
            spatial = self.spatial(torch.cat([u.mean(1, keepdim=True), u.amax(1, keepdim=True)], dim=1))
            a_g = torch.sigmoid(channel + spatial)
            return a_g, 1 - a_g
        z = self.squeeze((g + l).mean(self.spatial_dims))
        if self.variant == "sigmoid":
            a_g = torch.sigmoid(self.heads(z)).view(b, c, *self.ones)
            return a_g, 1 - a_g
        a = self.heads(z).view(b, 2, c, *self.ones).softmax(dim=1)
        return a[:, 0], a[:, 1]

    def forward(self, g: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        a_g, a_l = self.branch_weights(g, l)
        weighted_g, weighted_l = a_g * g, a_l * l
        with torch.no_grad():
            self.last_global_weight.copy_(a_g.mean())
            # The branches differ in scale (the global one is LayerNorm-ed, the local residual stream is not), so
            # a_G alone does not say how much of F comes from each: this does.
            mag_g, mag_l = weighted_g.abs().mean(), weighted_l.abs().mean()
            self.last_global_share.copy_(mag_g / (mag_g + mag_l).clamp_min(1e-12))
        return weighted_g + weighted_l


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
        ndim: 2 for images, 3 for volumes.
    """

    def __init__(self, channels: int, pool_sizes: Sequence[int] = (1, 2, 3), reduction: int = 4, min_hidden: int = 32,
                 ndim: int = 2):
        super().__init__()
        pool_sizes = tuple(int(k) for k in pool_sizes)
        if not pool_sizes or any(k < 1 for k in pool_sizes):
            raise ValueError(f"mc_pool_sizes must be a non-empty sequence of integers >= 1, got {pool_sizes}")
        self.pool_sizes = pool_sizes
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
    """

    def __init__(self, in_channels: int, skip_channels: int, num_heads: int, kv_reduction: int = 1,
                 mc_pool_sizes: Sequence[int] = (1, 2, 3), norm_op=BatchNorm2d, norm_kwargs=None, nonlin=nn.GELU,
                 nonlin_kwargs=None, conv_op=nn.Conv2d):
        super().__init__()
        ndim = _ndim(conv_op)
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                   conv_op=conv_op)
        self.fuse = ConvNormAct(in_channels + skip_channels, skip_channels, 3, **ops)
        self.norm = nn.LayerNorm(skip_channels)
        self.attn = (GlobalSelfAttention if ndim == 2 else GlobalSelfAttention3d)(skip_channels, num_heads,
                                                                                  kv_reduction)
        self.mc_attn = MonteCarloAttention(skip_channels, mc_pool_sizes, ndim=ndim)
        self.out = ConvNormAct(skip_channels, skip_channels, 3, **ops)
        self.mode = interpolation_mode(ndim)
        self.to_channels_first, self.to_channels_last = permutations(ndim)

    def forward(self, d: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        d = F.interpolate(d, size=skip.shape[2:], mode=self.mode, align_corners=False)
        x = torch.cat([d, skip], dim=1)
        x = self.fuse(x.contiguous(memory_format=conv_memory_format(x)))
        s = self.attn(self.norm(x.permute(self.to_channels_last))).permute(self.to_channels_first)
        return self.out(x + s + self.mc_attn(x))


class GlobalSelfAttention3d(GlobalSelfAttention):
    """:class:`GlobalSelfAttention` over volume tokens ``(B, D, H, W, C)``: SDPA over all ``D*H*W`` positions, keys
    and values average-pooled by ``kv_reduction`` per axis first (never beyond an axis' size, so thin anisotropic
    grids keep their keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        q = self.q(x).view(b, d * h * w, self.num_heads, self.head_dim).transpose(1, 2)
        kv_src = x
        if self.kv_reduction > 1:
            r = tuple(min(self.kv_reduction, n) for n in (d, h, w))
            kv_src = F.avg_pool3d(x.permute(0, 4, 1, 2, 3), r, r, ceil_mode=True).permute(0, 2, 3, 4, 1)
        n_kv = kv_src.shape[1] * kv_src.shape[2] * kv_src.shape[3]
        k, v = self.kv(kv_src).view(b, n_kv, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = fp32_sdpa(q, k, v).transpose(1, 2).reshape(b, d, h, w, c)
        return self.proj_drop(self.proj(out))
