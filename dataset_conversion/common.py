"""Shared core of the dataset converters: the error and result types every converter module uses.

Every converter follows the same contract:

1. check that ``nnUNet_raw``/``nnUNet_preprocessed`` are set and exist (:mod:`.output`), before reading any input;
2. scan the input and collect *all* structural problems (missing files, bad names) before touching any output
   (:mod:`.checks`);
3. check the output side (dataset ID free or ``--overwrite``; :class:`.output.DatasetOutput`);
4. convert case by case into a hidden staging folder inside ``nnUNet_raw`` (several processes, with progress;
   :mod:`.runner`, :mod:`.cases`), collecting per-case problems (unreadable files, shape/spacing mismatches,
   unexpected label values);
5. only if nothing failed, rename the staging folder into place, write ``splits_final.json`` and then remove
   what ``--overwrite`` replaces. Any failure before that removes the staging folder, so nothing partial or
   half-replaced is ever left behind.

User errors are raised as :class:`ConversionError` and turned into a message plus exit code 1 by
:func:`.runner.cli`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

MAX_LISTED_PROBLEMS = 30
NIFTI_RE = r"\.nii(?:\.gz)?"
FILE_ENDING = ".nii.gz"


class ConversionError(Exception):
    """A problem with the user's input or environment; reported without a traceback.

    Args:
        problems: one message per problem, each naming the file or option and what was expected.
        hint: optional closing advice printed after the list.
    """

    def __init__(self, problems: str | Sequence[str], hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        lines = [f"error: {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"error: ... and {len(self.problems) - len(shown)} more problems of the same kind")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class CaseError(Exception):
    """A problem with one file of one case, raised inside a worker and collected by :func:`.runner.run_cases`."""


@dataclass
class CaseResult:
    """What a worker reports for one case: blocking errors and non-blocking warnings."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
