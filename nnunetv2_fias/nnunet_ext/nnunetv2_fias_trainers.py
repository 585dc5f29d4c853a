"""Discovery shim for nnU-Net (``nnUNet_extTrainer`` points at this folder; see ``nnunetv2_fias env``).

nnU-Net imports the plain modules of that folder as top-level names and then drops them from ``sys.modules``.
This module therefore only re-exports the trainers of the installed package: the classes nnU-Net finds are the
package's own objects, which keeps them picklable (spawn/forkserver) and identical to ``nnunetv2_fias.trainers``.
Keep this folder free of other modules, and this module's name unique.
"""
from nnunetv2_fias.trainers import (FIASTrainer, FIASTrainer_5epochs, FIASTrainer_100epochs,  # noqa: F401
                                    FIASTrainer_250epochs, FIASTrainer_B, FIASTrainer_ImageNet,
                                    FIASTrainer_ImageNet_B, FIASTrainer_ImageNet_S, FIASTrainer_S, FIASTrainerNoAMP,
                                    FIASTrainerNoDS, FIASTrainer_demoBudget, FIASTrainer_planSized,
                                    FIASTrainer_smokeBudget,
                                    nnUNetTrainer_demoBudget, nnUNetTrainer_smokeBudget)
