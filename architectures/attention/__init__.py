"""Attention for FIAS on images and volumes: dilated neighbourhood attention (the 2D and 3D kernels behind one
function), multi-scale dilated attention (MSDA) and global self-attention modules.

>>> from nnunetv2_fias.architectures.attention import dilated_neighborhood_attention
"""
from .functional import (_check_qkv, dilated_neighborhood_attention, dilated_neighborhood_attention_channels_first,
                         fp32_sdpa)
from .modules import GlobalSelfAttention, MultiScaleDilatedAttention

# _check_qkv: nnunetv2_fias.benchmark.baselines validates its reference implementations with the kernel's checks.
__all__ = ["GlobalSelfAttention", "MultiScaleDilatedAttention", "dilated_neighborhood_attention",
           "dilated_neighborhood_attention_channels_first", "fp32_sdpa"]
