"""``nnunetv2_fias benchmark --predict``: what a user waits for at inference, per whole case.

Times nnU-Net's own predictor (``nnUNetPredictor.predict_single_npy_array``: preprocessing, sliding window with
Gaussian weighting, mirroring when asked (along every axis, nnU-Net's default, also for folds trained without
mirroring), resampling back) on the same cases for trained model folders of several
trainers on one plan, interleaved case by case so that a busy machine slows all alike. Reading and writing files is
left out (the same for every network). Untrained or briefly trained folds time the same as fully trained ones.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from nnunetv2_fias.benchmark.models import BenchmarkError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("whole-case prediction (--predict)")
    group.add_argument("--predict", action="store_true", help="time nnUNetv2_predict's predictor per case for the "
                       "trained folds of -d/-c/-tr instead of single steps")
    group.add_argument("-d", "--dataset", help="dataset id or name (with --predict)")
    group.add_argument("-tr", "--trainers", nargs="+", help="trainers whose fold is timed; the last is the baseline "
                       "of the ratios (with --predict)")
    group.add_argument("-p", "--plans-name", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    group.add_argument("-f", "--fold", default="0", help="fold to load (default: 0)")
    group.add_argument("-i", "--images", type=Path, help="folder of images (default: imagesTs of the raw dataset)")
    group.add_argument("--cases", type=int, default=4, help="cases timed (default: 4)")


def _model_folder(dataset: str, trainer: str, plans: str, configuration: str, fold: str) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise BenchmarkError(f"-d {dataset}: {e}") from None
    folder = Path(get_output_folder(name, trainer, plans, configuration))
    if not (folder / f"fold_{fold}" / "checkpoint_final.pth").is_file():
        raise BenchmarkError(f"-tr {trainer}: no {folder / f'fold_{fold}' / 'checkpoint_final.pth'}; train the fold "
                             "first (any budget: timing does not depend on the weights)")
    return folder


def _cases(images: Path, file_ending: str, count: int) -> list[list[str]]:
    """The image files (all channels) of the first ``count`` cases in ``images``, by nnU-Net's own lookup."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    cases = create_lists_from_splitted_dataset_folder(str(images), file_ending, num_processes=1) \
        if images.is_dir() else []
    if not cases:
        raise BenchmarkError(f"-i {images}: no images named *_0000{file_ending}")
    return cases[:count]


def run_predict(args, device: str, threads: int | None, repeats: int, log) -> dict:
    """Per trainer and mirroring setting, the mean over cases of the median whole-case prediction time."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_raw

    if not args.dataset or not args.trainers:
        raise BenchmarkError("--predict needs -d DATASET and -tr TRAINER [TRAINER ...] (the last is the baseline)")
    if threads:
        torch.set_num_threads(threads)
    folders = [_model_folder(args.dataset, tr, args.plans_name, args.configuration, args.fold) for tr in args.trainers]
    predictors = {}
    for trainer, folder in zip(args.trainers, folders):
        for mirroring in (True, False):
            predictor = nnUNetPredictor(use_mirroring=mirroring, device=torch.device(device), allow_tqdm=False,
                                        perform_everything_on_device=device.startswith("cuda"))
            predictor.initialize_from_trained_model_folder(str(folder), (args.fold,))
            if mirroring and not predictor.allowed_mirroring_axes:
                # A fold trained without mirroring (the demo budgets): time nnU-Net's default, every axis.
                predictor.allowed_mirroring_axes = tuple(range(len(predictor.configuration_manager.patch_size)))
            predictors[trainer, mirroring] = predictor
    first = predictors[args.trainers[0], True]
    images = args.images or Path(nnUNet_raw) / folders[0].parent.name / "imagesTs"
    cases = _cases(images, first.dataset_json["file_ending"], args.cases)
    reader = first.plans_manager.image_reader_writer_class()
    loaded = [reader.read_images(files) for files in cases]
    times = {key: [[] for _ in loaded] for key in predictors}
    for r in range(repeats + 1):  # the first round warms up
        for c, (image, properties) in enumerate(loaded):
            for key, predictor in predictors.items():
                t0 = time.perf_counter()
                predictor.predict_single_npy_array(image, properties)
                if r:
                    times[key][c].append(time.perf_counter() - t0)
        log(f"round {r + 1} of {repeats + 1} done")
    rows = []
    baseline = {m: statistics.fmean(statistics.median(t) for t in times[args.trainers[-1], m]) for m in (True, False)}
    for (trainer, mirroring), per_case in times.items():
        seconds = statistics.fmean(statistics.median(t) for t in per_case)
        rows.append({"trainer": trainer, "mirroring": mirroring, "seconds_per_case": seconds,
                     "ratio": seconds / baseline[mirroring]})
    shape = [list(image.shape[1:]) for image, _ in loaded]
    return {"dataset": folders[0].parent.name, "configuration": args.configuration, "fold": args.fold,
            "device": device, "threads": torch.get_num_threads(), "repeats": repeats, "case_shapes": shape,
            "baseline": args.trainers[-1], "results": rows, "skipped": []}


def format_predict(report: dict) -> str:
    lines = [f"{report['dataset']} {report['configuration']} fold {report['fold']}, {report['device']}, "
             f"{report['threads']} threads, {len(report['case_shapes'])} cases {report['case_shapes']}, median of "
             f"{report['repeats']} per case", "",
             "| trainer | mirroring | s per case | x " + report["baseline"] + " |", "|---|---|---:|---:|"]
    for row in sorted(report["results"], key=lambda r: (not r["mirroring"], r["trainer"])):
        lines.append(f"| {row['trainer']} | {'on' if row['mirroring'] else 'off'} | {row['seconds_per_case']:.3f} | "
                     f"{row['ratio']:.2f} |")
    return "\n".join(lines)
