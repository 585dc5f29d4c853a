"""The inputs of an evaluation: folders, dataset.json and its labels, cases, and reading and checking label maps.

Every problem found here is an :class:`EvaluationError` with one line naming the file, case or option, so that
the command can stop before anything is written. The label-map readers run in worker processes: they stay
top-level and import nothing heavy (no torch).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, subfiles
from scipy import ndimage

DEFAULT_FILE_ENDING = ".nii.gz"
# Relative tolerance on spacing when checking that a prediction has the reference's geometry. NIfTI stores
# spacing as float32, so copies of the same header can differ in the last bits; real mismatches are far larger.
SPACING_RTOL = 1e-4


class EvaluationError(Exception):
    """A user-facing problem with the inputs (missing case, geometry mismatch, unknown label, ...)."""


def _first_line(error: BaseException, default: str = "unreadable") -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else default


# ------------------------------------------------------------------------------------------------ folders, names
def check_input_folders(reference: Path, predictions: Sequence[Path]) -> None:
    """The reference and every prediction folder exist, and no prediction folder is given twice."""
    if not reference.is_dir():
        raise EvaluationError(f"-r/--reference {reference} is not a folder")
    if not predictions:
        raise EvaluationError("-p/--predictions: give at least one prediction folder")
    seen = set()
    for folder in predictions:
        if not folder.is_dir():
            raise EvaluationError(f"-p/--predictions: {folder} is not a folder")
        if folder.resolve() in seen:
            raise EvaluationError(f"-p/--predictions: {folder} is given twice")
        seen.add(folder.resolve())


def method_names(folders: Sequence[Path], names: Sequence[str] | None = None) -> list[str]:
    """``names`` (``--names``) checked against the folders, else :func:`default_method_names`."""
    if names is None:
        return default_method_names(folders)
    names = [str(n) for n in names]
    if len(names) != len(folders):
        raise EvaluationError(f"--names: {len(names)} name(s) for {len(folders)} prediction folder(s)")
    if len(set(names)) != len(names):
        raise EvaluationError(f"--names: names must be unique, got {names}")
    return names


def default_method_names(folders: Sequence[Path]) -> list[str]:
    """Folder names, lengthened to ``parent/name`` (and further) only where two folders share a name."""
    depth = [1] * len(folders)
    while True:
        names = ["/".join(f.parts[-d:]) for f, d in zip(folders, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        grown = False
        for i, n in enumerate(names):
            if n in clashes and depth[i] < len(folders[i].parts):
                depth[i] += 1
                grown = True
        if not grown:
            raise EvaluationError(f"cannot tell prediction folders apart: {sorted(clashes)}")


# ------------------------------------------------------------------------------------------------ dataset.json
class LabelSetup(NamedTuple):
    """What dataset.json says about the label maps, and the labels chosen for scoring."""

    path: Path                 # the dataset.json used
    selected: dict[str, int]   # labels to score, {name: value} in table order
    declared: list[int]        # every value a label map may hold: background, all labels, ignore
    ignore: int | None         # nnU-Net's ignore label, erased from both maps before scoring
    file_ending: str


def load_dataset_json(path: Path) -> dict:
    try:
        data = load_json(str(path))
    except (OSError, ValueError) as e:
        raise EvaluationError(f"cannot read dataset.json {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict) or not data["labels"]:
        raise EvaluationError(f"{path} has no 'labels' mapping; is it an nnU-Net dataset.json?")
    return data


def resolve_dataset_json(reference: Path, predictions: Sequence[Path], dataset_json: Path | None) -> Path:
    """Pick the dataset.json: explicit, else those next to the predictions and of the reference's dataset."""
    if dataset_json is not None:
        if not dataset_json.is_file():
            raise EvaluationError(f"-j/--dataset-json: {dataset_json} is not a file")
        return dataset_json
    candidates = [p / "dataset.json" for p in predictions]
    candidates += [reference.parent / "dataset.json", reference / "dataset.json"]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise EvaluationError(
            "no dataset.json found next to the predictions (nnU-Net copies it there) nor in the reference's "
            f"dataset folder {reference.parent}; pass it with -j/--dataset-json")
    first = load_dataset_json(found[0])["labels"]
    for other in found[1:]:
        if load_dataset_json(other)["labels"] != first:
            raise EvaluationError(
                f"the labels of {found[0]} and {other} differ, so label values may mean different things; pass the "
                f"dataset.json that defines the reference labels with -j/--dataset-json")
    return found[0]


