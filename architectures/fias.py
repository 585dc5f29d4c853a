"""The FIAS network: dual-path encoder (DilateFormer + DMK) -> CAF per stage -> MixAtt decoder.

Only the component names are fixed by the FIAS paper; everything below them is a reconstruction from the component
papers (DilateFormer, SvANet) and common practice, and each such choice is a constructor argument (see the
README's network section).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (CAF_VARIANTS, LN_EPS, BatchNorm2d, ContextAwareFusion, ConvNormAct, ConvStem, DMKBlock,
                     DilateBlock, MixAttBlock, OverlapStem, UpConvBlock, conv_memory_format, init_weights,
                     interpolation_mode, permutations)
from .checkpointing import checkpointed, run_blocks, worth_checkpointing
from .compat import check_checkpoint_fits, rename_old_heads

FIAS_PRESETS: dict[str, dict] = {
    # DilateFormer-Tiny/Small/Base layouts for the global branch.
    "T": dict(widths=(72, 144, 288, 576), global_depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
              local_depths=(2, 2, 2, 2)),
    "S": dict(widths=(72, 144, 288, 576), global_depths=(3, 5, 8, 3), num_heads=(3, 6, 12, 24),
              local_depths=(2, 2, 2, 2)),
    "B": dict(widths=(96, 192, 384, 768), global_depths=(4, 8, 10, 3), num_heads=(3, 6, 12, 24),
              local_depths=(3, 3, 3, 3)),
}

# Per-axis strides of FIAS's five downsamplings (two in the stems, one before each of stages 2-4) when no plan sets
# them: stages at strides 4, 8, 16 and 32.
DEFAULT_STRIDES = ((2, 2),) * 5

# Encoder stages (both branches) whose blocks are recomputed in backward instead of keeping their activations.
DEFAULT_CHECKPOINT_STAGES = (0, 1)


def _four(name: str, value, cast=int) -> tuple:
    value = tuple(cast(v) for v in value)
    if len(value) != 4:
        raise ValueError(f"{name} needs one value per stage (4), got {len(value)}: {value}")
    return value


class DilateFormerBranch(nn.Module):
    """Global branch: overlapping stem, then per stage (downsampling for stages 2-4 and) DilateFormer blocks.

    Stages listed in ``msda_stages`` use multi-scale dilated attention, the others global self-attention. The layout
    follows the official DilateFormer (stem, biased downsampling convolutions, LayerNorm epsilon) so that its
    ImageNet weights load one to one. Returns the NCHW feature of every stage (taken before the next downsampling).
    Blocks of the stages in ``checkpoint_stages`` are recomputed in backward instead of keeping their activations.
    """

    def __init__(self, in_channels, widths, depths, num_heads, msda_stages, dilations, kernel_size, mlp_ratio,
                 qkv_bias, drop_path_rates, norm_op, norm_kwargs, stem_width=16, checkpoint_stages=(),
                 strides=DEFAULT_STRIDES, conv_op=nn.Conv2d):
        super().__init__()
        self.stem = OverlapStem(in_channels, widths[0], stem_width, norm_op, norm_kwargs, strides=strides[:2],
                                conv_op=conv_op)
        self.downsamples = nn.ModuleList(
            [nn.Identity()] + [ConvNormAct(widths[s - 1], widths[s], 3, strides[s + 1], norm_op=norm_op,
                                           norm_kwargs=norm_kwargs, nonlin=None, bias=True, conv_op=conv_op)
                               for s in range(1, 4)])
        self.checkpoint_stages = frozenset(checkpoint_stages)
        self.to_channels_first, self.to_channels_last = permutations(len(strides[0]))
        rates = iter(drop_path_rates)
        self.stages = nn.ModuleList(
            nn.Sequential(*[DilateBlock(widths[s], num_heads[s], "msda" if s in msda_stages else "global", dilations,
                                        kernel_size, mlp_ratio, qkv_bias, next(rates), conv_op)
                            for _ in range(depths[s])])
            for s in range(4))
        self.norms = nn.ModuleList(nn.LayerNorm(w, eps=LN_EPS) for w in widths)

    def forward(self, x: torch.Tensor, stem_skips: bool = False) -> list[torch.Tensor]:
        """Stage features, preceded by the stem's full- and half-resolution features when ``stem_skips``."""
        if stem_skips:
            x, features = self.stem.forward_with_skips(x)
        else:
            x, features = self.stem(x), []
        for s, (down, stage, norm) in enumerate(zip(self.downsamples, self.stages, self.norms)):
            x = down(x.contiguous(memory_format=conv_memory_format(x)))
            x = run_blocks(stage, x.permute(self.to_channels_last), self.training and s in self.checkpoint_stages,
                           math.prod(x.shape[2:]))
            x = norm(x).permute(self.to_channels_first)
            features.append(x)
        return features


