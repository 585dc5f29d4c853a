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
import re
import sys
import textwrap
from pathlib import Path

import numpy as np

from nnunetv2_fias.dataset_conversion.common import (
    EXIT_CODES, FILE_ENDING, CaseError, CaseResult, ConversionError, DatasetOutput, add_dataset_id_arg,
    add_output_args, check_finite, cli, convert_nifti_case, describe_values, format_ids, integer_labels,
    match_files, remap, report, require_input_folder, run_cases, write_array_image, write_dataset_json)
from nnunetv2_fias.dataset_conversion.split_ids import (SYNAPSE_LABELLED, SYNAPSE_TRANSUNET_TEST,
                                                        SYNAPSE_TRANSUNET_TRAIN, SYNAPSE_UNLABELLED)

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

TRAIN_NPZ_RE = re.compile(r"case(\d{4})_slice(\d{3,4})\.npz")
TEST_H5_RE = re.compile(r"case(\d{4})\.npy\.h5")


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


def case_name(number: int) -> str:
    return f"case{number:04d}"


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


def nonempty_dir(folder: Path, problems: list[str], what: str) -> bool:
    if not folder.is_dir():
        problems.append(f"{folder} is missing; expected {what}")
        return False
    if not any(p for p in folder.iterdir() if not p.name.startswith(".")):
        problems.append(f"{folder} is empty; expected {what}")
        return False
    return True


def scan_raw(raw: Path, protocol: str) -> tuple[dict[int, tuple[Path, Path]], dict[int, Path], list[str]]:
    """Find labelled and (for ``--protocol all``) unlabelled cases; raise on any structural problem.

    Returns:
        ``({number: (image, label)}, {number: test image}, warnings)``.
    """
    problems: list[str] = []
    warnings: list[str] = []
    img_dir, lbl_dir = raw / "Training" / "img", raw / "Training" / "label"
    imgs: dict[str, Path] = {}
    lbls: dict[str, Path] = {}
    if nonempty_dir(img_dir, problems, "the training CTs img0001.nii.gz ... img0040.nii.gz"):
        imgs, bad = match_files(img_dir, r"img(\d{4})\.nii(?:\.gz)?")
        problems += [f"{b}: unexpected file name; expected imgNNNN.nii.gz" for b in bad]
    if nonempty_dir(lbl_dir, problems, "the label maps label0001.nii.gz ... label0040.nii.gz"):
        lbls, bad = match_files(lbl_dir, r"label(\d{4})\.nii(?:\.gz)?")
        problems += [f"{b}: unexpected file name; expected labelNNNN.nii.gz" for b in bad]
    for key in sorted(set(imgs) - set(lbls)):
        if lbls or not problems:
            problems.append(f"{imgs[key]} has no label: expected {lbl_dir / f'label{key}.nii.gz'}")
    for key in sorted(set(lbls) - set(imgs)):
        if imgs or not problems:
            problems.append(f"{lbls[key]} has no image: expected {img_dir / f'img{key}.nii.gz'}")
    found = {int(k) for k in set(imgs) & set(lbls)}
    if imgs or lbls:
        unknown = sorted({int(k) for k in set(imgs) | set(lbls)} - set(SYNAPSE_LABELLED))
        if unknown:
            problems.append(f"{img_dir}: case(s) {format_ids(unknown, 4)} are not part of the Synapse training "
                            f"release; expected exactly {format_ids(SYNAPSE_LABELLED, 4)}")
        missing = sorted(set(SYNAPSE_LABELLED) - {int(k) for k in set(imgs) | set(lbls)})
        if missing:
            problems.append(f"{img_dir}: case(s) {format_ids(missing, 4)} are missing; both protocols need all 30 "
                            f"labelled cases ({format_ids(SYNAPSE_LABELLED, 4)})")
    tests: dict[int, Path] = {}
    if protocol == "all":
        candidates = [d for d in (raw / "Testing" / "img", raw / "Test" / "img") if d.is_dir()]
        if len(candidates) > 1:
            problems.append(f"both {candidates[0]} and {candidates[1]} exist; expected one test image folder")
        elif not candidates:
            warnings.append(f"no {raw / 'Testing' / 'img'} (or Test/img): imagesTs will not be written")
        elif nonempty_dir(candidates[0], problems, "the unlabelled test CTs img0061.nii.gz ... img0080.nii.gz"):
            found_t, bad = match_files(candidates[0], r"img(\d{4})\.nii(?:\.gz)?")
            problems += [f"{b}: unexpected file name; expected imgNNNN.nii.gz" for b in bad]
            tests = {int(k): p for k, p in found_t.items()}
            clash = sorted(set(tests) & set(SYNAPSE_LABELLED))
            if clash:
                problems.append(f"{candidates[0]}: case(s) {format_ids(clash, 4)} are training cases; expected "
                                f"the unlabelled test cases {format_ids(SYNAPSE_UNLABELLED, 4)}")
            elif tests and set(tests) != set(SYNAPSE_UNLABELLED):
                warnings.append(f"{candidates[0]}: found cases {format_ids(tests, 4)}, the release has "
                                f"{format_ids(SYNAPSE_UNLABELLED, 4)}")
    if problems:
        raise ConversionError(problems)
    pairs = {n: (imgs[f"{n:04d}"], lbls[f"{n:04d}"]) for n in sorted(found)}
    return pairs, tests, warnings