def parse_labels(dataset: dict, path: Path) -> tuple[dict[str, int], int | None, list[int]]:
    """Foreground labels ``{name: value}`` in dataset.json order, the ignore label's value (or None), and every
    value a label map may hold, as nnU-Net's ``LabelManager`` reads them.

    Region-based datasets are refused: their label maps do not say which region a voxel belongs to.
    """
    # torch comes with LabelManager's module: import it here, in the main process only.
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    for name, value in dataset["labels"].items():
        if isinstance(value, (list, tuple)):
            raise EvaluationError(
                f"{path}: label {name!r} is a region ({value}); region-based datasets are not supported, evaluate "
                f"against per-class label maps instead")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EvaluationError(f"{path}: label {name!r} has value {value!r}; non-negative integers expected")
    try:
        manager = LabelManager(label_dict=dataset["labels"], regions_class_order=None)
    except (AssertionError, RuntimeError, ValueError) as e:
        raise EvaluationError(f"{path}: nnU-Net rejects these labels: {_first_line(e)}") from None
    foreground = {int(v) for v in manager.foreground_labels}
    labels = {name: value for name, value in dataset["labels"].items() if name != "ignore" and value in foreground}
    if not labels:
        raise EvaluationError(f"{path} declares no foreground label")
    ignore = manager.ignore_label
    declared = sorted({int(v) for v in manager.all_labels} | ({ignore} if ignore is not None else set()))
    return labels, ignore, declared


def select_labels(available: dict[str, int], requested: Sequence[str] | None) -> dict[str, int]:
    """Resolve ``--labels`` (names, case-insensitive names, or integer values) in the order given."""
    if not requested:
        return dict(available)
    by_lower: dict[str, list[str]] = {}
    for name in available:
        by_lower.setdefault(name.lower(), []).append(name)
    by_value = {v: n for n, v in available.items()}
    chosen: dict[str, int] = {}
    for token in map(str, requested):
        if token in available:
            name = token
        elif len(by_lower.get(token.lower(), [])) == 1:
            name = by_lower[token.lower()][0]
        elif token.lstrip("-").isdigit() and int(token) in by_value:
            name = by_value[int(token)]
        else:
            listing = ", ".join(f"{n} ({v})" for n, v in available.items())
            raise EvaluationError(f"--labels: unknown label {token!r}; available: {listing}")
        if name in chosen:
            raise EvaluationError(f"--labels: label {name!r} is selected twice")
        chosen[name] = available[name]
    return chosen


def load_label_setup(reference: Path, predictions: Sequence[Path], dataset_json: Path | None,
                     labels: Sequence[str | int] | None) -> LabelSetup:
    """Find and read dataset.json, and resolve the labels to score."""
    path = resolve_dataset_json(reference, predictions, dataset_json)
    dataset = load_dataset_json(path)
    available, ignore, declared = parse_labels(dataset, path)
    selected = select_labels(available, [str(x) for x in labels] if labels else None)
    return LabelSetup(path, selected, declared, ignore, dataset.get("file_ending", DEFAULT_FILE_ENDING))


# ------------------------------------------------------------------------------------------------ cases
def list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    """``{case: file}`` of the ``CASE<file_ending>`` files in ``folder``, sorted by case."""
    try:
        files = subfiles(str(folder), join=False, suffix=file_ending, sort=True)
    except OSError as e:
        raise EvaluationError(f"cannot list {folder}: {e.strerror or _first_line(e)}") from None
    return {f[: -len(file_ending)]: folder / f for f in files if len(f) > len(file_ending)}


