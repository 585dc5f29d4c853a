"""``nnunetv2_fias convert-synapse``: Synapse (BTCV) into nnU-Net's raw format.

Two inputs are understood:

* the raw release (``RawData/Training/img/img0001.nii.gz``, ``RawData/Training/label/label0001.nii.gz``,
  ``RawData/Testing/img`` or ``RawData/Test/img``): CT in HU, copied byte for byte, channel ``CT`` so nnU-Net
  applies its CT normalisation;
* TransUNet's preprocessed release (``train_npz/caseXXXX_sliceYYY.npz`` + ``test_vol_h5/caseXXXX.npy.h5``):
  slices are stacked back into volumes. Those intensities are already clipped to [-125, 275] HU and scaled to
  [0, 1] and the spacing was discarded, so the channel is named ``noNorm`` (nnU-Net feeds the values as they are,
  as TransUNet did) and the spacing is written as 1 x 1 x 1.

Cases are named ``caseXXXX`` (TransUNet's names). ``splits_final.json`` is written explicitly: nnU-Net's own
default 5-fold split (``generate_crossval_split`` over the sorted training cases, seed 12345), i.e. exactly what
nnU-Net would compute itself, but visible and checkable before training.

Example:
    nnunetv2_fias convert-synapse -i /data/Abdomen/RawData -d 111
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunetv2_fias.dataset_conversion.cases import convert_nifti_case
from nnunetv2_fias.dataset_conversion.checks import (describe_values, format_ids, match_files, nonempty_dir,
                                                     require_input_folder)
from nnunetv2_fias.dataset_conversion.common import FILE_ENDING, ConversionError
from nnunetv2_fias.dataset_conversion.output import DatasetOutput, nnunet_folders, write_dataset_json
from nnunetv2_fias.dataset_conversion.runner import (EXIT_CODES, Task, add_dataset_id_arg, add_output_args, cli,
                                                     print_messages, write_dataset)
from nnunetv2_fias.dataset_conversion.split_ids import (SYNAPSE_LABELLED, SYNAPSE_TRANSUNET_TEST,
                                                        SYNAPSE_TRANSUNET_TRAIN, SYNAPSE_UNLABELLED)
from nnunetv2_fias.dataset_conversion.synapse_transunet import (case_name, convert_transunet_test_case,
                                                                convert_transunet_train_case, scan_transunet)

# Raw label values of the release.
RAW_LABELS = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "esophagus": 5, "liver": 6, "stomach": 7,
    "aorta": 8, "inferior_vena_cava": 9, "portal_vein_and_splenic_vein": 10, "pancreas": 11,
    "adrenal_gland_right": 12, "adrenal_gland_left": 13,
}
# The 8 organs scored by the TransUNet protocol, in the output order 1..8.
EIGHT_ORGANS = ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach")
# The two orders in which circulating copies of TransUNet's npz/h5 release are said to store the 8 organs.
LABEL_ORDER_PRESETS = {
    "raw": ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas"),
    "alphabetical": EIGHT_ORGANS,
}

# Label values a raw-release label map may hold.
ALLOWED_RAW = [0] + sorted(RAW_LABELS.values())
PROTOCOL_TEXT = {
    "transunet": "TransUNet protocol: 18 training cases (imagesTr, nnU-Net default 5-fold CV in "
                 "splits_final.json), 12 test cases in imagesTs/labelsTs",
    "all": "all 30 labelled cases in imagesTr (nnU-Net default 5-fold CV), 20 unlabelled in imagesTs",
}


def label_table(n_labels: int) -> tuple[dict[str, int], dict[int, int]]:
    """Output labels for dataset.json and the raw-value -> output-value mapping."""
    if n_labels == 13:
        return {"background": 0, **RAW_LABELS}, {v: v for v in RAW_LABELS.values()}
    labels = {"background": 0, **{name: i + 1 for i, name in enumerate(EIGHT_ORGANS)}}
    return labels, {RAW_LABELS[name]: labels[name] for name in EIGHT_ORGANS}


def parse_label_order(text: str) -> tuple[str, ...]:
    """``raw``, ``alphabetical`` or eight comma-separated organ names (the organ stored as 1, 2, ..., 8)."""
    if text in LABEL_ORDER_PRESETS:
        return LABEL_ORDER_PRESETS[text]
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if sorted(names) != sorted(EIGHT_ORGANS):
        raise ConversionError(f"--label-order {text!r}: expected 'raw', 'alphabetical' or the eight organs "
                              f"{', '.join(EIGHT_ORGANS)} each exactly once, comma-separated, in the order of "
                              "the values 1..8 in your files")
    return names


# ----------------------------------------------------------------------------------------------------------------
# Input layouts
# ----------------------------------------------------------------------------------------------------------------

def detect_layout(root: Path) -> tuple[str, Path]:
    """Return ``("raw", RawData folder)`` or ``("transunet", folder with train_npz/test_vol_h5)``."""
    raw = next((c for c in (root, root / "RawData") if (c / "Training").is_dir()), None)
    pre = root if (root / "train_npz").is_dir() or (root / "test_vol_h5").is_dir() else None
    if raw and pre:
        raise ConversionError(f"{root} holds both the raw release ({raw / 'Training'}) and TransUNet's "
                              "preprocessed release (train_npz/, test_vol_h5/); point -i at one of them")
    if raw:
        return "raw", raw
    if pre:
        return "transunet", pre
    raise ConversionError(f"{root}: expected the raw Synapse release (RawData/ or a folder with Training/img, "
                          "Training/label, Testing/img) or TransUNet's preprocessed release (train_npz/ and "
                          "test_vol_h5/), found neither")


def _matching_files(folder: Path, prefix: str, problems: list[str], what: str) -> dict[str, Path]:
    """``{NNNN: path}`` of ``<prefix>NNNN.nii[.gz]`` files in ``folder``; other NIfTI names are problems."""
    if not nonempty_dir(folder, problems, what):
        return {}
    found, bad = match_files(folder, prefix + r"(\d{4})\.nii(?:\.gz)?")
    problems += [f"{b}: unexpected file name; expected {prefix}NNNN.nii.gz" for b in bad]
    return found


def _scan_training(raw: Path, problems: list[str]) -> dict[int, tuple[Path, Path]]:
    """Image/label pairs of Training/; every unpaired file and every missing or unknown case is a problem."""
    img_dir, lbl_dir = raw / "Training" / "img", raw / "Training" / "label"
    imgs = _matching_files(img_dir, "img", problems, "the training CTs img0001.nii.gz ... img0040.nii.gz")
    lbls = _matching_files(lbl_dir, "label", problems, "the label maps label0001.nii.gz ... label0040.nii.gz")
    # An unpaired file is only worth naming when the other folder was readable (else every file would be listed).
    if lbls or not problems:
        problems += [f"{imgs[k]} has no label: expected {lbl_dir / f'label{k}.nii.gz'}"
                     for k in sorted(set(imgs) - set(lbls))]
    if imgs or not problems:
        problems += [f"{lbls[k]} has no image: expected {img_dir / f'img{k}.nii.gz'}"
                     for k in sorted(set(lbls) - set(imgs))]
    numbers = {int(k) for k in set(imgs) | set(lbls)}
    unknown = sorted(numbers - set(SYNAPSE_LABELLED))
    missing = sorted(set(SYNAPSE_LABELLED) - numbers) if numbers else []
    if unknown:
        problems.append(f"{img_dir}: case(s) {format_ids(unknown, 4)} are not part of the Synapse training "
                        f"release; expected exactly {format_ids(SYNAPSE_LABELLED, 4)}")
    if missing:
        problems.append(f"{img_dir}: case(s) {format_ids(missing, 4)} are missing; both protocols need all 30 "
                        f"labelled cases ({format_ids(SYNAPSE_LABELLED, 4)})")
    return {int(k): (imgs[k], lbls[k]) for k in sorted(set(imgs) & set(lbls))}


def _scan_testing(raw: Path, problems: list[str], warnings: list[str]) -> dict[int, Path]:
    """The unlabelled test CTs in Testing/img (or Test/img); a missing folder only warns."""
    candidates = [d for d in (raw / "Testing" / "img", raw / "Test" / "img") if d.is_dir()]
    if len(candidates) > 1:
        problems.append(f"both {candidates[0]} and {candidates[1]} exist; expected one test image folder")
        return {}
    if not candidates:
        warnings.append(f"no {raw / 'Testing' / 'img'} (or Test/img): imagesTs will not be written")
        return {}
    folder = candidates[0]
    found = _matching_files(folder, "img", problems, "the unlabelled test CTs img0061.nii.gz ... img0080.nii.gz")
    tests = {int(k): p for k, p in found.items()}
    clash = sorted(set(tests) & set(SYNAPSE_LABELLED))
    if clash:
        problems.append(f"{folder}: case(s) {format_ids(clash, 4)} are training cases; expected "
                        f"the unlabelled test cases {format_ids(SYNAPSE_UNLABELLED, 4)}")
    elif tests and set(tests) != set(SYNAPSE_UNLABELLED):
        warnings.append(f"{folder}: found cases {format_ids(tests, 4)}, the release has "
                        f"{format_ids(SYNAPSE_UNLABELLED, 4)}")
    return tests


def scan_raw(raw: Path, protocol: str) -> tuple[dict[int, tuple[Path, Path]], dict[int, Path], list[str]]:
    """Find labelled and (for ``--protocol all``) unlabelled cases; raise on any structural problem.

    Returns:
        ``({number: (image, label)}, {number: test image}, warnings)``.
    """
    problems: list[str] = []
    warnings: list[str] = []
    pairs = _scan_training(raw, problems)
    tests = _scan_testing(raw, problems, warnings) if protocol == "all" else {}
    if problems:
        raise ConversionError(problems)
    return pairs, tests, warnings


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SynapsePlan:
    """What one conversion writes, decided from the options and the scanned input before any output exists.

    ``sources`` maps each case number to its input: ``(image, label or None)`` in the raw release; the list of
    slice files (training) or the volume file (test) in TransUNet's release.
    """

    layout: str
    protocol: str
    labels: int
    order: tuple[str, ...] | None
    out_labels: dict[str, int]
    mapping: dict[int, int]
    train_ids: list[int]
    test_ids: list[int]
    sources: dict[int, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def channel(self) -> str:
        return "CT" if self.layout == "raw" else "noNorm"


def check_options(layout: str, src: Path, protocol: str, labels: int, label_order: str | None) -> None:
    """Reject option combinations the detected input layout cannot honour (all problems at once)."""
    problems = []
    if layout == "transunet":
        if protocol != "transunet":
            problems.append(f"--protocol {protocol}: TransUNet's preprocessed release only holds the 18/12 "
                            "TransUNet split; use --protocol transunet or convert the raw release")
        if labels != 8:
            problems.append("--labels 13: TransUNet's preprocessed release only has the 8 organs; use --labels 8")
        if label_order is None:
            problems.append("--label-order is required for TransUNet's preprocessed release: public copies "
                            "disagree on which organ each value 1..8 is. Check your copy (e.g. value 7 on the "
                            "aorta of an axial slice means 'raw') and pass 'raw', 'alphabetical' or 8 names")
    elif label_order is not None:
        problems.append("--label-order only applies to TransUNet's preprocessed release (train_npz/, "
                        f"test_vol_h5/); {src} is the raw release, whose label values are fixed")
    if problems:
        raise ConversionError(problems)


def plan_raw(src: Path, protocol: str, labels: int) -> SynapsePlan:
    """Plan for the raw release: the protocol picks training and test cases, labels are remapped by value."""
    pairs, tests, warnings = scan_raw(src, protocol)
    out_labels, mapping = label_table(labels)
    transunet = protocol == "transunet"
    return SynapsePlan(
        "raw", protocol, labels, None, out_labels, mapping,
        train_ids=sorted(SYNAPSE_TRANSUNET_TRAIN) if transunet else sorted(pairs),
        test_ids=sorted(SYNAPSE_TRANSUNET_TEST) if transunet else sorted(tests),
        sources={**{n: (image, None) for n, image in tests.items()}, **pairs}, warnings=warnings)


def plan_transunet(src: Path, labels: int, label_order: str) -> SynapsePlan:
    """Plan for TransUNet's release: its own 18/12 cases, values mapped from the user's ``--label-order``."""
    order = parse_label_order(label_order)
    slices, vols = scan_transunet(src)
    out_labels, _ = label_table(labels)
    # value v in the files is organ order[v-1]; output values follow EIGHT_ORGANS.
    mapping = {i + 1: out_labels[name] for i, name in enumerate(order)}
    return SynapsePlan("transunet", "transunet", labels, order, out_labels, mapping, train_ids=sorted(slices),
                       test_ids=sorted(vols), sources={**slices, **vols})


def case_task(plan: SynapsePlan, number: int, staging: Path) -> Task:
    """The worker call that writes one case into the staging folder."""
    tr = "Tr" if number in plan.train_ids else "Ts"
    out = dict(out_image=str(staging / f"images{tr}" / f"{case_name(number)}_0000{FILE_ENDING}"),
               out_label=str(staging / f"labels{tr}" / f"{case_name(number)}{FILE_ENDING}"), mapping=plan.mapping)
    source = plan.sources[number]
    if plan.layout == "transunet" and tr == "Tr":
        return convert_transunet_train_case, dict(slices=[str(s) for s in source], **out)
    if plan.layout == "transunet":
        return convert_transunet_test_case, dict(volume=str(source), **out)
    image, label = source
    if label is None:  # an unlabelled test case of --protocol all
        out["out_label"] = None
    return convert_nifti_case, dict(image=str(image), label=None if label is None else str(label),
                                    allowed=ALLOWED_RAW, **out)


def write_synapse_json(plan: SynapsePlan, staging: Path, dataset_name: str) -> None:
    """dataset.json with the channel, labels and a record of how the dataset was converted."""
    if plan.layout == "raw":
        source = "raw Synapse release (HU, copied unchanged)"
    else:
        source = ("TransUNet preprocessed release (HU clipped to [-125, 275] and scaled to [0, 1] by TransUNet; "
                  "channel 'noNorm' so nnU-Net does not normalise again; spacing unknown, written as 1x1x1)")
    write_dataset_json(
        staging, plan.channel, plan.out_labels, len(plan.train_ids),
        dataset_name=dataset_name,
        reference="Multi-Atlas Abdomen Labeling Challenge (BTCV), MICCAI 2015; Synapse syn3193805",
        license="see the BTCV data use terms on Synapse (syn3193805)",
        description=f"{PROTOCOL_TEXT[plan.protocol]}; {plan.labels} labels; source: {source}",
        converted_by="nnunetv2_fias convert-synapse",
        fias_conversion={
            "protocol": plan.protocol, "labels": plan.labels, "source": plan.layout,
            "label_order_in_source": list(plan.order) if plan.order else None,
            "source_value_to_label": {str(k): v for k, v in sorted(plan.mapping.items())},
            "test_cases": [case_name(n) for n in plan.test_ids],
            "test_has_labels": plan.layout == "transunet" or plan.protocol == "transunet",
        })


def crossval_split(case_names: list[str]) -> list[dict]:
    """nnU-Net's default 5-fold split, computed the way its trainer does when no splits_final.json exists."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]}
            for s in generate_crossval_split(sorted(case_names), seed=12345, n_splits=5)]


