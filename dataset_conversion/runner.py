"""Running a conversion: the worker pool with progress, warnings and errors for the user, and the CLI glue.

:func:`cli` is the one place where a :class:`.common.ConversionError` becomes a message and exit status 1;
argparse usage errors give exit status 2.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path
from typing import Callable, Iterable

from nnunetv2_fias._util import default_num_processes
from nnunetv2_fias.dataset_conversion.common import MAX_LISTED_PROBLEMS, CaseError, CaseResult, ConversionError
from nnunetv2_fias.dataset_conversion.output import DatasetOutput, drop_empty_folders, make_case_folders

Task = tuple[Callable[..., CaseResult], dict]

EXIT_CODES = """exit status:
  0  dataset written;  1  problem with the input, the options or $nnUNet_raw/$nnUNet_preprocessed (each
  problem is listed with the file concerned and what was expected; nothing is written or replaced);
  2  invalid command line"""


def _call(task: Task) -> CaseResult:
    func, kwargs = task
    try:
        return func(**kwargs)
    except CaseError as e:
        return CaseResult(errors=[str(e)])
    except OSError as e:  # disk full, permissions: name the file nnU-Net would otherwise hide in a traceback
        return CaseResult(errors=[f"{getattr(e, 'filename', None) or kwargs}: {e.strerror or e}"])


def run_cases(tasks: list[Task], num_processes: int, desc: str) -> CaseResult:
    """Run case tasks (module-level function, kwargs) with a progress bar; merge their results."""
    from tqdm import tqdm

    merged = CaseResult()
    num_processes = max(1, min(num_processes, len(tasks)))
    bar = tqdm(total=len(tasks), desc=desc, unit="case", file=sys.stderr, mininterval=0.5)
    try:
        if num_processes == 1:
            results: Iterable[CaseResult] = map(_call, tasks)
            for r in results:
                merged.errors += r.errors
                merged.warnings += r.warnings
                bar.update()
        else:
            with multiprocessing.get_context().Pool(num_processes) as pool:
                for r in pool.imap_unordered(_call, tasks):
                    merged.errors += r.errors
                    merged.warnings += r.warnings
                    bar.update()
    finally:
        bar.close()
    merged.errors.sort()
    return merged


def print_messages(kind: str, messages: list[str]) -> None:
    """Print ``kind: message`` lines to stderr, at most :data:`MAX_LISTED_PROBLEMS` of them."""
    for m in messages[:MAX_LISTED_PROBLEMS]:
        print(f"{kind}: {m}", file=sys.stderr)
    if len(messages) > MAX_LISTED_PROBLEMS:
        print(f"{kind}: ... and {len(messages) - MAX_LISTED_PROBLEMS} more {kind}s", file=sys.stderr)


def print_warnings_raise_errors(result: CaseResult) -> None:
    """Print the warnings collected from the cases; raise :class:`ConversionError` if any case failed."""
    print_messages("warning", result.warnings)
    if result.errors:
        raise ConversionError(result.errors)


def write_dataset(out: DatasetOutput, splits: list[dict] | None, make_tasks: Callable[[Path], list[Task]],
                  write_json: Callable[[Path], None], num_processes: int, desc: str) -> None:
    """Convert every case into ``out``'s staging folder, add dataset.json and commit; nothing is left on failure.

    Args:
        make_tasks: the case tasks for a staging folder (their outputs go to its imagesTr/labelsTr/imagesTs/labelsTs).
        write_json: writes dataset.json into the staging folder once all cases converted.
    """
    with out as staging:
        make_case_folders(staging)
        print_warnings_raise_errors(run_cases(make_tasks(staging), num_processes, desc))
        drop_empty_folders(staging)
        write_json(staging)
        notes = out.commit(splits)
    print_messages("note", notes)


def add_dataset_id_arg(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("-d", "--dataset-id", dest="dataset_id", type=int, required=True, metavar="ID",
                        help=f"nnU-Net dataset ID (1-999); the output is $nnUNet_raw/DatasetXXX_{name}, e.g. "
                             f"-d 27 -> Dataset027_{name}")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing DatasetXXX folder of this ID in $nnUNet_raw (whatever its name) "
                             "and a differing splits_final.json. Without it nothing existing is touched; with it "
                             "the old data is removed only after the new dataset is complete")
    parser.add_argument("-np", "--num-processes", dest="num_processes", type=int,
                        default=default_num_processes(), metavar="N",
                        help="worker processes for reading, checking and writing cases (default here: "
                             "%(default)s = min($nnUNet_def_n_proc or 8, CPUs available))")


def cli(argv: list[str] | None, parser: argparse.ArgumentParser, convert: Callable[[argparse.Namespace], None]) -> int:
    """Parse arguments and run ``convert``; user errors become a message and exit code 1, usage errors 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # -h (0) or a usage error (2), already printed by argparse
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if getattr(args, "num_processes", 1) < 1:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: -np must be at least 1", file=sys.stderr)
        return 2
    try:
        convert(args)
    except ConversionError as e:
        print(e.render(), file=sys.stderr)
        print("Nothing was written.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0
