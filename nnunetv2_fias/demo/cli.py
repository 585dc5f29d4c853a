"""Command line of ``nnunetv2_fias demo``: options, checks before anything is written, and exit statuses.

Exit status: 0 when the demo finished, 1 for a user error (one ``nnunetv2_fias demo: error: ...`` line; nothing of
the user's is touched), 2 for an invalid command line (argparse), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from nnunetv2_fias.demo.pipeline import check_trainers, prepare_output, resolve_device, run_demo
from nnunetv2_fias.demo.settings import BUDGETS, CONFIGURATION, CONFIGURATIONS, DemoError

PROG = "nnunetv2_fias demo"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``nnunetv2_fias demo``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Generate synthetic abdominal CT phantoms in the Synapse layout, convert them (TransUNet protocol), plan "
            "and preprocess with nnU-Net, train FIAS (2d) or FIAS-3D (3d_fullres), fold 0 only, predict the 12 test cases and evaluate them; "
            "writes report.md and an overlay PNG. Everything stays inside -o DIR; your own nnU-Net folders and "
            "variables are not used.", 100),
        epilog="budgets:\n" + "\n".join(textwrap.fill(b.description, 100, initial_indent=f"  {k:<7}",
                                                       subsequent_indent=" " * 9) for k, b in BUDGETS.items())
               + "\n\nA run cannot be resumed: rerun with --overwrite to start again in the same folder.",
    )
    parser.add_argument("-o", "--output", default="demo_output", metavar="DIR",
                        help="folder for everything the demo writes (default: ./demo_output); must be new, empty, "
                             "or a previous demo run together with --overwrite")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): cuda when torch sees a GPU, else cpu")
    parser.add_argument("--compare", action="store_true",
                        help="also train nnU-Net's own nnUNetTrainer at the same budget and compare both")
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="demo",
                        help="demo (default): the real demo; smoke: tiny phantoms and 2 iterations, to check the "
                             "pipeline quickly (the test suite uses it)")
    parser.add_argument("--configuration", choices=CONFIGURATIONS, default=CONFIGURATION,
                        help="nnU-Net configuration: 2d (default; FIAS) or 3d_fullres (FIAS-3D on the phantom "
                             "volumes, several times slower on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous demo run in DIR first")
    parser.add_argument("-np", "--num-processes", type=int, default=None, metavar="N",
                        help="processes for conversion, preprocessing and evaluation (default: 1 on cpu, "
                             "min(4, #CPUs) on cuda)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nnunetv2_fias demo``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # -h (0) or a usage error (2), already printed by argparse
        return 0 if e.code in (0, None) else 2
    args.argv = argv
    out = Path(args.output).resolve()
    try:
        if args.seed < 0:
            raise DemoError(f"--seed must be >= 0, got {args.seed}")
        if args.num_processes is not None and args.num_processes < 1:
            raise DemoError(f"-np/--num-processes must be >= 1, got {args.num_processes}")
        device = resolve_device(args.device)
        check_trainers(BUDGETS[args.budget], args.compare)
        prepare_output(out, args.overwrite)
        return run_demo(args, out, device)
    except DemoError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; partial results are in {out} (rerun with --overwrite)", file=sys.stderr)
        return 130
