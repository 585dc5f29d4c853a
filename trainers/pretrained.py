"""FIASTrainer variants whose DilateFormer (global) branch starts from the official ImageNet weights.

The checkpoint is the user's own copy of the official DilateFormer-T/S/B file (it is on no package index), named by
the environment variable ``nnUNet_FIAS_pretrained``. It is read and checked in ``__init__``, before nnU-Net creates
the output folder, so an unset variable, a missing or unreadable file or a checkpoint of another size stops the
training with one clear message and nothing written; ``initialize`` copies it into the freshly built network and
logs what was loaded. The trained weights are in nnU-Net's own checkpoints, so prediction needs neither the variable
nor the file. ``--c`` and ``--val`` construct the trainer as well and so need the variable, although the checkpoint
then overrides the ImageNet weights.

Optimisation is FIASTrainer's unchanged (same learning rate for all parameters, no freezing): whether a lower
encoder learning rate or a short freeze helps cannot be measured without the real ImageNet weights, and the linear
warm-up over the first 5 % of the epochs already keeps early, large updates away from the pretrained encoder.
"""
from __future__ import annotations

import os

import torch

from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_fias.architectures.dilateformer_checkpoint import (DILATEFORMER_SIZES, check_layout, dilateformer_layout,
                                                                layout_of_preset, read_dilateformer_checkpoint)
from nnunetv2_fias.architectures.pretrained import check_dilateformer_weights, load_dilateformer_weights

from .fias_trainer import FIASTrainer

PRETRAINED_ENV = "nnUNet_FIAS_pretrained"
_FILE_NAMES = {"T": "dilateformer-tiny.pth", "S": "dilateformer-small.pth", "B": "dilateformer-base.pth"}


class FIASTrainer_ImageNet(FIASTrainer):
    """FIAS-T whose global branch starts from DilateFormer-T's ImageNet weights (file in ``$nnUNet_FIAS_pretrained``).

    The stem's first convolution is adapted to the number of input channels (RGB weights summed for one channel),
    the classifier head is not loaded; see :mod:`nnunetv2_fias.architectures.pretrained`.
    """

    fias_plan_sized = False  # the ImageNet weights fit the preset's widths and depths only

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Before nnU-Net creates the output folder: a bad or missing checkpoint leaves nothing behind.
        patch = plans["configurations"].get(configuration, {}).get("patch_size")
        if patch is not None and len(patch) != 2:
            raise ValueError(f"{self.__class__.__name__}: DilateFormer's ImageNet weights are 2D and configuration "
                             f"'{configuration}' is {len(patch)}D; train it with FIASTrainer (FIAS-3D starts from "
                             f"its own initialisation), or use -c 2d.")
        self._imagenet_source, self._imagenet_weights = self._read_imagenet_checkpoint()
        self._check_imagenet_fit(plans, configuration, dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)

    @classmethod
    def _read_imagenet_checkpoint(cls) -> tuple[str, dict[str, torch.Tensor]]:
        """``$nnUNet_FIAS_pretrained`` and its state dict, checked against the network this class builds."""
        widths, depths = layout_of_preset(cls.fias_preset, cls.fias_overrides)
        size = next((name for name, (embed, d) in DILATEFORMER_SIZES.items()
                     if (embed, d) == (widths[0], depths)), None)
        path = os.environ.get(PRETRAINED_ENV, "").strip()
        if not path:
            wanted = f"DilateFormer-{size}" if size else "DilateFormer"
            raise ValueError(f"{cls.__name__} needs the official {wanted} ImageNet checkpoint: "
                             f"export {PRETRAINED_ENV}=/path/{_FILE_NAMES.get(size, 'dilateformer.pth')}")
        source = f"{PRETRAINED_ENV}={path}"
        try:
            state_dict = read_dilateformer_checkpoint(path)
        except (OSError, ValueError) as e:
            raise type(e)(f"{PRETRAINED_ENV}: {e}") from None
        check_layout(dilateformer_layout(state_dict), widths, depths, source, f"the network of {cls.__name__}",
                     suggest=lambda preset: f"-tr {_TRAINER_FOR_PRESET[preset]}")
        return path, state_dict

    def _check_imagenet_fit(self, plans: dict, configuration: str, dataset_json: dict) -> None:
        """Every tensor's key and shape against the network this trainer will build, before anything is written
        (``initialize`` runs after nnU-Net has created the fold's folder and log)."""
        plans_manager = PlansManager(plans)
        config = plans_manager.get_configuration(configuration)
        channels = determine_num_input_channels(plans_manager, config, dataset_json)
        heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        # A throw-away CPU copy (FIAS's constructor computes values, so the meta device cannot build it); the
        # trainer builds its own in initialize().
        net = self.build_network_architecture(plans_manager, config, channels, heads, False)
        source = f"{PRETRAINED_ENV}={self._imagenet_source}"
        try:
            check_dilateformer_weights(net, self._imagenet_weights, source=source)
        except ValueError as e:
            raise ValueError(f"{self.__class__.__name__}: {e}") from None

    def initialize(self):
        super().initialize()
        if self._imagenet_weights is None:
            return
        report = load_dilateformer_weights(self._fias(), self._imagenet_weights, source=self._imagenet_source)
        self._imagenet_weights = None  # the network holds them now
        for line in report.summary():
            self.print_to_log_file(line)
        self.print_to_log_file("Pretrained and new parameters share FIASTrainer's optimizer and schedule "
                               "(the warm-up protects the pretrained encoder from early large updates).")


class FIASTrainer_ImageNet_S(FIASTrainer_ImageNet):
    """FIAS-S from DilateFormer-S's ImageNet weights."""

    fias_preset = "S"


class FIASTrainer_ImageNet_B(FIASTrainer_ImageNet):
    """FIAS-B from DilateFormer-B's ImageNet weights."""

    fias_preset = "B"


_TRAINER_FOR_PRESET = {"T": FIASTrainer_ImageNet.__name__, "S": FIASTrainer_ImageNet_S.__name__,
                       "B": FIASTrainer_ImageNet_B.__name__}