def convert_synapse(input_folder: str | Path, dataset_id: int, protocol: str = "transunet", labels: int | None = None,
                    label_order: str | None = None, overwrite: bool = False, num_processes: int = 1) -> Path:
    """Convert Synapse into ``$nnUNet_raw/DatasetXXX_Synapse`` (+ ``splits_final.json``).

    Args:
        input_folder: raw release folder (``RawData`` or its parent) or TransUNet's preprocessed release.
        dataset_id: nnU-Net dataset ID.
        protocol: ``transunet`` (18 train / 12 test) or ``all`` (30 labelled train / 20 unlabelled test).
        labels: 8 (TransUNet's organs as 1..8) or 13 (all organs); default 8 for transunet, 13 for all.
        label_order: organ order of TransUNet's preprocessed release (required there, rejected otherwise).
        overwrite: replace an existing dataset of that ID.
        num_processes: worker processes.

    Returns:
        The dataset folder written.

    Raises:
        ConversionError: on any problem with the input, the options or the output location (``nnUNet_raw`` and
            ``nnUNet_preprocessed`` must exist).

    Example:
        >>> convert_synapse("/data/Abdomen/RawData", 111)  # doctest: +SKIP
    """
    raw_root, pre_root = nnunet_folders(with_split=True)
    root = require_input_folder(input_folder)
    layout, src = detect_layout(root)
    if labels is None:
        labels = 13 if protocol == "all" else 8
    check_options(layout, src, protocol, labels, label_order)
    plan = plan_raw(src, protocol, labels) if layout == "raw" else plan_transunet(src, labels, label_order)

    out = DatasetOutput(dataset_id, "Synapse", overwrite, root, raw_root, pre_root)
    splits = crossval_split([case_name(n) for n in plan.train_ids])
    out.check_split(splits)
    print_messages("warning", plan.warnings)
    write_dataset(out, splits, lambda staging: [case_task(plan, n, staging) for n in plan.train_ids + plan.test_ids],
                  lambda staging: write_synapse_json(plan, staging, out.name), num_processes, "convert-synapse")
    print(f"Wrote {out.target}: {len(plan.train_ids)} training cases, {len(plan.test_ids)} test cases, labels "
          f"{describe_values(list(plan.out_labels.values()))}, channel {plan.channel}; split: {out.split_file}")
    return out.target


