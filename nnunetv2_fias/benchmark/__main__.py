"""``python -m nnunetv2_fias.benchmark``: the benchmark command (and its worker processes)."""
import sys

from nnunetv2_fias.benchmark.cli import main

sys.exit(main())
