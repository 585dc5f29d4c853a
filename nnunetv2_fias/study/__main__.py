import sys

from nnunetv2_fias.study.cli import main

sys.exit(main())
