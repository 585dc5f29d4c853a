"""FIAS network and its building blocks (standalone: usable outside nnU-Net).

>>> from nnunetv2_fias.architectures import FIAS
>>> net = FIAS(input_channels=1, num_classes=9, preset="T", deep_supervision=False)
"""
from .attention import dilated_neighborhood_attention
from .blocks import CAF_VARIANTS, ContextAwareFusion, MixAttBlock, MonteCarloAttention
from .fias import FIAS, FIAS_PRESETS, DualPathEncoder, MixAttDecoder
from .pretrained import LoadReport, load_dilateformer_weights

__all__ = ["FIAS", "FIAS_PRESETS", "CAF_VARIANTS", "ContextAwareFusion", "DualPathEncoder", "MixAttBlock",
           "LoadReport", "MixAttDecoder", "MonteCarloAttention", "dilated_neighborhood_attention",
           "load_dilateformer_weights"]
