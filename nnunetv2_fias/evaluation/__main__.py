"""``python -m nnunetv2_fias.evaluation``: the same as ``nnunetv2_fias evaluate``."""
import sys

from nnunetv2_fias.evaluation.cli import main

sys.exit(main())
