"""``nnunetv2_fias convert-acdc``: ACDC (cine MRI, RV/MYO/LV) into nnU-Net's raw format.

Two inputs are understood:

* the release (``training/patientNNN/{Info.cfg, patientNNN_frameFF.nii.gz, patientNNN_frameFF_gt.nii.gz,
  patientNNN_4d.nii.gz}``, ``testing/`` or the 2017 ``testing/testing/``): the ED and ES frame numbers are read
  from each patient's ``Info.cfg``; cases are named ``patientNNN_frameFF`` as in nnU-Net's Dataset027 converter;
* the preprocessed mirror (``train/patientNNN/patientNNN_sax_ed[_gt].nii.gz``, ``_sax_es[_gt]``, ``test/...``):
  cases are named ``patientNNN_ed`` / ``patientNNN_es``.

4D cine files (``_4d``, ``_sax_t``) are never converted. Images are copied byte for byte (channel ``cineMRI``,
z-score normalisation); labels are RV 1, MYO 2, LV 3. ``splits_final.json`` keeps both frames of a patient on
the same side of every fold.

Example:
    nnunetv2_fias convert-acdc -i /data/ACDC/database -d 27
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunetv2_fias.dataset_conversion.cases import convert_nifti_case
from nnunetv2_fias.dataset_conversion.checks import find_nifti, format_ids, require_input_folder, visible_entries
from nnunetv2_fias.dataset_conversion.common import FILE_ENDING, ConversionError
from nnunetv2_fias.dataset_conversion.output import DatasetOutput, nnunet_folders, write_dataset_json
from nnunetv2_fias.dataset_conversion.runner import (EXIT_CODES, Task, add_dataset_id_arg, add_output_args, cli,
                                                     print_messages, write_dataset)
from nnunetv2_fias.dataset_conversion.split_ids import (ACDC_MTUNET_TEST, ACDC_MTUNET_TRAIN, ACDC_MTUNET_VAL,
                                                        ACDC_NNFORMER_TEST, ACDC_NNFORMER_TRAIN,
                                                        ACDC_NNFORMER_VAL, ACDC_TEST_PATIENTS,
                                                        ACDC_TRAINING_PATIENTS)

LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
# The 70/10/20 patient protocols: (train, validation, test) patient numbers; one fold each.
PATIENT_SPLITS = {
    "transunet": (ACDC_MTUNET_TRAIN, ACDC_MTUNET_VAL, ACDC_MTUNET_TEST),
    "nnformer": (ACDC_NNFORMER_TRAIN, ACDC_NNFORMER_VAL, ACDC_NNFORMER_TEST),
}
PROTOCOL_TEXT = {
    "nnunet": "nnU-Net Dataset027 protocol: all 100 training patients (200 ED/ES cases) in imagesTr, "
              "nnU-Net's patient-grouped 5-fold split (seed 1234); official test patients in imagesTs",
    "transunet": "TransUNet-family 2D protocol (MT-UNet split): 70 train / 10 validation patients in "
                 "imagesTr (one fold in splits_final.json), 20 test patients in imagesTs/labelsTs",
    "nnformer": "nnFormer protocol: 70 train / 10 validation patients in imagesTr (one fold in "
                "splits_final.json), the same 20 test patients as MT-UNet in imagesTs/labelsTs",
}
PATIENT_RE = re.compile(r"patient(\d{3})")
MIRROR_RE = re.compile(r"(patient\d{3})_sax_(ed|es)(_gt)?\.nii(?:\.gz)?")


@dataclass
class Frame:
    """One ED or ES volume of one patient."""

    patient: int
    phase: str  # "ED" or "ES"
    case: str
    image: Path
    label: Path | None


def parse_info_cfg(path: Path) -> dict[str, str]:
    """``key: value`` lines of an ACDC ``Info.cfg``."""
    try:
        text = path.read_text(errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot read this Info.cfg ({e})")
    info = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def detect_layout(root: Path) -> tuple[str, Path]:
    """``("release", folder with training/)`` or ``("mirror", folder with train/ and/or test/)``."""
    base = next((c for c in (root, root / "database") if (c / "training").is_dir() or (c / "train").is_dir()), None)
    if base is None:
        raise ConversionError(f"{root}: expected the ACDC release (training/ with patient folders, testing/) or "
                              "the preprocessed mirror (train/, test/ with patientNNN_sax_ed.nii.gz files), found "
                              "neither")
    if (base / "training").is_dir() and (base / "train").is_dir():
        raise ConversionError(f"{base} holds both training/ (release) and train/ (preprocessed mirror); point -i "
                              "at one of them")
    return ("release", base) if (base / "training").is_dir() else ("mirror", base)


def patient_dirs(folder: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in sorted(visible_entries(folder))
            if p.is_dir() and (m := PATIENT_RE.fullmatch(p.name))}


def scan_release_patient(pdir: Path, number: int, need_gt: bool, problems: list[str]) -> list[Frame]:
    """The ED and ES frames named by a patient's Info.cfg (labels required for training patients)."""
    cfg = pdir / "Info.cfg"
    if not cfg.is_file():
        problems.append(f"{pdir}: Info.cfg is missing; expected it to name the ED and ES frames")
        return []
    try:
        info = parse_info_cfg(cfg)
    except ConversionError as e:
        problems += e.problems
        return []
    frames, numbers = [], {}
    for phase in ("ED", "ES"):
        value = info.get(phase, "")
        if not value.isdigit():
            problems.append(f"{cfg}: expected a line '{phase}: <frame number>', found "
                            f"{(phase + ': ' + value) if phase in info else 'none'}")
            continue
        numbers[phase] = int(value)
    if len(numbers) == 2 and numbers["ED"] == numbers["ES"]:
        problems.append(f"{cfg}: ED and ES name the same frame {numbers['ED']}; expected two different frames")
        return []
    for phase, f in numbers.items():
        stem = f"{pdir.name}_frame{f:02d}"
        image = find_nifti(pdir, stem)
        label = find_nifti(pdir, f"{stem}_gt")
        if image is None:
            problems.append(f"{pdir / (stem + '.nii.gz')} is missing; expected the {phase} frame {f} named in {cfg}")
        if label is None and need_gt:
            problems.append(f"{pdir / (stem + '_gt.nii.gz')} is missing; expected the {phase} label of frame {f} "
                            f"named in {cfg}")
        if image is not None:
            frames.append(Frame(number, phase, stem, image, label))
    return frames


