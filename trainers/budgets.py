"""Fixed small budgets for `nnunetv2_fias demo`, FIAS and nnUNetTrainer alike so that `demo --compare`
puts them side by side at equal budget.

Each class sets epochs, iterations per epoch, batch size and turns mirroring off (in training and at inference,
exactly as nnU-Net's ``nnUNetTrainerNoMirroring``): test-time mirroring costs four forward passes per slice on a
CPU, and mirrored samples make left/right organs hard to tell apart within a few hundred iterations. The
nnUNetTrainer twins keep nnU-Net's own optimizer. Names are stored in checkpoints: keep them stable.
"""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .fias_trainer import FIASTrainer


def _apply_budget(trainer: nnUNetTrainer, epochs: int, iterations: int, val_iterations: int, batch_size: int) -> None:
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    # The ConfigurationManager holds its own copy of the plans' configuration: the plans (and inference) keep
    # the planned batch size; _set_batch_size_and_oversample reads this one in initialize().
    trainer.configuration_manager.configuration["batch_size"] = batch_size


class _NoMirroring:
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


_DEMO = dict(epochs=12, iterations=20, val_iterations=2, batch_size=4)
_SMOKE = dict(epochs=1, iterations=2, val_iterations=1, batch_size=2)


class FIASTrainer_demoBudget(_NoMirroring, FIASTrainer):
    """`nnunetv2_fias demo`: 12 epochs x 20 iterations, batch 4, no mirroring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_budget(self, **_DEMO)


class nnUNetTrainer_demoBudget(_NoMirroring, nnUNetTrainer):
    """nnUNetTrainer at FIASTrainer_demoBudget's budget."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_budget(self, **_DEMO)


class FIASTrainer_smokeBudget(_NoMirroring, FIASTrainer):
    """CI smoke run of the demo: 1 epoch x 2 iterations, batch 2, no mirroring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_budget(self, **_SMOKE)


class nnUNetTrainer_smokeBudget(_NoMirroring, nnUNetTrainer):
    """nnUNetTrainer at FIASTrainer_smokeBudget's budget."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_budget(self, **_SMOKE)
