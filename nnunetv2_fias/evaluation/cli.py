"""``nnunetv2_fias evaluate``: the command line over :func:`evaluate_folders`.

Exit status: 0 on success, 1 for a problem with the inputs or the output folder (one line on stderr, nothing
written), 2 for a malformed command line (argparse).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunetv2_fias._util import default_num_processes
from nnunetv2_fias.evaluation.inputs import EvaluationError
from nnunetv2_fias.evaluation.pipeline import evaluate_folders
from nnunetv2_fias.evaluation.report import PLOTS, format_markdown

PROG = "nnunetv2_fias evaluate"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Per-class Dice and HD95 (TransUNet protocol in voxels, and in mm) of one or more prediction "
                    "folders against a reference folder; writes summary.json, metrics.csv, summary.md (paper "
                    "layout) and PNG plots to OUT, and prints the Markdown table.")
    parser.add_argument("-r", "--reference", required=True, metavar="REF",
                        help="folder of reference label maps, e.g. nnUNet_raw/DatasetXXX/labelsTs")
    parser.add_argument("-p", "--predictions", required=True, nargs="+", metavar="PRED",
                        help="prediction folders; each is one row of the table, named by its folder name")
    parser.add_argument("-j", "--dataset-json", metavar="JSON",
                        help="dataset.json with label names and file_ending (default: the one next to the "
                             "predictions, else REF/../dataset.json)")
    parser.add_argument("--labels", nargs="+", metavar="NAME",
                        help="labels to score, by name or integer value, in table order (default: all foreground "
                             "labels), e.g. TransUNet's 8 organs of a 13-label Synapse dataset: --labels aorta "
                             "gallbladder kidney_left kidney_right liver pancreas spleen stomach")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="method names for the table, one per prediction folder (default: folder names)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (must be new or empty)")
    parser.add_argument("-np", "--num-processes", type=_positive_int, default=None, metavar="N",
                        help="worker processes (default: nnU-Net's nnUNet_def_n_proc, else 8, at most the CPUs "
                             f"available; {default_num_processes()} here)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of ``nnunetv2_fias evaluate``; returns the exit status (argparse exits with 2)."""
    args = build_parser().parse_args(argv)
    try:
        summary = evaluate_folders(args.reference, args.predictions, dataset_json=args.dataset_json,
                                   labels=args.labels, output=args.output, num_processes=args.num_processes,
                                   overwrite=args.overwrite, names=args.names, plots=not args.no_plots)
    except EvaluationError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(format_markdown(summary))
    written = ["summary.json", "metrics.csv", "summary.md"] + ([] if args.no_plots else [f for _, f, _ in PLOTS])
    print(f"Written to {Path(args.output).resolve()}: {', '.join(written)}")
    return 0