def scan_release(base: Path, with_test: bool) -> tuple[dict[int, list[Frame]], dict[int, list[Frame]], list[str]]:
    """Training and (optionally) test patients of the release; raise on any structural problem."""
    problems: list[str] = []
    warnings: list[str] = []
    train_dir = base / "training"
    train_dirs = patient_dirs(train_dir)
    if not train_dirs:
        raise ConversionError(f"{train_dir} holds no patientNNN folders; expected patient001 ... patient100")
    check_patient_set(train_dirs, train_dir, problems)
    train = {n: scan_release_patient(d, n, True, problems) for n, d in train_dirs.items()}
    test: dict[int, list[Frame]] = {}
    if with_test:
        candidates = [d for d in (base / "testing", base / "testing" / "testing") if d.is_dir() and patient_dirs(d)]
        if not candidates:
            warnings.append(f"no patient folders in {base / 'testing'} (or testing/testing): imagesTs will not be "
                            "written")
        else:
            test_dir = candidates[0]
            test_dirs = patient_dirs(test_dir)
            clash = sorted(set(test_dirs) & set(ACDC_TRAINING_PATIENTS))
            if clash:
                problems.append(f"{test_dir}: patient(s) {format_ids(clash, 3)} are training patients; expected "
                                f"test patients {ACDC_TEST_PATIENTS[0]}-{ACDC_TEST_PATIENTS[-1]}")
            test = {n: scan_release_patient(d, n, False, problems) for n, d in test_dirs.items()}
            warnings += [f"{f.image}: no {f.case}_gt file; this test case gets no labelsTs entry"
                         for frames in test.values() for f in frames if f.label is None]
    if problems:
        raise ConversionError(problems)
    return train, test, warnings


