"""FIASTrainer in-process: contract with nnU-Net, variants, deep supervision, optimizer, CAF logging."""
from __future__ import annotations

import copy
import inspect
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_env import DATASET_NAME, load_plans_and_dataset_json, tiny_fias_overrides
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnunetv2_fias.trainers as trainers
from nnunetv2_fias.trainers import FIASTrainer, WarmupPolyLRScheduler
from nnunetv2_fias.trainers.caf_monitor import CAF_JSON, CAF_PNG
from nnunetv2_fias.trainers.fias_trainer import _AutocastOff

pytestmark = pytest.mark.timeout(300)


class TinyFIASTrainer(FIASTrainer):
    fias_overrides = tiny_fias_overrides()


@pytest.fixture(scope="module")
def root(tiny_dataset):
    return tiny_dataset


@pytest.fixture
def results(tmp_path):
    return tmp_path / "results"


def _with_patch(root, patch_size):
    """Plans whose 2d configuration has another patch size (what nnU-Net plans for other datasets)."""
    plans, dataset_json = load_plans_and_dataset_json(root)
    plans["configurations"]["2d"]["patch_size"] = list(patch_size)
    return plans, dataset_json


def _construct(cls, plans, dataset_json, configuration="2d", device=torch.device("cpu")):
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    return cls(plans=plans, configuration=configuration, fold=0, dataset_json=dataset_json, device=device)


