"""FIAS's MixAtt decoder, built from the encoder's published topology."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .building_blocks.decoder_blocks import MixAttBlock, UpConvBlock
from .checkpointing import checkpointed, worth_checkpointing
from .encoder import DualPathEncoder


class MixAttDecoder(nn.Module):
    """MixAtt stages from the coarsest encoder stage up to stage 1 and, with ``full_resolution``, two convolutional
    stages at the stems' resolutions, so that the main head works at the input's resolution as nnU-Net's U-Net does
    (otherwise the main head is on stage 1 and its logits are upsampled). Auxiliary heads on the stage 2, 3 and 4
    features give deep supervision.

    The heads are ``seg_layers[0..3]`` (main first), the name nnU-Net's own decoders use: ``nnUNetv2_train
    -pretrained_weights`` skips exactly the keys containing ``.seg_layers.``, so fine-tuning into a dataset with
    another label set works. ``deep_supervision`` is a plain attribute that nnU-Net toggles at run time; the set of
    parameters never depends on it.
    """

    def __init__(self, encoder: DualPathEncoder, num_classes: int, *, num_heads: Sequence[int],
                 kv_reduction: Sequence[int], mc_pool_sizes: Sequence[int] = (1, 2, 3), deep_supervision: bool = False,
                 full_resolution: bool = False, norm_op=None, norm_kwargs=None, nonlin=nn.GELU, conv_op=nn.Conv2d):
        super().__init__()
        ch = encoder.output_channels
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, nonlin=nonlin, conv_op=conv_op)
        self.deep_supervision = deep_supervision
        self.full_resolution = full_resolution
        self.stages = nn.ModuleList(
            MixAttBlock(ch[s + 1], ch[s], num_heads[s], kv_reduction=kv_reduction[s], mc_pool_sizes=mc_pool_sizes,
                        **ops)
            for s in reversed(range(len(ch) - 1)))  # coarse to fine
        main_channels = ch[0]
        if full_resolution:
            # Convolutional stages at the stems' resolutions, twice and once the stem width, with the global stem's
            # half- and full-resolution features as skips.
            full, half = encoder.stem_channels
            self.stem_stages = nn.ModuleList([UpConvBlock(ch[0], half, 2 * full, **ops),
                                              UpConvBlock(2 * full, full, full, **ops)])
            main_channels = full
        self.seg_layers = nn.ModuleList([conv_op(main_channels, num_classes, 1)]
                                        + [conv_op(c, num_classes, 1) for c in ch[1:]])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits on the padded grid: ``[main]`` or ``[main, aux stage 2, aux stage 3, aux stage 4]``; the main output
        is at the input's resolution with full-resolution decoding, else at stage 1's."""
        n = len(self.stages) + 1
        skips, features = features[:len(features) - n], features[len(features) - n:]
        decoded = [features[-1]]  # D_4 = F_4
        for block, skip in zip(self.stages, reversed(features[:-1])):
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
