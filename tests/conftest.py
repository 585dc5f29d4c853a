"""Suite-wide safety net: CPU-friendly nnU-Net settings and no access to the user's own nnU-Net folders.

Set before any test module imports nnunetv2, because nnU-Net reads some variables at import time.
Individual tests still point nnUNet_raw/preprocessed/results at their own tmp folders.
"""
import os
import tempfile

os.environ["nnUNet_compile"] = "f"  # compiling is slow on CPU and not what these tests check
os.environ.setdefault("nnUNet_def_n_proc", "1")  # 8 worker processes cost minutes and GBs per fold on 2 cores
os.environ.setdefault("MPLBACKEND", "Agg")
_guard = tempfile.mkdtemp(prefix="nnunetv2_fias_tests_")
for _name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ[_name] = os.path.join(_guard, _name)
