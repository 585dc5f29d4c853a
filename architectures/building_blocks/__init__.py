"""FIAS's building blocks, one family per module (import them from their modules, as in
dynamic-network-architectures); every block learns its dimensionality from ``conv_op``.

- ``helpers``: dimension helpers (matching ops from ``conv_op``, per-axis arguments), initialisation, memory format
- ``norms``: BatchNorm that trains at batch 1 on a 1x1 stage
- ``convs``: conv-norm-act, the branches' stems, the depthwise multi-kernel (DMK) block
- ``transformer``: the DilateFormer block (attention itself is :mod:`nnunetv2_fias.architectures.attention`)
- ``fusion``: Context-Aware Fusion
- ``decoder_blocks``: Monte Carlo attention, the MixAtt stage, the light convolutional stage
"""
