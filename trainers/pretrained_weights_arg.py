"""nnU-Net's ``-pretrained_weights FILE``, checked in ``FIASTrainer.__init__`` before nnU-Net writes anything.

nnU-Net hands the file to ``load_pretrained_weights`` only after ``initialize()``; its own check fails on the first
mismatching tensor with an assertion that prints the whole tensor, after the output folder was created.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import torch


def requested_pretrained_weights(argv: Sequence[str] | None = None) -> str | None:
    """The file given to ``nnUNetv2_train ... -pretrained_weights FILE`` in this process's command line, if any.

    nnU-Net hands the file to ``load_pretrained_weights`` only after ``initialize()``, and the trainer never sees it;
    the command line is where a trainer can read it before nnU-Net writes anything.
    """
    argv = list(sys.argv if argv is None else argv)
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-pretrained_weights" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("-pretrained_weights="):
            return arg.split("=", 1)[1]
    return None


def check_pretrained_dimensionality(path: str, patch_size: Sequence[int], configuration: str, trainer: str) -> None:
    """Refuse in one line an nnU-Net checkpoint whose network is 2D for a 3D configuration, or the reverse.

    nnU-Net's own check (``load_pretrained_weights``) fails on the first mismatching tensor with an assertion that
    prints the network's whole tensor. A missing or unreadable file is left to nnU-Net.
    """
    if not os.path.isfile(path):
        return
    try:
        # nnU-Net loads this file with weights_only=False right after; mmap keeps this look at it cheap.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not ours to report: nnU-Net's loader says what is wrong with the file
        return
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        return
    convs = [(k, tuple(v.shape)) for k, v in weights.items()
             if isinstance(v, torch.Tensor) and k.endswith(".weight") and v.ndim >= 4]
    dims = {len(shape) - 2 for _, shape in convs}
    wanted = len(patch_size)
    if len(dims) == 1 and wanted not in dims:
        key, shape = convs[0]
        have = dims.pop()
        raise ValueError(f"{trainer}: -pretrained_weights {path} holds a {have}D network (e.g. {key} {shape}), but "
                         f"configuration '{configuration}' builds a {wanted}D FIAS; start a {wanted}D configuration "
                         f"from a checkpoint trained on a {wanted}D configuration")
