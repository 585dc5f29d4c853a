"""``python -m nnunetv2_fias.demo``: the same as ``nnunetv2_fias demo``."""
import sys

from nnunetv2_fias.demo.cli import main

sys.exit(main())