def test_trainers_and_network_import_no_command_package():
    """The trainer and the network stand alone: none of the benchmark, demo or evaluation commands' modules is
    loaded with them (a fresh interpreter: this test session has imported them all)."""
    import subprocess
    import sys

    code = ("import sys, nnunetv2_fias.trainers, nnunetv2_fias.architectures.measure\n"
            "print(sorted(m for m in sys.modules if m.startswith(('nnunetv2_fias.benchmark', 'nnunetv2_fias.demo', "
            "'nnunetv2_fias.evaluation'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_public_trainers_keep_nnunet_signature_and_names():
    names = [c.__name__ for c in trainers.TRAINERS]
    assert names == ["FIASTrainer", "FIASTrainer_5epochs", "FIASTrainer_100epochs", "FIASTrainer_250epochs",
                     "FIASTrainerNoDS", "FIASTrainerNoAMP", "FIASTrainer_S", "FIASTrainer_B",
                     "FIASTrainer_demoBudget", "nnUNetTrainer_demoBudget", "FIASTrainer_smokeBudget",
                     "nnUNetTrainer_smokeBudget", "FIASTrainer_ImageNet", "FIASTrainer_ImageNet_S",
                     "FIASTrainer_ImageNet_B", "FIASTrainer_planSized"]
    def params(fn):  # names, kinds and defaults: nnU-Net records init kwargs by parameter name
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for cls in trainers.TRAINERS:
        assert issubclass(cls, nnUNetTrainer)
        assert params(cls.__init__) == params(nnUNetTrainer.__init__), cls.__name__


def test_variants_change_one_thing_each(root, results, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    plans, dataset_json = load_plans_and_dataset_json(root)
    default = _construct(FIASTrainer, plans, dataset_json)
    assert (default.num_epochs, default.enable_deep_supervision, default.use_amp) == (1000, True, True)
    assert (default.initial_lr, default.weight_decay, default.grad_clip_norm) == (3e-4, 5e-2, 1.0)
    expected = {
        "FIASTrainer_5epochs": {"num_epochs": 5}, "FIASTrainer_100epochs": {"num_epochs": 100},
        "FIASTrainer_250epochs": {"num_epochs": 250}, "FIASTrainerNoDS": {"enable_deep_supervision": False},
        "FIASTrainerNoAMP": {"use_amp": False}, "FIASTrainer_S": {"fias_preset": "S"},
        "FIASTrainer_B": {"fias_preset": "B"}, "FIASTrainer_planSized": {"fias_plan_sized": True,
                                                                  # 64x64: narrow heads, lr x 72/48
                                                                  "initial_lr": FIASTrainer.recipe["initial_lr"] * 1.5},
    }
    watched = ("num_epochs", "enable_deep_supervision", "use_amp", "fias_preset", "fias_plan_sized", "initial_lr",
               "weight_decay",
               "num_iterations_per_epoch", "grad_clip_norm", "warmup_fraction")
    for name, changes in expected.items():
        t = _construct(getattr(trainers, name), plans, dataset_json)
        for attr in watched:
            assert getattr(t, attr) == changes.get(attr, getattr(default, attr)), (name, attr)
        assert t.output_folder_base.endswith(f"{name}__nnUNetPlans__2d")


@pytest.mark.parametrize("name, budget", [("FIASTrainer_demoBudget", (12, 20, 2, 4)),
                                          ("nnUNetTrainer_demoBudget", (12, 20, 2, 4)),
                                          ("FIASTrainer_smokeBudget", (1, 2, 1, 2)),
                                          ("nnUNetTrainer_smokeBudget", (1, 2, 1, 2))])
def test_demo_budgets_set_budget_and_disable_mirroring(root, results, monkeypatch, name, budget):
    monkeypatch.setenv("nnUNet_results", str(results))
    plans, dataset_json = load_plans_and_dataset_json(root)
    t = _construct(getattr(trainers, name), plans, dataset_json)
    t._set_batch_size_and_oversample()
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.batch_size) == budget
    assert t.plans_manager.plans["configurations"]["2d"]["batch_size"] == plans["configurations"]["2d"]["batch_size"]
    *_, mirror_axes = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes is None and t.inference_allowed_mirroring_axes is None
    assert isinstance(t, FIASTrainer) == name.startswith("FIAS")


def test_amp_only_on_cuda_and_not_for_noamp(root, results, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(results))
    plans, dataset_json = load_plans_and_dataset_json(root)
    cuda = torch.device("cuda")  # constructing does not touch the device
    assert _construct(FIASTrainer, plans, dataset_json, device=cuda)._amp_active()
    assert not _construct(trainers.FIASTrainerNoAMP, plans, dataset_json, device=cuda)._amp_active()
    assert not _construct(FIASTrainer, plans, dataset_json)._amp_active()


def test_autocast_off_wrapper_keeps_float32_inside_autocast():
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
        assert _AutocastOff(lin)(x).dtype == torch.float32


def test_rejects_a_configuration_that_is_neither_2d_nor_3d_before_writing_anything(root, results, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(results))
    plans, dataset_json = load_plans_and_dataset_json(root)
    plans["configurations"]["4d"] = {"inherits_from": "2d", "patch_size": [2, 8, 64, 64],
                                     "data_identifier": "nnUNetPlans_4d"}
    with pytest.raises(ValueError, match=r"configuration '4d' has a 4D patch size") as err:
        _construct(FIASTrainer, plans, dataset_json, configuration="4d")
    assert "-c 2d or -c 3d_fullres" in str(err.value)
    assert not (results / DATASET_NAME).exists()
    # Inference builds on the class: the same guard applies there.
    cm = PlansManager(plans).get_configuration("4d")
    with pytest.raises(ValueError, match="4D patch size"):
        FIASTrainer.build_network_architecture(PlansManager(plans), cm, 1, 3, enable_deep_supervision=False)


def test_imagenet_trainer_refuses_3d_before_writing_anything(root, results, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(results))
    plans, dataset_json = load_plans_and_dataset_json(root)
    plans["configurations"]["3d_fullres"] = {"inherits_from": "2d", "patch_size": [8, 64, 64],
                                            "data_identifier": "nnUNetPlans_3d_fullres"}
    with pytest.raises(ValueError, match="ImageNet weights are 2D"):
        _construct(trainers.FIASTrainer_ImageNet, plans, dataset_json, configuration="3d_fullres")
    assert not (results / DATASET_NAME).exists()


def test_class_level_build_loads_training_checkpoint_strictly(root):
    plans, dataset_json = load_plans_and_dataset_json(root)
    pm = PlansManager(plans)
    cm = pm.get_configuration("2d")
    train_net = TinyFIASTrainer.build_network_architecture(pm, cm, 1, 3, True)
    infer_net = TinyFIASTrainer.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    assert train_net.decoder.deep_supervision and not infer_net.decoder.deep_supervision
    infer_net.load_state_dict(train_net.state_dict(), strict=True)
    assert sum(p.numel() for p in train_net.parameters()) < 1e6  # the overrides were applied


@pytest.mark.parametrize("patch", [(64, 64), (40, 96), (48, 20)])
def test_deep_supervision_scales_match_network_outputs(root, results, monkeypatch, patch):
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    plans, dataset_json = _with_patch(root, patch)
    t = _construct(TinyFIASTrainer, plans, dataset_json)
    t.initialize()
    scales = t._get_deep_supervision_scales()
    outputs = t.network(torch.randn(2, 1, *patch))
    assert isinstance(outputs, (list, tuple)) and len(outputs) == len(scales) == 4
    for out, sc in zip(outputs, scales):
        assert tuple(out.shape[2:]) == tuple(round(p * s) for p, s in zip(patch, sc))
    w = np.asarray(t.loss.weight_factors)
    assert len(w) == 4 and np.all(w > 0) and math.isclose(w.sum(), 1.0) and np.all(np.diff(w) < 0)
    # The dataloader's target pyramid (nnU-Net's own transform) fits the outputs exactly.
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    seg = torch.randint(0, 3, (1, *patch)).to(torch.int16)
    targets = DownsampleSegForDSTransform(ds_scales=scales)(image=torch.zeros(1, *patch), segmentation=seg)
    assert [tuple(tg.shape[1:]) for tg in targets["segmentation"]] == [tuple(o.shape[2:]) for o in outputs]


def test_no_deep_supervision_variant_returns_one_output(root, results, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    plans, dataset_json = load_plans_and_dataset_json(root)
    cls = type("TinyNoDS", (trainers.FIASTrainerNoDS,), {"fias_overrides": tiny_fias_overrides()})
    t = _construct(cls, plans, dataset_json)
    t.initialize()
    t.set_deep_supervision_enabled(t.enable_deep_supervision)
    assert t._get_deep_supervision_scales() is None
    out = t.network(torch.randn(2, 1, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 64, 64)


def test_warmup_then_poly_schedule():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupPolyLRScheduler(opt, 3e-4, num_epochs=1000, warmup_epochs=50)
    lrs = [sched.lr_at(e) for e in range(1000)]
    assert np.all(np.diff(lrs[:51]) > 0) and np.all(np.diff(lrs[50:]) < 0)
    assert lrs[50] == pytest.approx(3e-4) and lrs[0] == pytest.approx(3e-4 / 51)
    assert lrs[-1] < 3e-4 * 0.01
    sched.step(70)
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[70])
    with pytest.raises(ValueError):
        WarmupPolyLRScheduler(opt, 1e-3, num_epochs=5, warmup_epochs=5)


def test_optimizer_groups_and_gradient_clipping(root, results, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    plans, dataset_json = load_plans_and_dataset_json(root)
    t = _construct(TinyFIASTrainer, plans, dataset_json)
    t.num_epochs = 5
    t.grad_clip_norm = 0.01
    t.initialize()
    assert isinstance(t.optimizer, torch.optim.AdamW) and t._warmup_epochs() == 1
    decay, no_decay = t.optimizer.param_groups
    assert decay["weight_decay"] == t.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(t.network.parameters()))
    t.on_train_epoch_start()
    patch = t.configuration_manager.patch_size
    target = [torch.randint(0, 3, (2, 1, *[round(p * s) for p, s in zip(patch, sc)])).float()
              for sc in t._get_deep_supervision_scales()]
    out = t.train_step({"data": torch.randn(2, 1, *patch), "target": target})
    assert np.isfinite(out["loss"])
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.network.parameters()
                                                      if p.grad is not None]))
    assert grad_norm <= 0.01 * 1.001
    # The CAF balance of the step was recorded, one weight per stage, strictly between the branches.
    assert len(t._caf_epoch_values) == 1 and np.all((t._caf_epoch_values[0] > 0) & (t._caf_epoch_values[0] < 1))


def test_caf_history_is_saved_and_truncated_on_resume(root, results, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(results))
    plans, dataset_json = load_plans_and_dataset_json(root)
    t = _construct(TinyFIASTrainer, plans, dataset_json)
    for epoch in range(3):
        t.current_epoch = epoch
        t._caf_epoch_values = [np.array([0.4, 0.5, 0.6, float("nan")]), np.array([0.6, 0.5, 0.4, float("nan")])]
        t._record_caf_epoch()
    saved = json.loads((results / DATASET_NAME / "TinyFIASTrainer__nnUNetPlans__2d" / "fold_0" / CAF_JSON)
                       .read_text())
    assert saved["epochs"] == [0, 1, 2]
    assert saved["global_weight"][0] == [pytest.approx(0.5)] * 3 + [None]  # NaN (no forward) is null
    png = t.output_folder + "/" + CAF_PNG
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    t.current_epoch = 2  # resuming from a checkpoint of epoch 2 drops what a crash logged after it
    t._load_caf_history()
    assert sorted(t._caf_history) == [0, 1]
