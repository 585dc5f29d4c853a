"""FIAS network and its building blocks (standalone: usable outside nnU-Net).

>>> from nnunetv2_fias.architectures import FIAS
>>> net = FIAS(input_channels=1, num_classes=9, preset="T", deep_supervision=False)                # (B, C, H, W)
>>> net3d = FIAS(input_channels=1, num_classes=9, conv_op=torch.nn.Conv3d, deep_supervision=False)  # (B, C, D, H, W)
"""
from .attention import (GlobalSelfAttention, MultiScaleDilatedAttention, dilated_neighborhood_attention,
                        dilated_neighborhood_attention_channels_first)
from .building_blocks.decoder_blocks import MixAttBlock, MonteCarloAttention
from .building_blocks.fusion import CAF_VARIANTS, ContextAwareFusion
from .building_blocks.norms import SafeBatchNorm2d, SafeBatchNorm3d
from .compat import CheckpointMismatchError
from .config import FIAS_PRESETS, FIASConfig
from .decoder import MixAttDecoder
from .encoder import DualPathEncoder
from .fias import FIAS, FIAS3d
from .plans import (PLAN_SIZE_LEVELS, fias_kwargs_from_plan, fias_size_from_plan, fias_stage1_positions,
                    fias_stage_kernels_from_plan, fias_strides_from_plan)
from .pretrained import LoadReport, load_dilateformer_weights

__all__ = ["FIAS", "FIAS3d", "FIAS_PRESETS", "FIASConfig", "CAF_VARIANTS", "CheckpointMismatchError",
           "ContextAwareFusion", "DualPathEncoder", "GlobalSelfAttention", "LoadReport", "MixAttBlock",
           "MixAttDecoder", "MonteCarloAttention", "MultiScaleDilatedAttention", "SafeBatchNorm2d", "SafeBatchNorm3d",
           "dilated_neighborhood_attention", "dilated_neighborhood_attention_channels_first", "fias_kwargs_from_plan",
           "fias_size_from_plan", "fias_stage1_positions", "PLAN_SIZE_LEVELS", "fias_stage_kernels_from_plan",
           "fias_strides_from_plan", "load_dilateformer_weights"]