def scan_transunet(root: Path) -> tuple[dict[int, list[Path]], dict[int, Path]]:
    """Group TransUNet's training slices by case and find its test volumes; raise on structural problems."""
    problems: list[str] = []
    slices: dict[int, dict[int, Path]] = {}
    vols: dict[int, Path] = {}
    npz_dir, h5_dir = root / "train_npz", root / "test_vol_h5"
    if nonempty_dir(npz_dir, problems, "TransUNet's training slices caseXXXX_sliceYYY.npz"):
        for f in sorted(npz_dir.iterdir()):
            m = TRAIN_NPZ_RE.fullmatch(f.name)
            if m:
                slices.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
            elif f.name.endswith(".npz"):
                problems.append(f"{f}: unexpected file name; expected caseXXXX_sliceYYY.npz")
        for case, by_index in sorted(slices.items()):
            gaps = sorted(set(range(max(by_index) + 1)) - set(by_index))
            if gaps:
                problems.append(f"{npz_dir}: {case_name(case)} lacks slice(s) {', '.join(f'{g:03d}' for g in gaps)}"
                                "; expected consecutive slices from 000")
        if slices and set(slices) != set(SYNAPSE_TRANSUNET_TRAIN):
            problems.append(f"{npz_dir}: found cases {format_ids(slices, 4)}; expected TransUNet's 18 training "
                            f"cases {format_ids(SYNAPSE_TRANSUNET_TRAIN, 4)}")
    if nonempty_dir(h5_dir, problems, "TransUNet's test volumes caseXXXX.npy.h5"):
        for f in sorted(h5_dir.iterdir()):
            m = TEST_H5_RE.fullmatch(f.name)
            if m:
                vols[int(m.group(1))] = f
            elif f.name.endswith(".h5"):
                problems.append(f"{f}: unexpected file name; expected caseXXXX.npy.h5")
        if vols and set(vols) != set(SYNAPSE_TRANSUNET_TEST):
            problems.append(f"{h5_dir}: found cases {format_ids(vols, 4)}; expected TransUNet's 12 test cases "
                            f"{format_ids(SYNAPSE_TRANSUNET_TEST, 4)}")
    if problems:
        raise ConversionError(problems)
    return {c: [s[i] for i in sorted(s)] for c, s in sorted(slices.items())}, vols


# ----------------------------------------------------------------------------------------------------------------
# Workers for the TransUNet release (module level: picklable for any multiprocessing start method)
# ----------------------------------------------------------------------------------------------------------------

def _checked_pair(image, label, where: str) -> tuple[np.ndarray, np.ndarray]:
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape:
        raise CaseError(f"{where}: image shape {image.shape} differs from label shape {label.shape}; "
                        "expected identical shapes")
    check_finite(image, Path(where))
    return image, label


def convert_transunet_train_case(slices: list[str], out_image: str, out_label: str,
                                 mapping: dict[int, int]) -> CaseResult:
    """Stack a case's npz slices (axis 0 = slice index) into a volume and write image + remapped label."""
    images, labels = [], []
    for s in slices:
        try:
            with np.load(s) as z:
                if "image" not in z.files or "label" not in z.files:
                    raise CaseError(f"{s}: expected arrays 'image' and 'label', found {z.files}")
                image, label = _checked_pair(z["image"], z["label"], s)
        except CaseError:
            raise
        except Exception as e:  # zipfile/pickle errors of a damaged archive
            raise CaseError(f"{s}: cannot read this npz file (corrupt or not an npz archive: {e})")
        if image.ndim != 2:
            raise CaseError(f"{s}: expected a 2D slice, found shape {image.shape}")
        if images and image.shape != images[0].shape:
            raise CaseError(f"{s}: slice shape {image.shape} differs from {slices[0]} {images[0].shape}")
        images.append(image)
        labels.append(integer_labels(label, Path(s), range(9)))
    write_array_image(np.stack(images).astype(np.float32), Path(out_image))
    write_array_image(remap(np.stack(labels), mapping), Path(out_label))
    return CaseResult()


