"""The FIAS network for images and volumes: dual-path encoder (DilateFormer + DMK) -> CAF per stage -> MixAtt
decoder.

Only the component names are fixed by the FIAS paper; everything below them is a reconstruction from the component
papers (DilateFormer, SvANet) and common practice, and each such choice is a constructor argument.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .building_blocks.helpers import convert_conv_op_to_dim, get_matching_interpolation, init_weights
from .building_blocks.norms import get_matching_batchnorm
from .compat import check_checkpoint_fits
from .config import FIAS_PRESETS, FIASConfig
from .decoder import MixAttDecoder
from .encoder import DilateFormerBranch, DMKBranch, DualPathEncoder

__all__ = ["FIAS", "FIAS3d", "FIAS_PRESETS", "build_encoder"]


def build_encoder(cfg: FIASConfig, conv_op, norm_op, norm_kwargs, nonlin) -> DualPathEncoder:
    """The dual-path encoder of a validated configuration; drop-path rates rise linearly over each branch."""
    g_rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.global_depths)).tolist()
    l_rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.local_depths)).tolist()
    common = dict(widths=cfg.widths, strides=cfg.strides, checkpoint_stages=cfg.checkpoint_stages, norm_op=norm_op,
                  norm_kwargs=norm_kwargs, conv_op=conv_op)
    global_branch = DilateFormerBranch(
        cfg.input_channels, depths=cfg.global_depths, num_heads=cfg.num_heads, msda_stages=cfg.msda_stages,
        dilations=cfg.dilations, kernel_size=cfg.kernel_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        drop_path_rates=g_rates, stem_width=cfg.stem_width, **common)
    local_branch = DMKBranch(cfg.input_channels, depths=cfg.local_depths, kernel_sizes=cfg.dmk_kernels_per_stage(),
                             expansion=cfg.dmk_expansion, drop_path_rates=l_rates, nonlin=nonlin, **common)
    encoder = DualPathEncoder(global_branch, local_branch, strides=cfg.strides, caf_variant=cfg.caf_variant,
                              caf_reduction=cfg.caf_reduction, conv_op=conv_op)
    encoder.stem_skips = cfg.full_resolution_decoder
    return encoder


class FIAS(nn.Module):
    """FIAS: Feature Imbalance-Aware Segmentation network, for images (``conv_op=nn.Conv2d``, input
    ``(B, C, H, W)``) or volumes (``conv_op=nn.Conv3d``, input ``(B, C, D, H, W)``).

    Args:
        input_channels: number of input channels (any).
        num_classes: number of output channels (nnU-Net: labels incl. background, or regions).
        preset: ``"T"`` (default), ``"S"`` or ``"B"``, see ``FIAS_PRESETS``; explicit arguments override it.
        deep_supervision: return ``[main, aux stage 2, aux stage 3, aux stage 4]`` instead of the main output only.
            Switchable at run time through ``network.decoder.deep_supervision``.
        widths: channels per stage (both branches).
        global_depths: DilateFormer blocks per stage.
        num_heads: attention heads per stage (encoder and decoder).
        local_depths: DMK blocks per stage.
        msda_stages: 0-based stages using multi-scale dilated attention (default the first two); others use global
            self-attention.
        dilations: MSDA dilation rates, one head group each (default 1, 2, 3, as DilateFormer); each an int or one
            per axis.
        kernel_size: MSDA neighbourhood (default 3), an int or one per axis.
        mlp_ratio: MLP hidden width factor in DilateFormer blocks (default 4).
        qkv_bias: bias in the attention projections.
        drop_path_rate: stochastic depth rising linearly to this rate over each branch's blocks (default 0.1).
        stem_width: width of the global branch's full-resolution stem convolution; the half-resolution ones have
            2x and 4x (default 16, DilateFormer's stem).
        dmk_kernel_sizes: parallel depthwise kernels of the DMK blocks (default 3, 5, 7).
        dmk_expansion: hidden width factor of the DMK blocks (default 2).
        caf_variant: ``"select"`` (default, softmax across branches), ``"sigmoid"`` or ``"concat"``.
        caf_reduction: CAF hidden width is ``max(C // caf_reduction, 16)`` (default 4).
        decoder_kv_reduction: key/value average pooling of the decoder self-attention at stages 1, 2, 3 (default
            4, 2, 1), which keeps full-size patches affordable at the fine stages.
        mc_pool_sizes: Monte Carlo attention pooling sizes (default 1, 2, 3, as SvANet).
        checkpoint_stages: encoder stages (0-based, both branches) whose blocks are recomputed in backward instead of
            keeping their activations, only while training with gradients and on feature maps of at least
            ``checkpointing.CHECKPOINT_MIN_POSITIONS`` positions; ``()`` turns it off.
        strides: per-axis strides of the five downsamplings: two in the stems, one before each of stages 2-4
            (default 2 along every axis); ``fias_kwargs_from_plan`` takes them from nnU-Net's plans. The parameters
            do not depend on them.
        full_resolution_decoder: decode on to the input's resolution with two convolutional stages that take the
            global stem's features as skips, and put the main head there; default False: the main head is on stage 1
            and its logits are upsampled.
        stage_kernel_sizes: per encoder stage (4), the plan's convolution kernel at that stage's resolution: the DMK
            kernels are 1 along the axes where it is 1 (default: none, isotropic kernels).
        conv_op: ``nn.Conv2d`` (default) or ``nn.Conv3d``; every block takes its dimensionality from it.
        norm_op, norm_kwargs: normalisation of the convolutional parts (default the BatchNorm matching ``conv_op``
            that also trains at batch 1 on a 1x1 stage, ``SafeBatchNorm2d``/``SafeBatchNorm3d``).
        nonlin: activation of the local branch and the decoder (default GELU).

    The input is zero-padded (at the end of each axis) to a multiple of the total stride per axis and every output
    is cropped back, so any size works: the main output has the input's size, auxiliary outputs
    ``max(1, round(size / stride))`` per axis (see :meth:`get_deep_supervision_scales`).

    Example:
        >>> net = FIAS(1, 9, preset="T", deep_supervision=True)
        >>> [o.shape[2:] for o in net(torch.randn(2, 1, 40, 224))]
        [torch.Size([40, 224]), torch.Size([5, 28]), torch.Size([2, 14]), torch.Size([1, 7])]
    """

    def __init__(self, input_channels: int, num_classes: int, preset: str = "T", deep_supervision: bool = False, *,
                 widths: Sequence[int] | None = None, global_depths: Sequence[int] | None = None,
                 num_heads: Sequence[int] | None = None, local_depths: Sequence[int] | None = None,
                 msda_stages: Sequence[int] = (0, 1), dilations: Sequence = (1, 2, 3), kernel_size=3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.1,
                 stem_width: int = 16, dmk_kernel_sizes: Sequence = (3, 5, 7), dmk_expansion: float = 2.0,
                 caf_variant: str = "select", caf_reduction: int = 4,
                 decoder_kv_reduction: Sequence[int] = (4, 2, 1), mc_pool_sizes: Sequence[int] = (1, 2, 3),
                 checkpoint_stages: Sequence[int] = (0, 1), strides: Sequence[Sequence[int]] | None = None,
                 full_resolution_decoder: bool = False, stage_kernel_sizes: Sequence[Sequence[int]] | None = None,
                 conv_op: type[nn.Module] = nn.Conv2d, norm_op: type[nn.Module] | None = None,
                 norm_kwargs: dict | None = None, nonlin: type[nn.Module] = nn.GELU):
        super().__init__()
        self.ndim = convert_conv_op_to_dim(conv_op)
        self.config = cfg = FIASConfig(
            input_channels=input_channels, num_classes=num_classes, ndim=self.ndim, preset=preset, widths=widths,
            global_depths=global_depths, num_heads=num_heads, local_depths=local_depths, msda_stages=msda_stages,
            dilations=dilations, kernel_size=kernel_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate, stem_width=stem_width, dmk_kernel_sizes=dmk_kernel_sizes,
            dmk_expansion=dmk_expansion, caf_variant=caf_variant, caf_reduction=caf_reduction,
            decoder_kv_reduction=decoder_kv_reduction, mc_pool_sizes=mc_pool_sizes,
            checkpoint_stages=checkpoint_stages, strides=strides, full_resolution_decoder=full_resolution_decoder,
            stage_kernel_sizes=stage_kernel_sizes)
        ops = dict(conv_op=conv_op, norm_op=get_matching_batchnorm(conv_op) if norm_op is None else norm_op,
                   norm_kwargs=norm_kwargs, nonlin=nonlin)
        self.input_channels, self.num_classes, self.preset = input_channels, num_classes, preset
        self.stage_kernel_sizes, self.strides = cfg.stage_kernel_sizes, cfg.strides
        self.encoder = build_encoder(cfg, **ops)
        self.decoder = MixAttDecoder(self.encoder, num_classes, num_heads=cfg.num_heads,
                                     kv_reduction=cfg.decoder_kv_reduction, mc_pool_sizes=cfg.mc_pool_sizes,
                                     deep_supervision=deep_supervision, full_resolution=full_resolution_decoder,
                                     **ops)
        # Outputs: the main one at the input's resolution, auxiliary ones at stages 2-4.
        self.output_strides = ((1,) * self.ndim,) + self.encoder.strides[1:]
        self.size_divisor = self.encoder.strides[-1]
        self.interpolation = get_matching_interpolation(conv_op)
        self.apply(init_weights)

    def output_sizes(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial size of every output (main first) for an input of spatial ``size``.

        Exactly ``size / stride`` per axis where the size is divisible by the network's strides (nnU-Net's patch
        sizes are by the plan's strides, which the trainer passes on); else rounded, at least 1.
        """
        size = tuple(int(s) for s in size)
        return [size] + [tuple(max(1, round(s / st)) for s, st in zip(size, stride))
                         for stride in self.output_strides[1:]]

    def get_deep_supervision_scales(self, patch_size: Sequence[int]) -> list[list[float]]:
        """Per-output, per-axis scales such that ``round(patch_size * scale)`` is exactly each output's size.

        This is what nnU-Net's ``_get_deep_supervision_scales`` must return for the targets to match the outputs.
        """
        patch_size = tuple(int(s) for s in patch_size)
        return [[o / p for o, p in zip(out, patch_size)] for out in self.output_sizes(patch_size)]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; in strict mode a checkpoint that does not fit raises
        ``CheckpointMismatchError`` saying what changed (decoder, stem, classes, preset) instead of listing every
        tensor."""
        if strict:
            check_checkpoint_fits(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def caf_global_weights(self) -> list[float]:
        """Mean weight a_G of the global (DilateFormer) branch per stage in the last forward pass (NaN before any)."""
        return [float(caf.last_global_weight) for caf in self.encoder.fusions]

    def caf_global_shares(self) -> list[float]:
        """The global branch's effective share of each stage's fused feature in the last forward pass:
        ``mean|a_G G| / (mean|a_G G| + mean|a_L L|)`` (NaN before any)."""
        return [float(caf.last_global_share) for caf in self.encoder.fusions]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.ndim + 2:
            axes = "(B, C, H, W)" if self.ndim == 2 else "(B, C, D, H, W)"
            hint = {(2, 5): " (a 3D patch: build FIAS with conv_op=nn.Conv3d, for nnU-Net's 3d configurations)",
                    (3, 4): " (a 2D patch: build FIAS with conv_op=nn.Conv2d)"}.get((self.ndim, x.ndim), "")
            raise ValueError(f"{type(self).__name__} is a {self.ndim}D network and expects input of shape {axes}, got "
                             f"{tuple(x.shape)}{hint}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"expected {self.input_channels} input channels, got {x.shape[1]}")

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        size = tuple(x.shape[2:])
        pads = [(-s) % d for s, d in zip(size, self.size_divisor)]
        if any(pads):  # only where the input is not divisible by the strides (never for nnU-Net's plans)
            x = F.pad(x, [v for p in reversed(pads) for v in (0, p)])
        outputs = self.decoder(self.encoder(x))
        if not self.decoder.full_resolution:  # main head at stage 1: upsample its logits to the input
            padded = tuple(s + p for s, p in zip(size, pads))
            outputs[0] = F.interpolate(outputs[0], size=padded, mode=self.interpolation, align_corners=False)
        outputs = [o[(..., *(slice(0, s) for s in out))] for o, out in zip(outputs, self.output_sizes(size))]
        return outputs if self.decoder.deep_supervision else outputs[0]


class FIAS3d(FIAS):
    """:class:`FIAS` built with 3D operations by default (``conv_op=nn.Conv3d``), for nnU-Net's 3D configurations."""

    def __init__(self, *args, conv_op: type[nn.Module] = nn.Conv3d, **kwargs):
        super().__init__(*args, conv_op=conv_op, **kwargs)