# The help text after the options: protocols, label sets and orders, input layouts, an example.
_EPILOG = """protocols:
  transunet  TransUNet/Swin-Unet/nnFormer protocol: train on the 18 TransUNet training cases
             (0005 0006 0007 0009 0010 0021 0023 0024 0026 0027 0028 0030 0031 0033 0034 0037 0039 0040),
             test on 12 (0001 0002 0003 0004 0008 0022 0025 0029 0032 0035 0036 0038) in imagesTs + labelsTs
             (nnU-Net ignores labelsTs; `nnunetv2_fias evaluate` uses it). Default labels: 8.
  all        nnU-Net default: all 30 labelled cases in imagesTr, the 20 unlabelled (0061-0080) in imagesTs.
             Default labels: 13.

labels:
  8   aorta 1, gallbladder 2, kidney_left 3, kidney_right 4, liver 5, pancreas 6, spleen 7, stomach 8;
      esophagus, vena cava, portal/splenic vein and adrenal glands become background
  13  the release's values: spleen 1, kidney_right 2, kidney_left 3, gallbladder 4, esophagus 5, liver 6,
      stomach 7, aorta 8, inferior_vena_cava 9, portal_vein_and_splenic_vein 10, pancreas 11,
      adrenal_gland_right 12, adrenal_gland_left 13

label orders (--label-order, TransUNet's preprocessed release only; the organ stored as value 1, 2, ..., 8):
  raw           spleen, kidney_right, kidney_left, gallbladder, liver, stomach, aorta, pancreas
  alphabetical  aorta, gallbladder, kidney_left, kidney_right, liver, pancreas, spleen, stomach
  or your own   e.g. --label-order spleen,kidney_right,kidney_left,gallbladder,liver,stomach,aorta,pancreas
  Public copies disagree, so the converter never guesses. Check one slice of your copy (e.g. which value
  the aorta has) before choosing. The output always uses the 8-label order above.

input layouts:
  raw release     RawData/Training/img/img0001.nii.gz, RawData/Training/label/label0001.nii.gz,
                  RawData/Testing/img (or Test/img); -i may be RawData or its parent. CT copied unchanged,
                  channel "CT" (nnU-Net's CT normalisation).
  TransUNet npz   train_npz/caseXXXX_sliceYYY.npz + test_vol_h5/caseXXXX.npy.h5 (needs --label-order).
                  Already clipped/scaled to [0, 1]: channel "noNorm" so nnU-Net does not normalise again;
                  spacing is unknown there and written as 1x1x1.

example:
  export nnUNet_raw=/data/nnUNet_raw nnUNet_preprocessed=/data/nnUNet_preprocessed
  nnunetv2_fias convert-synapse -i /data/Abdomen/RawData -d 111
  nnUNetv2_plan_and_preprocess -d 111 --verify_dataset_integrity

"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_fias convert-synapse",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Convert Synapse (BTCV multi-organ abdominal CT) into nnU-Net's raw format: "
            "$nnUNet_raw/DatasetXXX_Synapse with imagesTr/labelsTr/imagesTs[/labelsTs] and dataset.json, plus "
            "$nnUNet_preprocessed/DatasetXXX_Synapse/splits_final.json (nnU-Net's default 5-fold split over the "
            "training cases, written explicitly so it can be checked before training). Cases are named caseXXXX.",
            100),
        epilog=_EPILOG + EXIT_CODES)
    parser.add_argument("-i", "--input", required=True, metavar="INPUT",
                        help="the raw release folder (RawData or its parent) or TransUNet's preprocessed folder "
                             "holding train_npz/ and test_vol_h5/")
    add_dataset_id_arg(parser, "Synapse")
    parser.add_argument("--protocol", choices=("transunet", "all"), default="transunet",
                        help="which cases go to training and test (see below; default: %(default)s)")
    parser.add_argument("--labels", type=int, choices=(8, 13), default=None,
                        help="8 organs as 1..8 or all 13 with their release values (default: 8 for transunet, "
                             "13 for all)")
    parser.add_argument("--label-order", default=None, metavar="ORDER",
                        help="required for TransUNet's preprocessed release, rejected otherwise: which organ "
                             "each value 1..8 of your copy holds: 'raw', 'alphabetical' or 8 comma-separated "
                             "organ names (see 'label orders' below)")
    add_output_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nnunetv2_fias convert-synapse``."""
    parser = build_parser()
    return cli(argv, parser, lambda a: convert_synapse(a.input, a.dataset_id, a.protocol, a.labels, a.label_order,
                                                       a.overwrite, a.num_processes))


if __name__ == "__main__":
    sys.exit(main())