def convert_transunet_test_case(volume: str, out_image: str, out_label: str, mapping: dict[int, int]) -> CaseResult:
    """Write one ``caseXXXX.npy.h5`` test volume (datasets ``image``/``label``, slices along axis 0)."""
    import h5py

    try:
        with h5py.File(volume, "r") as f:
            if "image" not in f or "label" not in f:
                raise CaseError(f"{volume}: expected datasets 'image' and 'label', found {sorted(f.keys())}")
            image, label = _checked_pair(f["image"][()], f["label"][()], volume)
    except CaseError:
        raise
    except Exception as e:
        raise CaseError(f"{volume}: cannot read this HDF5 file (corrupt or not HDF5: {e})")
    if image.ndim != 3:
        raise CaseError(f"{volume}: expected a 3D volume (slices, rows, columns), found shape {image.shape}")
    label = integer_labels(label, Path(volume), range(9))
    write_array_image(image.astype(np.float32), Path(out_image))
    write_array_image(remap(label, mapping), Path(out_label))
    return CaseResult()


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------

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
        ConversionError: on any problem with the input, the options or the output location.

    Example:
        >>> convert_synapse("/data/Abdomen/RawData", 111)  # doctest: +SKIP
    """
    root = require_input_folder(input_folder)
    layout, src = detect_layout(root)
    if labels is None:
        labels = 13 if protocol == "all" else 8
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
    order = parse_label_order(label_order) if layout == "transunet" else None

    out_labels, mapping = label_table(labels)
    warnings: list[str] = []
    tasks = []
    if layout == "raw":
        pairs, tests, warnings = scan_raw(src, protocol)
        train_ids = sorted(SYNAPSE_TRANSUNET_TRAIN) if protocol == "transunet" else sorted(pairs)
        test_ids = sorted(SYNAPSE_TRANSUNET_TEST) if protocol == "transunet" else sorted(tests)
    else:
        slices, vols = scan_transunet(src)
        train_ids, test_ids = sorted(slices), sorted(vols)
        # value v in the files is organ order[v-1]; output values follow EIGHT_ORGANS.
        mapping = {i + 1: out_labels[name] for i, name in enumerate(order)}

    out = DatasetOutput(dataset_id, "Synapse", overwrite, root, with_split=True)
    splits = crossval_split([case_name(n) for n in train_ids])
    out.check_split(splits)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    with out as staging:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (staging / sub).mkdir()
        allowed = sorted(RAW_LABELS.values()) + [0]
        for n in train_ids + test_ids:
            is_train = n in train_ids
            img_out = staging / ("imagesTr" if is_train else "imagesTs") / f"{case_name(n)}_0000{FILE_ENDING}"
            lbl_out = staging / ("labelsTr" if is_train else "labelsTs") / f"{case_name(n)}{FILE_ENDING}"
            if layout == "raw":
                image, label = pairs[n] if n in pairs else (tests[n], None)
                tasks.append((convert_nifti_case, dict(image=str(image), label=str(label) if label else None,
                                                       out_image=str(img_out),
                                                       out_label=str(lbl_out) if label else None,
                                                       allowed=allowed, mapping=mapping)))
            elif is_train:
                tasks.append((convert_transunet_train_case, dict(slices=[str(s) for s in slices[n]],
                                                                 out_image=str(img_out), out_label=str(lbl_out),
                                                                 mapping=mapping)))
            else:
                tasks.append((convert_transunet_test_case, dict(volume=str(vols[n]), out_image=str(img_out),
                                                                out_label=str(lbl_out), mapping=mapping)))
        report(run_cases(tasks, num_processes, "convert-synapse"))
        for sub in ("imagesTs", "labelsTs"):
            if not any((staging / sub).iterdir()):
                (staging / sub).rmdir()

        if layout == "raw":
            channel = "CT"
            source = "raw Synapse release (HU, copied unchanged)"
        else:
            channel = "noNorm"
            source = ("TransUNet preprocessed release (HU clipped to [-125, 275] and scaled to [0, 1] by "
                      "TransUNet; channel 'noNorm' so nnU-Net does not normalise again; spacing unknown, "
                      "written as 1x1x1)")
        protocol_text = {
            "transunet": "TransUNet protocol: 18 training cases (imagesTr, nnU-Net default 5-fold CV in "
                         "splits_final.json), 12 test cases in imagesTs/labelsTs",
            "all": "all 30 labelled cases in imagesTr (nnU-Net default 5-fold CV), 20 unlabelled in imagesTs",
        }[protocol]
        write_dataset_json(
            staging, channel, out_labels, len(train_ids),
            dataset_name=out.name,
            reference="Multi-Atlas Abdomen Labeling Challenge (BTCV), MICCAI 2015; Synapse syn3193805",
            license="see the BTCV data use terms on Synapse (syn3193805)",
            description=f"{protocol_text}; {labels} labels; source: {source}",
            converted_by="nnunetv2_fias convert-synapse",
            fias_conversion={
                "protocol": protocol, "labels": labels, "source": layout,
                "label_order_in_source": list(order) if order else None,
                "source_value_to_label": {str(k): v for k, v in sorted(mapping.items())},
                "test_cases": [case_name(n) for n in test_ids],
                "test_has_labels": layout == "transunet" or protocol == "transunet",
            })
        notes = out.commit(splits)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"Wrote {out.target}: {len(train_ids)} training cases, {len(test_ids)} test cases, labels "
          f"{describe_values(list(out_labels.values()))}, channel {channel}; split: {out.split_file}")
    return out.target


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
        epilog="""protocols:
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

""" + EXIT_CODES)
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
