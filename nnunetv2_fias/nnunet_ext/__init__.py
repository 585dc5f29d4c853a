"""Package holding the discovery shim; nnUNet_extTrainer points at this folder."""
