"""What nnU-Net's CUDA training does to FIAS, checked on the CPU: float16/bfloat16 autocast with a GradScaler,
torch.compile tracing without graph breaks, and a batch size that fits where the plans' own network fits."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nnunet_env import load_plans_and_dataset_json, tiny_fias_overrides
from nnunetv2_fias.architectures import FIAS
from nnunetv2_fias.architectures.attention import dilated_neighborhood_attention
from nnunetv2_fias.trainers import FIASTrainer

pytestmark = pytest.mark.timeout(300)

TINY = dict(widths=(12, 24, 48, 96), global_depths=(1, 1, 1, 1), num_heads=(3, 3, 6, 6), local_depths=(1, 1, 1, 1))
LOW_PRECISION = [torch.float16, torch.bfloat16]


class TinyFIASTrainer(FIASTrainer):
    fias_overrides = tiny_fias_overrides()


@pytest.fixture(scope="module")
def root(tiny_dataset):
    return tiny_dataset


def _construct(root, results, plans=None, cls=TinyFIASTrainer):
    loaded, dataset_json = load_plans_and_dataset_json(root)
    plans = copy.deepcopy(plans or loaded)
    plans["continue_training"] = False
    return cls(plans=plans, configuration="2d", fold=0, dataset_json=dataset_json, device=torch.device("cpu"))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_dilated_attention_forward_and_backward_under_autocast(dtype):
    torch.manual_seed(0)
    shape = (2, 2, 12, 10, 8)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    ref = dilated_neighborhood_attention(q, k, v, 3, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = dilated_neighborhood_attention(*low, 3, 2)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, low, grad.to(dtype))
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert _relative_error(out, ref) < tol
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert _relative_error(g, r) < 2 * tol


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_network_forward_backward_under_cpu_autocast_close_to_float32(dtype):
    torch.manual_seed(0)
    net = FIAS(1, 3, deep_supervision=True, drop_path_rate=0.0, **TINY).train()
    x = torch.randn(2, 1, 48, 64)

    def run(autocast: bool):
        torch.manual_seed(1)  # same Monte Carlo draws
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            outs = net(x)
            loss = sum(o.float().square().mean() for o in outs)
        loss.backward()
        return [o.detach().float() for o in outs], {n: p.grad.clone() for n, p in net.named_parameters()}

    state = copy.deepcopy(net.state_dict())
    ref_outs, ref_grads = run(False)
    net.load_state_dict(state)  # the same BatchNorm statistics for both runs
    outs, grads = run(True)
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    for o, r in zip(outs, ref_outs):
        assert torch.isfinite(o).all() and _relative_error(o, r) < tol
    assert all(torch.isfinite(g).all() for g in grads.values())
    total = _relative_error(torch.cat([g.flatten() for g in grads.values()]),
                            torch.cat([g.flatten() for g in ref_grads.values()]))
    assert total < 4 * tol


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_train_step_with_grad_scaler_under_autocast(root, tmp_path, monkeypatch, dtype):
    """The trainer's GradScaler path (unscale, clip, step, update), as on CUDA, with the CPU's autocast."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    t = _construct(root, tmp_path)
    t.initialize()
    t.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    monkeypatch.setattr(t, "_autocast", lambda: torch.autocast("cpu", dtype=dtype))
    t.on_train_epoch_start()
    patch = t.configuration_manager.patch_size
    before = [p.detach().clone() for p in t.network.parameters()]
    for _ in range(2):
        target = [torch.randint(0, 3, (2, 1, *[round(p * s) for p, s in zip(patch, sc)])).float()
                  for sc in t._get_deep_supervision_scales()]
        out = t.train_step({"data": torch.randn(2, 1, *patch), "target": target})
        assert np.isfinite(out["loss"])
    assert t.grad_scaler.get_scale() > 0
    changed = [not torch.equal(b, p) for b, p in zip(before, t.network.parameters())]
    assert sum(changed) > 0.9 * len(changed)  # the scaler stepped the optimizer
    assert all(torch.isfinite(p).all() for p in t.network.parameters())


# ------------------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("mode", ["train-DS", "train-noDS", "eval"])
def test_dynamo_finds_no_graph_break(mode):
    torch._dynamo.reset()
    net = FIAS(1, 3, deep_supervision=mode == "train-DS", **TINY)
    net.train(mode != "eval")
    x = torch.randn(2, 1, 40, 56)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ------------------------------------------------------------------------------------------------ batch size
def _plans_with_a_tiny_unet(root, tmp_path, monkeypatch, batch_size: int) -> dict:
    """The tiny dataset's plans with a larger batch and a U-Net far smaller than FIAS (1 feature per stage)."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    plans, _ = load_plans_and_dataset_json(root)
    config = plans["configurations"]["2d"]
    config["batch_size"] = batch_size
    arch = config["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [1] * len(arch["features_per_stage"])
    return plans


def test_planned_batch_is_kept_where_fias_activations_are_small(root, tmp_path, monkeypatch):
    """A plan whose batch nnU-Net capped for a small dataset leaves memory to spare: no lowering under the floor."""
    t = _construct(root, tmp_path, _plans_with_a_tiny_unet(root, tmp_path, monkeypatch, batch_size=48))
    t.initialize()
    assert t.batch_size == 48
    assert "stay under 2048 MB" in open(t.log_file).read()


def test_planned_batch_is_kept_where_fias_needs_less_than_the_plans_network(root, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    t = _construct(root, tmp_path)
    planned = t.configuration_manager.batch_size
    t.initialize()
    assert t.batch_size == planned
    log = open(t.log_file).read()
    assert "FIAS replaces the plans' network (PlainConvUNet)" in log and f"Batch size {planned} as planned" in log


def test_batch_is_lowered_where_the_plans_network_is_smaller(root, tmp_path, monkeypatch):
    """Planners such as nnUNetPlannerResEncL size large batches for their own network; FIAS must fit there too."""
    t = _construct(root, tmp_path, _plans_with_a_tiny_unet(root, tmp_path, monkeypatch, batch_size=48))
    t.min_activation_budget_mb = 0.0  # tiny test patches: no floor
    t.initialize()
    assert 1 <= t.batch_size < 48
    log = open(t.log_file).read()
    assert f"Batch size lowered from the planned 48 to {t.batch_size}" in log
    # The plans that go to the results folder (and inference) keep the planned batch size.
    assert t.plans_manager.plans["configurations"]["2d"]["batch_size"] == 48
