"""End-to-end: FIAS through nnU-Net's own command-line tools on a tiny generated 2D dataset, on the CPU.

plan_and_preprocess -> 5 folds x 2 trainers (tiny-budget FIAS variant and nnUNetTrainer at equal budget, --npz;
the session's ``trained_folds``) -> find_best_configuration -> predict (each model, with probabilities) -> ensemble
-> postprocessing -> export to zip -> install into a fresh results folder -> predict_from_modelfolder; then --c and
--val. Asserts on artifacts, shapes and label sets, never on accuracy.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_env import (DATASET_ID, DATASET_NAME, E2E_TRAINERS, IMAGE_SIZE, LABELS, NUM_TEST, NUM_TRAIN, TINY_EPOCHS,
                        copy_results, run_tool)

FIAS_TR, BASE_TR = E2E_TRAINERS
FOLDS = [0, 1, 2, 3, 4]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.timeout(900)


def _model_dir(results: Path, trainer: str) -> Path:
    return results / DATASET_NAME / f"{trainer}__nnUNetPlans__2d"


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _assert_segmentations(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        seg = _read(folder / f"{name}.nii.gz")
        assert seg.shape == (1, IMAGE_SIZE, IMAGE_SIZE), (name, seg.shape)
        assert set(np.unique(seg)) <= set(LABELS.values()), (name, np.unique(seg))
        out[name] = seg
    return out


@pytest.fixture(scope="module")
def pipeline(trained_folds, tmp_path_factory):
    """The five trained folds of both trainers, a working folder and the timings of the commands run here."""
    timings: dict = {}
    yield dict(trained_folds, work=tmp_path_factory.mktemp("e2e"), timings=timings,
               raw_ts=trained_folds["root"] / "raw" / DATASET_NAME / "imagesTs")
    print("\ne2e timings (s):", json.dumps(timings))


@pytest.fixture(scope="module")
def predictions(pipeline) -> dict[str, Path]:
    """``nnUNetv2_predict`` of the test images with each trainer's five folds, with probabilities."""
    preds = {trainer: pipeline["work"] / f"pred_{trainer}" for trainer in (FIAS_TR, BASE_TR)}

    def predict(trainer: str) -> None:
        run_tool("nnUNetv2_predict", ["-i", pipeline["raw_ts"], "-o", preds[trainer], "-d", DATASET_ID, "-c", "2d",
                                      "-tr", trainer, "-f", *FOLDS, "-device", "cpu", "--save_probabilities",
                                      "-npp", "1", "-nps", "1", "--disable_progress_bar"], pipeline["env"],
                 pipeline["timings"])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(predict, preds))
    return preds


