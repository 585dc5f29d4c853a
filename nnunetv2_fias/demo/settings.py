"""What the demo runs: the dataset ID, nnU-Net configuration and fold, the budgets and the demo's error type."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID:03d}_Synapse"
MARKER = "demo_run.json"  # identifies a folder written by this command (see pipeline.prepare_output)
FOLD = "0"
CONFIGURATION = "2d"  # the default; --configuration 3d_fullres trains FIAS-3D
CONFIGURATIONS = ("2d", "3d_fullres")
# The package's nnU-Net discovery shim (nnunetv2_fias/nnunet_ext), appended to nnUNet_extTrainer.
SHIM_DIR = Path(__file__).resolve().parent.parent / "nnunet_ext"
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass(frozen=True)
class Budget:
    """What a ``--budget`` choice runs: phantom grid and the trainer classes (their names carry the budget)."""

    size: tuple[int, int, int]
    fias_trainer: str
    baseline_trainer: str
    description: str


BUDGETS: dict[str, Budget] = {
    "demo": Budget((96, 96, 16), "FIASTrainer_demoBudget", "nnUNetTrainer_demoBudget",
                   "96x96x16 phantoms; FIAS-T for a few hundred iterations of batch 4 without mirroring "
                   "(about 5 minutes on 2 idle CPU cores)"),
    "smoke": Budget((48, 48, 8), "FIASTrainer_smokeBudget", "nnUNetTrainer_smokeBudget",
                    "48x48x8 phantoms; 1 epoch of 2 iterations: checks that every step runs, learns nothing "
                    "(used by the test suite)"),
}
METHOD_NAMES = {"fias": "FIAS-T", "baseline": "nnU-Net (nnUNetTrainer)"}
COMPARE_NOTE = ("Both trainers ran at the same small budget. nnUNetTrainer's recipe (SGD, lr 0.01, poly decay) is "
                "made for 1000 epochs x 250 iterations and has barely started here, while FIASTrainer's AdamW with "
                "warm-up converges quickly: the comparison shows the pipeline at work, not which network is better.")


class DemoError(Exception):
    """A user-facing failure: printed as one message, exit status 1."""
