"""Context-Aware Fusion (CAF): the per-stage, input-dependent balance of FIAS's global and local branches."""
from __future__ import annotations

import torch
from torch import nn

from .helpers import convert_conv_op_to_dim

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
        conv_op: ``nn.Conv2d`` for images, ``nn.Conv3d`` for volumes (the ``"concat"`` variant's spatial gate).
    """

    def __init__(self, channels: int, variant: str = "select", reduction: int = 4, min_hidden: int = 16,
                 conv_op: type[nn.Module] = nn.Conv2d):
        super().__init__()
        if variant not in CAF_VARIANTS:
            raise ValueError(f"caf_variant must be one of {CAF_VARIANTS}, got {variant!r}")
        if reduction < 1:
            raise ValueError(f"caf_reduction must be >= 1, got {reduction}")
        self.variant = variant
        ndim = convert_conv_op_to_dim(conv_op)
        self.spatial_dims, self.ones = tuple(range(2, ndim + 2)), (1,) * ndim
        hidden = max(channels // reduction, min_hidden)
        in_features = 2 * channels if variant == "concat" else channels
        # LayerNorm, not BatchNorm: the descriptor is one vector per sample, and BN fails on batch size 1.
        self.squeeze = nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.heads = nn.Linear(hidden, 2 * channels if variant == "select" else channels)
        if variant == "concat":
            self.spatial = conv_op(2, 1, kernel_size=7, padding=3)
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