def test_five_folds_leave_nnunet_artifacts_and_caf_balance(pipeline):
    for trainer in (FIAS_TR, BASE_TR):
        model = _model_dir(pipeline["results"], trainer)
        for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            assert (model / name).is_file()
        for fold in FOLDS:
            fd = model / f"fold_{fold}"
            for name in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "validation/summary.json"):
                assert (fd / name).is_file(), fd / name
            assert not (fd / "checkpoint_latest.pth").exists()
            # --npz: probabilities of every validation case, which find_best_configuration's ensembling needs
            val_cases = sorted(p.name[:-4] for p in (fd / "validation").glob("*.npz"))
            assert val_cases == sorted(p.name[:-7] for p in (fd / "validation").glob("*.nii.gz"))
            assert len(val_cases) == NUM_TRAIN // len(FOLDS)
    for fold in FOLDS:
        fd = _model_dir(pipeline["results"], FIAS_TR) / f"fold_{fold}"
        ckpt = torch.load(fd / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert ckpt["trainer_name"] == FIAS_TR
        assert ckpt["current_epoch"] == TINY_EPOCHS
        caf = json.loads((fd / "caf_balance.json").read_text())
        assert caf["epochs"] == list(range(TINY_EPOCHS))
        weights = np.asarray(caf["global_weight"])
        assert weights.shape == (TINY_EPOCHS, 4)
        assert np.all((weights > 0) & (weights < 1))
        assert (fd / "caf_balance.png").read_bytes()[:8] == PNG_MAGIC
        log = "\n".join(p.read_text() for p in fd.glob("training_log_*.txt"))
        assert "FIAS preset T" in log and "GFLOPs" in log and "AdamW" in log
        assert log.count("CAF global-branch weight") == TINY_EPOCHS


def test_find_best_predict_ensemble_postprocess(pipeline, predictions):
    env, results, work = pipeline["env"], pipeline["results"], pipeline["work"]
    run_tool("nnUNetv2_find_best_configuration",
             [DATASET_ID, "-c", "2d", "-tr", FIAS_TR, BASE_TR, "-np", "1"], env, pipeline["timings"])
    info = json.loads((results / DATASET_NAME / "inference_information.json").read_text())
    assert set(info["all_results"]) >= {f"{tr}__nnUNetPlans__2d" for tr in (FIAS_TR, BASE_TR)}
    assert any(k.startswith("ensemble___") for k in info["all_results"])
    chosen = info["best_model_or_ensemble"]["selected_model_or_models"]
    assert {m["trainer"] for m in chosen} <= {FIAS_TR, BASE_TR} and all(m["configuration"] == "2d" for m in chosen)

    names = [f"test_{i:03d}" for i in range(NUM_TEST)]
    preds = predictions
    for trainer, out in preds.items():
        _assert_segmentations(out, names)
        for name in names:
            probs = np.load(out / f"{name}.npz")["probabilities"]
            assert probs.shape == (len(LABELS), 1, IMAGE_SIZE, IMAGE_SIZE)
            np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)

    ensemble = work / "pred_ensemble"
    run_tool("nnUNetv2_ensemble", ["-i", preds[FIAS_TR], preds[BASE_TR], "-o", ensemble, "-np", "1"], env,
             pipeline["timings"])
    _assert_segmentations(ensemble, names)

    # The chosen model (single or ensemble) and its postprocessing, as inference_instructions.txt prescribes.
    chosen_dir = ensemble if len(chosen) > 1 else preds[chosen[0]["trainer"]]
    best = info["best_model_or_ensemble"]
    pp = work / "pred_chosen_pp"
    run_tool("nnUNetv2_apply_postprocessing", ["-i", chosen_dir, "-o", pp, "-pp_pkl_file", best["postprocessing_file"],
                                               "-np", "1", "-plans_json", best["some_plans_file"]], env,
             pipeline["timings"])
    _assert_segmentations(pp, names)


def test_export_install_and_predict_from_modelfolder(pipeline, predictions):
    env, work = pipeline["env"], pipeline["work"]
    names = [f"test_{i:03d}" for i in range(NUM_TEST)]
    zip_file = work / "fias_model.zip"
    run_tool("nnUNetv2_export_model_to_zip", ["-d", DATASET_ID, "-o", zip_file, "-c", "2d", "-tr", FIAS_TR], env,
             pipeline["timings"])
    assert zip_file.is_file()

    fresh = work / "fresh_results"
    fresh.mkdir()
    install_env = dict(env, nnUNet_results=str(fresh))
    run_tool("nnUNetv2_install_pretrained_model_from_zip", [zip_file], install_env, pipeline["timings"])
    model = _model_dir(fresh, FIAS_TR)
    assert all((model / f"fold_{f}" / "checkpoint_final.pth").is_file() for f in FOLDS)

    out = work / "pred_from_zip"
    run_tool("nnUNetv2_predict_from_modelfolder", ["-i", pipeline["raw_ts"], "-o", out, "-m", model, "-f", *FOLDS,
                                                   "-device", "cpu", "-npp", "1", "-nps", "1",
                                                   "--disable_progress_bar"], install_env, pipeline["timings"])
    from_zip = _assert_segmentations(out, names)
    # Same weights, same input: the installed model must predict exactly what the trained one does.
    for name in names:
        np.testing.assert_array_equal(from_zip[name], _read(predictions[FIAS_TR] / f"{name}.nii.gz"))


