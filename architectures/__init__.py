"""FIAS network and its building blocks (standalone: usable outside nnU-Net).

>>> from nnunetv2_fias.architectures import FIAS
>>> net = FIAS(input_channels=1, num_classes=9, preset="T", deep_supervision=False)
>>> net3d = FIAS3d(input_channels=1, num_classes=9, preset="T", deep_supervision=False)  # (B, C, D, H, W)
"""
from .attention import dilated_neighborhood_attention
from .attention3d import (MultiScaleDilatedAttention3d, dilated_neighborhood_attention_3d,
                          dilated_neighborhood_attention_3d_channels_first)
from .blocks import CAF_VARIANTS, ContextAwareFusion, MixAttBlock, MonteCarloAttention
from .compat import CheckpointMismatchError
from .fias import FIAS, FIAS_PRESETS, DualPathEncoder, MixAttDecoder
from .fias3d import FIAS3d, fias_stage_kernels_from_plan
from .plans import fias_strides_from_plan
from .pretrained import LoadReport, load_dilateformer_weights

__all__ = ["FIAS", "FIAS3d", "FIAS_PRESETS", "CAF_VARIANTS", "CheckpointMismatchError", "ContextAwareFusion",
           "DualPathEncoder", "MixAttBlock", "LoadReport", "MixAttDecoder", "MonteCarloAttention",
           "MultiScaleDilatedAttention3d", "dilated_neighborhood_attention", "dilated_neighborhood_attention_3d",
           "dilated_neighborhood_attention_3d_channels_first", "fias_stage_kernels_from_plan", "fias_strides_from_plan",
           "load_dilateformer_weights"]