def check_patient_set(found: dict[int, object], where: Path, problems: list[str]) -> None:
    missing = sorted(set(ACDC_TRAINING_PATIENTS) - set(found))
    extra = sorted(set(found) - set(ACDC_TRAINING_PATIENTS))
    if missing:
        problems.append(f"{where}: patient(s) {format_ids(missing, 3)} are missing; every protocol needs all 100 "
                        "training patients (001-100)")
    if extra:
        problems.append(f"{where}: patient(s) {format_ids(extra, 3)} are not ACDC training patients (001-100)")


def scan_mirror(base: Path, with_test: bool) -> tuple[dict[int, list[Frame]], dict[int, list[Frame]], list[str]]:
    """Patients of the preprocessed mirror (``train/`` and ``test/``, per-patient folders or flat)."""
    problems: list[str] = []
    warnings: list[str] = []
    files: dict[int, dict[str, Path]] = {}
    origin: dict[int, Path] = {}
    for split_dir in (base / "train", base / "test"):
        if not split_dir.is_dir():
            continue
        candidates = [f for f in split_dir.iterdir() if f.is_file()]
        for sub in patient_dirs(split_dir).values():
            candidates += [f for f in sub.iterdir() if f.is_file()]
        for f in sorted(candidates):
            m = MIRROR_RE.fullmatch(f.name)
            if not m:
                continue
            number = int(m.group(1)[len("patient"):])
            if number in origin and origin[number] != split_dir:
                problems.append(f"patient{number:03d} appears in both {origin[number]} and {split_dir}")
                continue
            origin[number] = split_dir
            files.setdefault(number, {})[m.group(2) + (m.group(3) or "")] = f
    if not files:
        raise ConversionError(f"{base}: no patientNNN_sax_ed.nii.gz / _sax_es.nii.gz files under train/ or test/")
    check_patient_set({n: 1 for n in files if n not in ACDC_TEST_PATIENTS}, base / "train", problems)
    train: dict[int, list[Frame]] = {}
    test: dict[int, list[Frame]] = {}
    for number, found in sorted(files.items()):
        is_train = number in ACDC_TRAINING_PATIENTS
        if not is_train and (not with_test or number not in ACDC_TEST_PATIENTS):
            continue
        folder = next(iter(found.values())).parent
        frames = []
        for phase in ("ed", "es"):
            stem = f"patient{number:03d}_sax_{phase}"
            if phase not in found:
                problems.append(f"{folder / (stem + '.nii.gz')} is missing; expected the {phase.upper()} image")
                continue
            if phase + "_gt" not in found:
                if is_train:
                    problems.append(f"{folder / (stem + '_gt.nii.gz')} is missing; expected the {phase.upper()} "
                                    "label of a training patient")
                else:
                    warnings.append(f"{found[phase]}: no _gt file; this test case gets no labelsTs entry")
            frames.append(Frame(number, phase.upper(), f"patient{number:03d}_{phase}", found[phase],
                                found.get(phase + "_gt")))
        (train if is_train else test)[number] = frames
    if problems:
        raise ConversionError(problems)
    return train, test, warnings


def patient_split(train_patients: list[int], seed: int = 1234) -> list[list[int]]:
    """Validation patients per fold, exactly as nnU-Net's ``create_ACDC_split`` (Dataset027_ACDC.py) draws them:
    sorted patients, ``RandomState(seed).shuffle``, fold k validates on ``patients[k::5]``."""
    patients = np.array(sorted(train_patients))
    np.random.RandomState(seed).shuffle(patients)
    return [sorted(int(p) for p in patients[fold::5]) for fold in range(5)]