def test_checkpoint_reloads_into_network_rebuilt_from_results_folder(pipeline):
    """Save a checkpoint in-process and reload it the way inference does: identical outputs."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args
    from batchgenerators.utilities.file_and_folder_operations import save_json

    results = pipeline["work"] / "roundtrip_results"
    env_keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile")
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update({k: pipeline["env"][k] for k in env_keys})
    os.environ["nnUNet_results"] = str(results)
    try:
        torch.manual_seed(0)
        trainer = get_trainer_from_args(str(DATASET_ID), "2d", 0, FIAS_TR, device=torch.device("cpu"))
        trainer.initialize()
        net = trainer.network
        # One optimisation step on a synthetic batch, so weights and BatchNorm statistics differ from the init.
        patch = trainer.configuration_manager.patch_size
        data = torch.randn(2, 1, *patch)
        targets = [torch.randint(0, len(LABELS), (2, 1, *[round(p * s) for p, s in zip(patch, sc)])).float()
                   for sc in trainer._get_deep_supervision_scales()]
        trainer.train_step({"data": data, "target": targets})
        trainer.set_deep_supervision_enabled(False)
        net.eval()
        x = torch.randn(1, 1, *patch)
        with torch.no_grad():
            before = net(x)
        trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
        save_json(trainer.plans_manager.plans, os.path.join(trainer.output_folder_base, "plans.json"))
        save_json(trainer.dataset_json, os.path.join(trainer.output_folder_base, "dataset.json"))

        predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(trainer.output_folder_base, use_folds=(0,))
        rebuilt = predictor.network
        assert type(rebuilt) is type(net) and rebuilt is not net
        rebuilt.eval()
        with torch.no_grad():
            after = rebuilt(x)
        assert torch.equal(before, after)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_validation_only_and_continue(pipeline, tmp_path):
    """--val on one fold (validation redone, checkpoint untouched) and --c on another after raising the epoch
    budget (training resumes at the saved epoch, CAF history included); independent, so run side by side. On a copy
    of the trained folds, which the other tests read as trained."""
    pipeline = copy_results(pipeline, tmp_path / "results")
    model = _model_dir(pipeline["results"], FIAS_TR)
    val_fold, cont_fold = model / "fold_1", model / "fold_2"
    ckpt_before = _sha(val_fold / "checkpoint_final.pth")
    summary = val_fold / "validation" / "summary.json"
    summary.unlink()
    jobs = [
        ([DATASET_ID, "2d", 1, "-tr", FIAS_TR, "-device", "cpu", "--val", "--npz"], pipeline["train_env"]),
        ([DATASET_ID, "2d", 2, "-tr", FIAS_TR, "-device", "cpu", "--c", "--npz"],
         dict(pipeline["train_env"], FIAS_TEST_EPOCHS=str(TINY_EPOCHS + 1))),
    ]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: run_tool("nnUNetv2_train", job[0], job[1], pipeline["timings"]), jobs))

    assert summary.is_file()
    assert _sha(val_fold / "checkpoint_final.pth") == ckpt_before

    ckpt = torch.load(cont_fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == TINY_EPOCHS + 1
    assert len(ckpt["logging"]["train_losses"]) == TINY_EPOCHS + 1
    caf = json.loads((cont_fold / "caf_balance.json").read_text())
    assert caf["epochs"] == list(range(TINY_EPOCHS + 1))
    # Only the new epoch was trained in the continued run.
    newest_log = max(cont_fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    assert newest_log.read_text().count("CAF global-branch weight") == 1


def test_benchmark_predict_times_whole_cases_of_the_trained_folds(pipeline, tmp_path):
    import subprocess

    from nnunet_env import BIN_DIR

    def bench(*argv):
        return subprocess.run([str(BIN_DIR / "nnunetv2_fias"), "benchmark", "--predict", "-d", str(DATASET_ID),
                               "-c", "2d", "--threads", "1", "--device", "cpu", *argv], env=pipeline["env"],
                              capture_output=True, text=True, timeout=600)

    out = tmp_path / "predict.json"
    proc = bench("-tr", FIAS_TR, BASE_TR, "--cases", "2", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["baseline"] == BASE_TR and len(report["case_shapes"]) == 2
    rows = {(r["trainer"], r["mirroring"]): r for r in report["results"]}
    assert set(rows) == {(tr, m) for tr in (FIAS_TR, BASE_TR) for m in (True, False)}
    for (trainer, mirroring), row in rows.items():
        assert row["seconds_per_case"] > 0
        assert row["ratio"] == pytest.approx(row["seconds_per_case"] / rows[BASE_TR, mirroring]["seconds_per_case"])
    # 4 mirrorings of a 2D case cost more than one pass
    assert rows[BASE_TR, True]["seconds_per_case"] > rows[BASE_TR, False]["seconds_per_case"]
    missing = bench("-tr", FIAS_TR, "-f", "3", "-p", "NoSuchPlans")
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "NoSuchPlans" in missing.stderr and "checkpoint_final.pth" in missing.stderr
