"""The `nnunetv2_fias` console command.

An explicit table maps each command to the module and function that implement it. The dispatcher imports only the
module that is asked for, so ``nnunetv2_fias env`` stays fast and a broken optional dependency of one command cannot
break the others. Exit status: 0 on success, 1 for a user error, 2 for a command-line usage error.
"""
from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

PROG = "nnunetv2_fias"


class Command(NamedTuple):
    module: str
    function: str  # takes argv (list[str] | None) and returns the exit status
    help: str


COMMANDS: dict[str, Command] = {
    "convert-synapse": Command("nnunetv2_fias.dataset_conversion.synapse", "main",
                               "Convert Synapse (BTCV) into nnU-Net's raw format."),
    "convert-acdc": Command("nnunetv2_fias.dataset_conversion.acdc", "main",
                            "Convert ACDC into nnU-Net's raw format."),
    "evaluate": Command("nnunetv2_fias.evaluation", "main",
                        "Per-class DSC and HD95 tables, plots and trainer comparisons."),
    "demo": Command("nnunetv2_fias.demo", "main",
                    "Generate phantoms, train FIAS through nnU-Net, predict and evaluate."),
    "train": Command("nnunetv2_fias.train", "main",
                     "nnUNetv2_train, also as a torchrun job across GPUs and nodes (any nnU-Net trainer)."),
    "study": Command("nnunetv2_fias.study", "main",
                     "Five-fold comparison of trainers: train, select, predict, score, paired statistics."),
    "benchmark": Command("nnunetv2_fias.benchmark", "main",
                         "Parameters, FLOPs, step time and memory of FIAS vs baselines."),
    "env": Command("nnunetv2_fias.doctor", "main_env",
                   "Print the `export nnUNet_extTrainer=...` line that lets nnU-Net find FIAS."),
    "doctor": Command("nnunetv2_fias.doctor", "main_doctor",
                      "Check the installation, nnU-Net variables, trainer discovery and device."),
}


def usage() -> str:
    lines = [f"usage: {PROG} <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {command.help}" for name, command in COMMANDS.items()]
    lines += ["", f"Run `{PROG} <command> -h` for the options of a command."]
    return "\n".join(lines)


def _status(code: object) -> int:
    """The exit status ``sys.exit(code)`` would give (argparse's usage errors raise SystemExit(2))."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(f"{usage()}\n\n{PROG}: error: no command given", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"{usage()}\n\n{PROG}: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    entry = getattr(importlib.import_module(command.module), command.function)
    try:
        return _status(entry(rest))
    except SystemExit as e:
        return _status(e.code)


if __name__ == "__main__":
    sys.exit(main())