def build_splits(frames: dict[int, list[Frame]], val_folds: list[list[int]]) -> list[dict]:
    """Case-level splits from patient-level validation sets: both frames of a patient go together."""
    splits = []
    for val in val_folds:
        val_set = set(val)
        splits.append({
            "train": sorted(f.case for n, fs in frames.items() if n not in val_set for f in fs),
            "val": sorted(f.case for n, fs in frames.items() if n in val_set for f in fs),
        })
    return splits


def case_tasks(train_frames: dict[int, list[Frame]], test_frames: dict[int, list[Frame]], staging: Path) -> list[Task]:
    """One worker call per frame: image copied unchanged, label checked for the values 0-3."""
    tasks = []
    for frames, tr in ((train_frames, "Tr"), (test_frames, "Ts")):
        for f in (f for fs in frames.values() for f in fs):
            tasks.append((convert_nifti_case, dict(
                image=str(f.image), label=str(f.label) if f.label else None,
                out_image=str(staging / f"images{tr}" / f"{f.case}_0000{FILE_ENDING}"),
                out_label=str(staging / f"labels{tr}" / f"{f.case}{FILE_ENDING}") if f.label else None,
                allowed=list(LABELS.values()), mapping=None)))
    return tasks


def write_acdc_json(staging: Path, dataset_name: str, protocol: str, layout: str,
                    train_frames: dict[int, list[Frame]], test_frames: dict[int, list[Frame]]) -> None:
    source = "ACDC release" if layout == "release" else "preprocessed mirror"
    write_dataset_json(
        staging, "cineMRI", LABELS, sum(len(fs) for fs in train_frames.values()),
        dataset_name=dataset_name,
        reference="Automated Cardiac Diagnosis Challenge (ACDC), MICCAI 2017; Bernard et al., IEEE TMI 2018",
        license="see the ACDC data use terms (CREATIS, Universite de Lyon)",
        description=f"{PROTOCOL_TEXT[protocol]}; source: {source} (images copied unchanged)",
        converted_by="nnunetv2_fias convert-acdc",
        fias_conversion={
            "protocol": protocol, "source": layout,
            "phases": {f.case: f.phase for frames in (train_frames, test_frames) for fs in frames.values() for f in fs},
            "test_cases": sorted(f.case for fs in test_frames.values() for f in fs),
        })