class DMKBranch(nn.Module):
    """Local branch: conv stem, then per stage (downsampling for stages 2-4 and) depthwise multi-kernel blocks.

    ``kernel_sizes`` are the DMK kernels of every stage, or with ``per_stage_kernels`` one such list per stage (3D
    FIAS: anisotropic kernels where the plan does not convolve along an axis).
    """

    def __init__(self, in_channels, widths, depths, kernel_sizes, expansion, drop_path_rates, norm_op, norm_kwargs,
                 nonlin, checkpoint_stages=(), strides=DEFAULT_STRIDES, conv_op=nn.Conv2d, per_stage_kernels=False):
        super().__init__()
        self.checkpoint_stages = frozenset(checkpoint_stages)
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, conv_op=conv_op)
        self.stem = ConvStem(in_channels, widths[0], nonlin=nonlin, strides=strides[:2], **ops)
        self.downsamples = nn.ModuleList(
            [nn.Identity()] + [ConvNormAct(widths[s - 1], widths[s], 3, strides[s + 1], nonlin=None, **ops)
                               for s in range(1, 4)])
        rates = iter(drop_path_rates)
        self.stages = nn.ModuleList(
            nn.Sequential(*[DMKBlock(widths[s], kernel_sizes[s] if per_stage_kernels else kernel_sizes, expansion,
                                     next(rates), nonlin=nonlin, **ops)
                            for _ in range(depths[s])])
            for s in range(4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for s, (down, stage) in enumerate(zip(self.downsamples, self.stages)):
            x = down(x)
            x = run_blocks(stage, x.contiguous(memory_format=conv_memory_format(x)),
                           self.training and s in self.checkpoint_stages, math.prod(x.shape[2:]))
            features.append(x)
        return features


class DualPathEncoder(nn.Module):
    """DilateFormer (global) and DMK (local) branches fused per stage by Context-Aware Fusion.

    Publishes its topology for the decoder: ``output_channels`` and ``strides`` (per-axis, w.r.t. the input) of the
    stage features, and ``stem_channels`` / ``stem_strides`` of the global stem's full- and half-resolution
    features, which the forward pass returns first when ``stem_skips`` is set.
    """

    def __init__(self, global_branch: DilateFormerBranch, local_branch: DMKBranch, widths: Sequence[int],
                 caf_variant: str, caf_reduction: int, strides: Sequence[Sequence[int]] = DEFAULT_STRIDES):
        super().__init__()
        self.global_branch, self.local_branch = global_branch, local_branch
        self.fusions = nn.ModuleList(ContextAwareFusion(w, caf_variant, caf_reduction, ndim=len(strides[0]))
                                     for w in widths)
        cumulative = [tuple(math.prod(s[a] for s in strides[:n]) for a in range(len(strides[0])))
                      for n in range(len(strides) + 1)]
        self.output_channels = tuple(widths)
        self.strides = tuple(cumulative[2:])
        self.stem_channels = global_branch.stem.out_channels[:2]
        self.stem_strides = tuple(cumulative[:2])
        self.stem_skips = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        g = self.global_branch(x, self.stem_skips)
        skips, g = g[:len(g) - 4], g[len(g) - 4:]
        return skips + [caf(gs, ls) for caf, gs, ls in zip(self.fusions, g, self.local_branch(x))]


class MixAttDecoder(nn.Module):
    """MixAtt decoder built from the encoder's topology: MixAtt stages up to stage 1 and, with ``full_resolution``,
    two convolutional stages at the stems' resolutions, so that the main head works at the input's resolution as
    nnU-Net's U-Net does (otherwise the main head is on stage 1 and its logits are upsampled). Auxiliary heads on the
    stage 2, 3 and 4 features give deep supervision.

    The heads are ``seg_layers[0..3]`` (main first), the name nnU-Net's own decoders use: ``nnUNetv2_train
    -pretrained_weights`` skips exactly the keys containing ``.seg_layers.``, so fine-tuning into a dataset with
    another label set works. Checkpoints with the earlier names (``main_head``, ``aux_heads.i``) still load.

    ``deep_supervision`` is a plain attribute that nnU-Net toggles at run time; the set of parameters never depends
    on it.
    """

    def __init__(self, encoder: DualPathEncoder, num_classes: int, num_heads: Sequence[int],
                 kv_reduction: Sequence[int], mc_pool_sizes: Sequence[int], deep_supervision: bool, norm_op,
                 norm_kwargs, nonlin, full_resolution: bool = False, conv_op=nn.Conv2d):
        super().__init__()
        ch = encoder.output_channels
        self.deep_supervision = deep_supervision
        self.full_resolution = full_resolution
        self.stages = nn.ModuleList(
            MixAttBlock(ch[s + 1], ch[s], num_heads[s], kv_reduction[s], mc_pool_sizes, norm_op, norm_kwargs, nonlin,
                        conv_op=conv_op)
            for s in (2, 1, 0))  # coarse to fine
        main_channels = ch[0]
        if full_resolution:
            # Convolutional stages at the stems' resolutions, twice and once the stem width, with the global stem's
            # half- and full-resolution features as skips.
            half, full = encoder.stem_channels[1], encoder.stem_channels[0]
            self.stem_stages = nn.ModuleList([
                UpConvBlock(ch[0], half, 2 * full, norm_op, norm_kwargs, nonlin, conv_op=conv_op),
                UpConvBlock(2 * full, full, full, norm_op, norm_kwargs, nonlin, conv_op=conv_op)])
            main_channels = full
        self.seg_layers = nn.ModuleList([conv_op(main_channels, num_classes, 1)]
                                        + [conv_op(ch[s], num_classes, 1) for s in range(1, 4)])
        self.register_load_state_dict_pre_hook(rename_old_heads)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits on the padded grid: ``[main]`` or ``[main, aux stage 2, aux stage 3, aux stage 4]``; the main output
        is at the input's resolution with full-resolution decoding, else at stage 1's."""
        skips, features = features[:len(features) - 4], features[len(features) - 4:]
        decoded = [features[3]]  # D_4 = F_4
        for block, skip in zip(self.stages, (features[2], features[1], features[0])):
            decoded.append(block(decoded[-1], skip))
        fine_to_coarse = decoded[::-1]
        finest = fine_to_coarse[0]
        if self.full_resolution:
            # Cheap convolutions on large maps: recomputed in backward rather than kept.
            for block, skip in zip(self.stem_stages, skips[::-1]):
                if worth_checkpointing(self.training, math.prod(skip.shape[2:])):
                    finest = checkpointed(block, finest, skip)
                else:
                    finest = block(finest, skip)
        main = self.seg_layers[0](finest)
        if self.deep_supervision:
            return [main] + [head(d) for head, d in zip(self.seg_layers[1:], fine_to_coarse[1:])]
        if self.training:
            # Keep the auxiliary heads in the graph with a zero contribution, so DistributedDataParallel without
            # find_unused_parameters (nnU-Net's -num_gpus) also works when training without deep supervision.
            main = main + 0.0 * sum(p.sum() for p in self.seg_layers[1:].parameters())
        return [main]


def _validated_config(input_channels, num_classes, preset, widths, global_depths, num_heads, local_depths,
                      msda_stages, dilations, decoder_kv_reduction, caf_variant, drop_path_rate, stem_width,
                      checkpoint_stages, strides, ndim=2, stage_kernel_sizes=None) -> dict:
    """Resolve the preset and check FIAS's arguments; every error names the argument and the value."""
    if preset not in FIAS_PRESETS:
        raise ValueError(f"preset must be one of {sorted(FIAS_PRESETS)}, got {preset!r}")
    if input_channels < 1 or num_classes < 1:
        raise ValueError(f"input_channels and num_classes must be >= 1, got {input_channels} and {num_classes}")
    given = dict(widths=widths, global_depths=global_depths, num_heads=num_heads, local_depths=local_depths)
    cfg = {name: _four(name, value if value is not None else FIAS_PRESETS[preset][name])
           for name, value in given.items()}
    for name, low in (("widths", 1), ("global_depths", 0), ("num_heads", 1), ("local_depths", 0)):
        if min(cfg[name]) < low:
            raise ValueError(f"{name} must be >= {low} per stage, got {cfg[name]}")
    for s, (w, h) in enumerate(zip(cfg["widths"], cfg["num_heads"])):
        if w % h:
            raise ValueError(f"num_heads[{s}]={h} must divide widths[{s}]={w}")
    for name, stages in (("msda_stages", msda_stages), ("checkpoint_stages", checkpoint_stages)):
        cfg[name] = tuple(int(s) for s in stages)
        if any(s not in range(4) for s in cfg[name]):
            raise ValueError(f"{name} must hold stage indices 0..3, got {cfg[name]}")
    for s in cfg["msda_stages"]:
        if cfg["num_heads"][s] % len(dilations):
            raise ValueError(f"num_heads[{s}]={cfg['num_heads'][s]} must be divisible by the number of dilation rates "
                             f"{len(tuple(dilations))} (dilations={tuple(dilations)}), since stage {s} uses MSDA")
    cfg["decoder_kv_reduction"] = tuple(int(r) for r in decoder_kv_reduction)
    if len(cfg["decoder_kv_reduction"]) != 3 or min(cfg["decoder_kv_reduction"]) < 1:
        raise ValueError("decoder_kv_reduction needs three factors >= 1 (strides 4, 8, 16), "
                         f"got {cfg['decoder_kv_reduction']}")
    if caf_variant not in CAF_VARIANTS:
        raise ValueError(f"caf_variant must be one of {CAF_VARIANTS}, got {caf_variant!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if stem_width < 1:
        raise ValueError(f"stem_width must be >= 1, got {stem_width}")
    cfg["strides"] = (((2,) * ndim,) * 5 if strides is None else tuple(tuple(int(v) for v in s) for s in strides))
    if len(cfg["strides"]) != 5 or any(len(s) != ndim or min(s) < 1 for s in cfg["strides"]):
        raise ValueError(f"strides needs the per-axis strides ({ndim} values >= 1) of the five downsamplings (two "
                         f"in the stems, one before each of stages 2-4), got {strides}")
    cfg["stage_kernel_sizes"] = None if stage_kernel_sizes is None else tuple(
        tuple(int(v) for v in k) for k in stage_kernel_sizes)
    if cfg["stage_kernel_sizes"] is not None and (len(cfg["stage_kernel_sizes"]) != 4 or any(
            len(k) != ndim or min(k) < 1 for k in cfg["stage_kernel_sizes"])):
        raise ValueError(f"stage_kernel_sizes needs one kernel size per axis ({ndim} values >= 1) per stage (4), got "
                         f"{stage_kernel_sizes}")
    return cfg


def _anisotropic(kernel_sizes: Sequence[int], stage_kernels: Sequence[Sequence[int]]) -> list[list[tuple]]:
    """Per stage, the DMK kernels with size 1 along the axes where the plan's kernel at that stage is 1."""
    return [[tuple(1 if p == 1 else int(k) for p in plan) for k in kernel_sizes] for plan in stage_kernels]


class FIAS(nn.Module):
    """FIAS: Feature Imbalance-Aware Segmentation network (2D).

    Args:
        input_channels: number of input channels (any).
        num_classes: number of output channels (nnU-Net: labels incl. background, or regions).
        preset: ``"T"`` (default), ``"S"`` or ``"B"``, see ``FIAS_PRESETS``; explicit arguments override it.
        deep_supervision: return ``[main, aux s8, aux s16, aux s32]`` instead of the main output only. Switchable at
            run time through ``network.decoder.deep_supervision``.
        widths: channels per stage (both branches).
        global_depths: DilateFormer blocks per stage.
        num_heads: attention heads per stage (encoder and decoder).
        local_depths: DMK blocks per stage.
        msda_stages: 0-based stages using multi-scale dilated attention (default the first two); others use global
            self-attention.
        dilations: MSDA dilation rates, one head group each (default 1, 2, 3, as DilateFormer).
        kernel_size: MSDA neighbourhood (default 3).
        mlp_ratio: MLP hidden width factor in DilateFormer blocks (default 4).
        qkv_bias: bias in the attention projections.
        drop_path_rate: stochastic depth rising linearly to this rate over each branch's blocks (default 0.1).
        dmk_kernel_sizes: parallel depthwise kernels of the DMK blocks (default 3, 5, 7).
        dmk_expansion: hidden width factor of the DMK blocks (default 2).
        caf_variant: ``"select"`` (default, softmax across branches), ``"sigmoid"`` or ``"concat"``.
        caf_reduction: CAF hidden width is ``max(C // caf_reduction, 16)`` (default 4).
        decoder_kv_reduction: key/value pooling of the decoder self-attention at strides 4, 8, 16
            (default 4, 2, 1: 1/16 of the keys at stride 4, 1/4 at stride 8, all at stride 16).
        mc_pool_sizes: Monte Carlo attention pooling sizes (default 1, 2, 3, as SvANet).
        strides: per-axis strides of the five downsamplings: two in the stems, one before each of stages 2-4
            (default ``((2, 2),) * 5``: stages at strides 4, 8, 16, 32). FIASTrainer takes them from nnU-Net's plans
            (``fias_strides_from_plan``); the parameters do not depend on them.
        full_resolution_decoder: decode on to the input's resolution with two convolutional stages that take the
            global stem's features as skips, and put the main head there. Default False: the main head is on stage 1
            (stride 4) and its logits are upsampled, which trained clearly better on the demo phantoms at equal
            budget and costs about 13 % less (docs/benchmarks.md).
        stem_width: width of the global branch's full-resolution stem convolution; the half-resolution ones have
            2x and 4x (default 16: DilateFormer's own stem, 16/32/64 channels).
        checkpoint_stages: encoder stages (0-based, both branches) whose blocks are recomputed in backward instead of
            keeping their activations (activation checkpointing, only while training with gradients, and only on
            feature maps of at least 256 positions per sample, below which recomputing costs more than it saves).
            The default (0, 1) keeps FIAS-T's training memory below nnU-Net's U-Net's at the same patch and batch
            (0.83x at 512x512), for about 8 % more compute per training step; ``()`` turns it off
            (docs/benchmarks.md has the figures).
        stage_kernel_sizes: per encoder stage (4), the plan's convolution kernel at that stage's resolution: the DMK
            kernels are 1 along the axes where it is 1 (default: none, isotropic kernels; FIAS-3D takes it from 3D
            plans, ``fias_stage_kernels_from_plan``).
        norm_op, norm_kwargs: normalisation of the convolutional parts (default :class:`BatchNorm2d` in 2D,
            :class:`BatchNorm3d` in 3D, which also train at batch 1 on a 1x1 stage).
        nonlin: activation of the convolutional parts (default GELU).

    The input is zero-padded (bottom/right) to a multiple of the total stride per axis (32 with the default strides)
    and every output is cropped back, so any 2D size works: the main output has the input's size, auxiliary outputs
    ``max(1, round(size / stride))`` per axis (see :meth:`get_deep_supervision_scales`).

    Example:
        >>> net = FIAS(1, 9, preset="T", deep_supervision=True)
        >>> [o.shape[2:] for o in net(torch.randn(2, 1, 40, 224))]
        [torch.Size([40, 224]), torch.Size([5, 28]), torch.Size([2, 14]), torch.Size([1, 7])]
    """

    ndim = 2
    conv_op: type[nn.Module] = nn.Conv2d
    default_norm_op: type[nn.Module] = BatchNorm2d

    def __init__(self, input_channels: int, num_classes: int, preset: str = "T", deep_supervision: bool = False, *,
                 widths: Sequence[int] | None = None, global_depths: Sequence[int] | None = None,
                 num_heads: Sequence[int] | None = None, local_depths: Sequence[int] | None = None,
                 msda_stages: Sequence[int] = (0, 1), dilations: Sequence[int] = (1, 2, 3), kernel_size: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.1,
                 stem_width: int = 16, dmk_kernel_sizes: Sequence[int] = (3, 5, 7), dmk_expansion: float = 2.0,
                 caf_variant: str = "select", caf_reduction: int = 4,
                 decoder_kv_reduction: Sequence[int] = (4, 2, 1), mc_pool_sizes: Sequence[int] = (1, 2, 3),
                 checkpoint_stages: Sequence[int] = DEFAULT_CHECKPOINT_STAGES,
                 strides: Sequence[Sequence[int]] | None = None, full_resolution_decoder: bool = False,
                 stage_kernel_sizes: Sequence[Sequence[int]] | None = None,
                 norm_op: type[nn.Module] | None = None, norm_kwargs: dict | None = None,
                 nonlin: type[nn.Module] = nn.GELU):
        super().__init__()
        cfg = _validated_config(input_channels, num_classes, preset, widths, global_depths, num_heads, local_depths,
                                msda_stages, dilations, decoder_kv_reduction, caf_variant, drop_path_rate,
                                stem_width, checkpoint_stages, strides, self.ndim, stage_kernel_sizes)
        strides, conv_op = cfg["strides"], self.conv_op
        norm_op = self.default_norm_op if norm_op is None else norm_op
        widths, global_depths, local_depths = cfg["widths"], cfg["global_depths"], cfg["local_depths"]
        self.input_channels, self.num_classes = input_channels, num_classes
        self.preset = preset
        self.stage_kernel_sizes = cfg["stage_kernel_sizes"]
        g_rates = torch.linspace(0, drop_path_rate, sum(global_depths)).tolist()
        l_rates = torch.linspace(0, drop_path_rate, sum(local_depths)).tolist()
        global_branch = DilateFormerBranch(input_channels, widths, global_depths, cfg["num_heads"], cfg["msda_stages"],
                                           dilations, kernel_size, mlp_ratio, qkv_bias, g_rates, norm_op, norm_kwargs,
                                           stem_width, cfg["checkpoint_stages"], strides, conv_op=conv_op)
        per_stage = self.stage_kernel_sizes is not None
        dmk_kernels = _anisotropic(dmk_kernel_sizes, self.stage_kernel_sizes) if per_stage else dmk_kernel_sizes
        local_branch = DMKBranch(input_channels, widths, local_depths, dmk_kernels, dmk_expansion, l_rates, norm_op,
                                 norm_kwargs, nonlin, cfg["checkpoint_stages"], strides, conv_op=conv_op,
                                 per_stage_kernels=per_stage)
        self.encoder = DualPathEncoder(global_branch, local_branch, widths, caf_variant, caf_reduction, strides)
        self.encoder.stem_skips = full_resolution_decoder
        self.decoder = MixAttDecoder(self.encoder, num_classes, cfg["num_heads"], cfg["decoder_kv_reduction"],
                                     mc_pool_sizes, deep_supervision, norm_op, norm_kwargs, nonlin,
                                     full_resolution_decoder, conv_op=conv_op)
        self.strides = strides
        # Outputs: the main one at the input's resolution, auxiliary ones at stages 2-4.
        self.output_strides = ((1,) * len(strides[0]),) + self.encoder.strides[1:]
        self.size_divisor = self.encoder.strides[-1]
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

    def forward(self, x: torch.Tensor):
        if x.ndim != self.ndim + 2:
            axes = "(B, C, H, W)" if self.ndim == 2 else "(B, C, D, H, W)"
            hint = {(2, 5): " (a 3D patch: use FIAS3d, nnU-Net's 3d configurations)",
                    (3, 4): " (a 2D patch: use FIAS)"}.get((self.ndim, x.ndim), "")
            raise ValueError(f"{type(self).__name__} is a {self.ndim}D network and expects input of shape {axes}, got "
                             f"{tuple(x.shape)}{hint}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"expected {self.input_channels} input channels, got {x.shape[1]}")
        size = tuple(x.shape[2:])
        pads = [(-s) % d for s, d in zip(size, self.size_divisor)]
        if any(pads):  # only where the input is not divisible by the strides (never for nnU-Net's plans)
            x = F.pad(x, [v for p in reversed(pads) for v in (0, p)])
        outputs = self.decoder(self.encoder(x))
        if not self.decoder.full_resolution:  # main head at stage 1: upsample its logits to the input
            padded = tuple(s + p for s, p in zip(size, pads))
            outputs[0] = F.interpolate(outputs[0], size=padded, mode=interpolation_mode(self.ndim),
                                       align_corners=False)
        outputs = [o[(..., *(slice(0, s) for s in out))] for o, out in zip(outputs, self.output_sizes(size))]
        return outputs if self.decoder.deep_supervision else outputs[0]