def reference_cases(reference: Path, setup: LabelSetup) -> dict[str, Path]:
    cases = list_cases(reference, setup.file_ending)
    if not cases:
        raise EvaluationError(f"-r/--reference {reference} holds no *{setup.file_ending} file (file_ending from "
                              f"{setup.path})")
    return cases


def prediction_cases(folder: Path, ref_cases: dict[str, Path], reference: Path, file_ending: str) -> dict[str, Path]:
    """The prediction files of ``folder``; every reference case must have one, extra predictions are ignored."""
    cases = list_cases(folder, file_ending)
    missing = sorted(set(ref_cases) - set(cases))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise EvaluationError(f"prediction folder {folder} lacks case(s) {shown} (expected {{case}}{file_ending} "
                              f"for every case of {reference})")
    extra = sorted(set(cases) - set(ref_cases))
    if extra:
        print(f"note: {folder}: {len(extra)} prediction(s) without reference ignored (e.g. {extra[0]})",
              file=sys.stderr)
    return cases


# ------------------------------------------------------------------------------------------------ label maps
class LabelMap(NamedTuple):
    array: np.ndarray                 # integer labels, array axis order
    spacing: tuple[float, ...]        # in the same order
    placement: tuple                  # (origin, direction), for the same-geometry check
    path: str


def read_label_map(path: str, case: str, role: str) -> LabelMap:
    """Read a 2D or 3D single-channel label map; integral float images are accepted as labels."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(path)
    except RuntimeError as e:
        raise EvaluationError(f"case {case}: cannot read {role} {path}: {_first_line(e)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise EvaluationError(
            f"case {case}: {role} {path} must be a 2D or 3D single-channel label map, got a "
            f"{image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} component(s)")
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise EvaluationError(f"case {case}: {role} {path} contains non-integer values; a label map is "
                                  f"expected")
        array = array.astype(np.int32)
    spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    return LabelMap(array, spacing, (image.GetOrigin(), image.GetDirection()), path)


def check_same_geometry(case: str, prediction: LabelMap, reference: LabelMap) -> None:
    """Shape and spacing must match the reference; a different origin or direction only warns."""
    def mismatch(what: str, pred_value, ref_value) -> EvaluationError:
        return EvaluationError(
            f"case {case}: prediction {prediction.path} has {what} {pred_value} but the reference {reference.path} "
            f"has {ref_value} (array axis order); predictions must be in the reference's geometry")

    if prediction.array.shape != reference.array.shape:
        raise mismatch("shape", prediction.array.shape, reference.array.shape)
    if not np.allclose(prediction.spacing, reference.spacing, rtol=SPACING_RTOL, atol=1e-6):
        raise mismatch("spacing", prediction.spacing, reference.spacing)
    if not all(np.allclose(a, b, atol=1e-3) for a, b in zip(prediction.placement, reference.placement)):
        # Like nnU-Net's dataset check: only a warning, the arrays are still compared voxel by voxel.
        print(f"warning: case {case}: prediction {prediction.path} has a different origin or direction than the "
              f"reference {reference.path}; comparing voxel by voxel", file=sys.stderr)


def label_boxes(label_map: LabelMap, declared: Sequence[int], case: str, role: str) -> list:
    """Check that every value of the map is declared; return ``find_objects`` boxes indexed by value - 1."""
    def undeclared_error(values: list) -> EvaluationError:
        return EvaluationError(
            f"case {case}: {role} {label_map.path} contains label values {values[:10]} that dataset.json does not "
            f"declare (declared: {sorted(declared)})")

    array, max_declared = label_map.array, max(declared)
    if int(array.min()) < 0 or int(array.max()) > max_declared:
        raise undeclared_error(np.unique(array[(array < 0) | (array > max_declared)]).tolist())
    boxes = ndimage.find_objects(array, max_label=max_declared) if max_declared > 0 else []
    # Gaps in the declared values (e.g. 0, 1, 3) are caught here, from the boxes that are computed anyway.
    undeclared = [v for v in range(1, max_declared + 1) if boxes[v - 1] is not None and v not in declared]
    if undeclared:
        raise undeclared_error(undeclared)
    return boxes