def convert_acdc(input_folder: str | Path, dataset_id: int, protocol: str = "nnunet", overwrite: bool = False,
                 num_processes: int = 1) -> Path:
    """Convert ACDC into ``$nnUNet_raw/DatasetXXX_ACDC`` and write its ``splits_final.json``.

    Args:
        input_folder: the release folder (holding ``training/``; ``database`` or its parent) or the
            preprocessed mirror (holding ``train/``, ``test/``).
        dataset_id: nnU-Net dataset ID.
        protocol: ``nnunet`` (all 100 training patients, nnU-Net's patient-grouped 5-fold split, official test
            patients in imagesTs), ``transunet`` (MT-UNet's 70/10/20 patients, one fold) or ``nnformer``
            (nnFormer's 70/10/20 patients: same test patients, another validation set).
        overwrite: replace an existing dataset of that ID.
        num_processes: worker processes.

    Returns:
        The dataset folder written.

    Raises:
        ConversionError: on any problem with the input or the output location (``nnUNet_raw`` and
            ``nnUNet_preprocessed`` must exist).

    Example:
        >>> convert_acdc("/data/ACDC/database", 27)  # doctest: +SKIP
    """
    raw_root, pre_root = nnunet_folders(with_split=True)
    root = require_input_folder(input_folder)
    layout, base = detect_layout(root)
    scan = scan_release if layout == "release" else scan_mirror
    patients, official_test, warnings = scan(base, protocol == "nnunet")

    if protocol == "nnunet":
        train_frames, test_frames = patients, official_test
        splits = build_splits(train_frames, patient_split(list(train_frames)))
    else:
        train_ids, val_ids, test_ids = PATIENT_SPLITS[protocol]
        train_frames = {n: patients[n] for n in sorted(train_ids + val_ids)}
        test_frames = {n: patients[n] for n in test_ids}
        splits = build_splits(train_frames, [list(val_ids)])

    out = DatasetOutput(dataset_id, "ACDC", overwrite, root, raw_root, pre_root)
    out.check_split(splits)
    print_messages("warning", warnings)
    write_dataset(out, splits, lambda staging: case_tasks(train_frames, test_frames, staging),
                  lambda staging: write_acdc_json(staging, out.name, protocol, layout, train_frames, test_frames),
                  num_processes, "convert-acdc")
    n_train = sum(len(fs) for fs in train_frames.values())
    n_test = sum(len(fs) for fs in test_frames.values())
    print(f"Wrote {out.target}: {n_train} training cases ({len(train_frames)} patients), {n_test} test cases "
          f"({len(test_frames)} patients); split ({len(splits)} fold(s), patient-grouped): {out.split_file}")
    return out.target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_fias convert-acdc",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Convert ACDC (cardiac cine MRI; labels RV 1, MYO 2, LV 3) into nnU-Net's raw format: "
            "$nnUNet_raw/DatasetXXX_ACDC with imagesTr/labelsTr/imagesTs[/labelsTs] and dataset.json (channel "
            "cineMRI, z-score normalisation), plus $nnUNet_preprocessed/DatasetXXX_ACDC/splits_final.json in which "
            "both frames (ED, ES) of a patient always sit on the same side.", 100),
        epilog="""protocols:
  nnunet     nnU-Net's Dataset027 protocol: all 100 training patients (200 ED/ES cases) in imagesTr with
             nnU-Net's patient-grouped 5-fold split (create_ACDC_split, seed 1234); the official test
             patients (101-150) in imagesTs, plus labelsTs where _gt files exist.
  transunet  TransUNet-family 2D protocol (MT-UNet's 70/10/20 patient split): 80 patients in imagesTr with
             one fold (70 train / 10 validation patients: 019 021 029 033 041 050 061 071 076 080);
             the 20 test patients (002 003 008 009 012 014 017 024 042 048 049 053 055 064 067 079 081 088
             092 095) in imagesTs + labelsTs. Train with fold 0.
  nnformer   nnFormer's 70/10/20 split: the same 20 test patients as transunet, a different validation set
             (089 090 091 093 094 096 097 098 099 100). Train with fold 0.

input layouts:
  release  training/patientNNN/{Info.cfg, patientNNN_frameFF.nii.gz, patientNNN_frameFF_gt.nii.gz},
           testing/ or testing/testing/; -i may be the folder holding training/ or its parent (database/).
           ED and ES frame numbers come from each Info.cfg; cases are named patientNNN_frameFF.
  mirror   train/patientNNN/patientNNN_sax_ed.nii.gz, _sax_ed_gt, _sax_es, _sax_es_gt; test/...
           cases are named patientNNN_ed / patientNNN_es.
  4D files (_4d, _sax_t) are never converted. Images are copied unchanged.

example:
  export nnUNet_raw=/data/nnUNet_raw nnUNet_preprocessed=/data/nnUNet_preprocessed
  nnunetv2_fias convert-acdc -i /data/ACDC/database -d 27 --protocol transunet
  nnUNetv2_plan_and_preprocess -d 27 --verify_dataset_integrity

""" + EXIT_CODES)
    parser.add_argument("-i", "--input", required=True, metavar="INPUT",
                        help="the ACDC release folder (holding training/, testing/) or the preprocessed mirror "
                             "(holding train/, test/)")
    add_dataset_id_arg(parser, "ACDC")
    parser.add_argument("--protocol", choices=("nnunet",) + tuple(PATIENT_SPLITS), default="nnunet",
                        help="which patients go to training, validation and test (see below; default: "
                             "%(default)s)")
    add_output_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nnunetv2_fias convert-acdc``."""
    parser = build_parser()
    return cli(argv, parser, lambda a: convert_acdc(a.input, a.dataset_id, a.protocol, a.overwrite,
                                                    a.num_processes))


if __name__ == "__main__":
    sys.exit(main())
