"""`nnunetv2_fias benchmark`: the plumbing (baseline architecture, plans, workers, JSON, errors) and the activation
memory count, not the timings."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nnunetv2_fias import benchmark
from nnunetv2_fias.architectures import FIAS, fias_size_from_plan
from nnunetv2_fias.architectures.checkpointing import checkpointed

# The 2d configuration nnU-Net's default ExperimentPlanner wrote for a dataset with 96x96 slices (nnunetv2 2.8.1).
PLANNER_96 = {
    "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 512], "conv_op": "torch.nn.modules.conv.Conv2d",
    "kernel_sizes": [[3, 3]] * 5, "strides": [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]],
    "n_conv_per_stage": [2, 2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2, 2], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


@pytest.fixture(autouse=True)
def _nnunet_env(tmp_path, monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("nnUNet_compile", "f")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")


def write_plans(folder, patch=(32, 32), batch=3, with_dataset_json=True):
    """A plans file as nnU-Net writes it (only the keys the benchmark reads), plus a dataset.json beside it."""
    arch = benchmark.default_nnunet_architecture(patch)
    arch["arch_kwargs"]["features_per_stage"] = [8 * 2 ** i for i in range(arch["arch_kwargs"]["n_stages"])]
    plans = {"dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans", "configurations": {
        "2d": {"data_identifier": "nnUNetPlans_2d", "batch_size": batch, "patch_size": list(patch),
               "architecture": arch},
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [16, 32, 32],
                       "architecture": arch},
    }}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    if with_dataset_json:
        (folder / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
            "numTraining": 1, "file_ending": ".nii.gz"}))
    return folder / "nnUNetPlans.json", arch


def test_default_unet_is_what_nnunets_planner_builds():
    arch = benchmark.default_nnunet_architecture([96, 96])
    assert arch["network_class_name"] == benchmark.NNUNET_ARCH_CLASS
    assert arch["arch_kwargs"] == PLANNER_96
    # Larger patches get more stages, features capped at 512 as in nnU-Net's 2D plans.
    big = benchmark.default_nnunet_architecture([512, 512])["arch_kwargs"]
    assert big["n_stages"] == 8 and big["features_per_stage"][-1] == 512


def test_patch_nnunet_would_pad_is_rejected_with_the_padded_size():
    with pytest.raises(benchmark.BenchmarkError, match=r"would use 112 112"):
        benchmark.default_nnunet_architecture([100, 100])


@pytest.mark.parametrize("kind", ["nnunet", "fias"])
def test_deep_supervision_targets_match_the_model_outputs(kind):
    patch = (64, 96)
    spec = dict(kind=kind, preset="T", channels=2, classes=3, patch=list(patch),
                arch=benchmark.default_nnunet_architecture(patch))
    if kind == "fias":  # keep the CPU cost down; the output topology does not depend on the widths
        model = FIAS(2, 3, deep_supervision=True, widths=(12, 24, 48, 96), global_depths=(1, 1, 1, 1),
                     local_depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3))
    else:
        model = benchmark.build_model(spec)
    with torch.no_grad():
        outs = model(torch.randn(1, 2, *patch))
    sizes = benchmark.output_sizes(model, spec)
    assert [tuple(o.shape[2:]) for o in outs] == sizes
    weights = benchmark.loss_weights(kind, len(sizes))
    assert sum(weights) == pytest.approx(1.0)
    # nnU-Net zeroes its lowest resolution; FIAS's trainer keeps every head in the loss.
    assert (weights[-1] == 0) == (kind == "nnunet")


def rows_arch(patch) -> dict:
    return benchmark.default_nnunet_architecture(patch)["arch_kwargs"]


def test_skip_timing_counts_params_and_flops_per_patch(tmp_path):
    out = tmp_path / "sizes.json"
    rc = benchmark.main(["--skip-timing", "--patch", "64", "64", "--patch", "32", "64", "--classes", "4",
                         "--preset", "T,FIASTrainer_planSized", "--baselines", "nnunet,swinunetr", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["baseline"] == "nnU-Net"
    rows = {(r["model"], tuple(r["patch"])): r for r in report["results"]}
    assert set(rows) == {(m, p) for m in ("FIAS-T", "FIASTrainer_planSized", "nnU-Net") for p in ((64, 64), (32, 64))}
    # FIAS as FIASTrainer builds it (the preset) and as FIASTrainer_planSized does (narrow heads at 64x64)
    fias = FIAS(1, 4, preset="T")
    assert rows["FIAS-T", (64, 64)]["params"] == sum(p.numel() for p in fias.parameters())
    narrow = FIAS(1, 4, preset="T", **fias_size_from_plan((64, 64), rows_arch((64, 64)))[1])
    assert rows["FIASTrainer_planSized", (64, 64)]["params"] == sum(p.numel() for p in narrow.parameters())
    # FLOPs grow with the patch; the baseline's ratios are 1.
    assert rows["FIAS-T", (64, 64)]["gflops"] > rows["FIAS-T", (32, 64)]["gflops"] > 0
    assert rows["nnU-Net", (64, 64)]["ratio_gflops"] == 1.0
    assert rows["FIAS-T", (64, 64)]["ratio_params"] == pytest.approx(
        rows["FIAS-T", (64, 64)]["params"] / rows["nnU-Net", (64, 64)]["params"])
    if not benchmark.monai_available():
        assert [s["model"] for s in report["skipped"]] == ["SwinUNETR-2D", "SwinUNETR-2D"]


def test_timed_run_from_plans_in_worker_processes(tmp_path):
    plans, arch = write_plans(tmp_path / "pre")
    out = tmp_path / "bench.json"
    rc = benchmark.main(["--plans", str(plans), "-c", "2d", "--device", "cpu", "--threads", "1", "--warmup", "0",
                         "--repeats", "2", "--fwd-bwd", "--breakdown", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    # Patch, batch and the exact U-Net come from the plans, channels and classes from the dataset.json beside them.
    assert report["patch"] == [32, 32] and report["batch"] == 3
    assert report["channels"] == 2 and report["classes"] == 4
    assert report["baseline"] == "nnU-Net" and report["device"].startswith("cpu")
    assert report["torch"] == torch.__version__
    models = {r["model"]: r for r in report["results"]}
    assert list(models) == ["FIAS-T", "nnU-Net"]
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    unet = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  2, 4, deep_supervision=True)
    assert models["nnU-Net"]["params"] == sum(p.numel() for p in unet.parameters())
    for r in models.values():
        for key in ("params", "gflops", "train_step_ms", "infer_ms", "peak_mem_mb", "ratio_train_step",
                    "ratio_peak_mem", "fwd_bwd_ms", "ratio_fwd_bwd", "activation_mb", "ratio_activation"):
            assert r[key] > 0, (r["model"], key)
        assert len(r["train_step_ms_samples"]) == 2 and len(r["infer_ms_samples"]) == 2
        assert r["peak_mem_mb"] >= r["base_mem_mb"] > 0
    assert models["nnU-Net"]["ratio_train_step"] == 1.0 and models["nnU-Net"]["ratio_peak_mem"] == 1.0
    assert models["FIAS-T"]["ratio_train_step"] == pytest.approx(
        models["FIAS-T"]["train_step_ms"] / models["nnU-Net"]["train_step_ms"])
    parts = {(r["model"], r["part"]): r for r in report["breakdown"]}
    assert list(parts) == [("FIAS-T", p) for p in benchmark.FIAS_PARTS] + [("nnU-Net", p) for p in
                                                                           benchmark.UNET_PARTS]
    assert all(len(r["ms_samples"]) == 2 and r["ms"] > 0 for r in parts.values())
    assert parts[("nnU-Net", "whole")]["ratio"] == 1.0
    fias_whole = parts[("FIAS-T", "whole")]
    assert fias_whole["ratio"] == pytest.approx(fias_whole["ms"] / parts[("nnU-Net", "whole")]["ms"])


def test_failing_worker_is_reported_with_its_error():
    spec = dict(kind="fias", preset="T", channels=1, classes=2, patch=[32, 32], batch=1, device="cpu",
                amp=False, threads=1, seed=0)
    spec["kind"] = "no-such-model"
    with pytest.raises(benchmark.BenchmarkError, match=r"(?s)worker exited with code 1.*unknown model kind"):
        benchmark.Worker("broken", spec)


@pytest.mark.parametrize("argv,match", [
    (["--plans", "{tmp}/missing.json"], "missing.json: no such file"),
    (["--plans", "{plans}", "--patch", "64", "64"], "either --plans"),
    (["--plans", "{plans}", "-c", "3d_fullres"], "3D patch"),
    (["--plans", "{plans}", "-c", "3d_lowres"], "no configuration '3d_lowres'"),
    (["--plans", "{tmp}/not_json.json"], "not a readable JSON file"),
    (["--patch", "100", "100"], "would use 112 112"),
    (["--patch", "64", "64", "--patch", "32", "32"], "only supported with --skip-timing"),
    (["--skip-timing", "--breakdown"], "cannot be combined with --skip-timing"),
    (["--preset", "T,XL"], "presets are B, S, T"),
    (["--baselines", "nnunet,unetr"], "unknown unetr"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--patch", "0", "0"], "--patch 0 0: sizes must be >= 1"),
    (["--json", "{tmp}/exists.json"], "exists; pass --force"),
    (["--json", "{tmp}/no_dir/out.json"], "does not exist"),
])
def test_user_errors_exit_1_with_a_message_and_write_nothing(tmp_path, capsys, argv, match):
    plans, _ = write_plans(tmp_path / "pre")
    (tmp_path / "not_json.json").write_text("{nope")
    (tmp_path / "exists.json").write_text("keep")
    argv = [a.format(tmp=tmp_path, plans=plans) for a in argv]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert benchmark.main(argv) == 1
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "exists.json").read_text() == "keep"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_cuda(capsys):
    assert benchmark.main(["--device", "cuda"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_runs_as_a_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "nnunetv2_fias.benchmark", "--preset", "Q"], capture_output=True,
                          text=True, env=dict(os.environ), timeout=120)
    assert proc.returncode == 1 and "--preset 'Q'" in proc.stderr


@pytest.mark.parametrize("argv", [["--patch", "64"], ["--device", "tpu"], ["--no-such-option"]])
def test_usage_errors_exit_2_from_argparse(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv + ["--json", str(tmp_path / "out.json")])
    assert exc.value.code == 2
    assert "usage: nnunetv2_fias benchmark" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_resolve_returns_a_frozen_config_and_leaves_args_alone(tmp_path):
    import dataclasses

    plans, arch = write_plans(tmp_path / "pre")
    args = benchmark.build_parser().parse_args(["--plans", str(plans), "--preset", "T,S", "--device", "cpu"])
    before = dict(vars(args))
    config = benchmark.resolve(args)
    assert vars(args) == before
    assert (config.presets, config.baselines, config.patches) == (("T", "S"), ("nnunet",), ((32, 32),))
    assert (config.batch, config.channels, config.classes, config.repeats) == (3, 2, 4, 7)
    assert config.architecture((32, 32)) == arch
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch = 5


# ----------------------------------------------------------------------------------------- activation memory
class _Chain(torch.nn.Module):
    """x -> Linear(4, 8) -> [Linear(8, 16) -> ReLU -> Linear(16, 8)] -> Linear(8, 3), the bracket optionally
    checkpointed as FIAS checkpoints its blocks (non-reentrant, ``architectures.checkpointing.checkpointed``)."""

    def __init__(self, checkpointed: bool):
        super().__init__()
        self.checkpointed = checkpointed
        self.inp, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x):
        h = self.inp(x)
        if self.checkpointed:
            h = checkpointed(self.block, h)
        else:
            h = self.block(h)
        return self.out(h)


@pytest.mark.parametrize("checkpointed,expected", [
    # fp32, batch 2: x (2x4: 32 B) saved by inp; h1 (2x8: 64 B) by block[0]; the ReLU output (2x16: 128 B) by
    # the ReLU and block[2] (one storage); h2 (2x8: 64 B) by out. Weights are not counted.
    (False, 32 + 64 + 128 + 64),
    # Checkpointed: the block's saves are recomputed in backward, but its input h1 stays alive until then.
    (True, 32 + 64 + 64),
])
def test_saved_activation_bytes_are_exact_on_a_linear_chain(checkpointed, expected):
    from nnunetv2_fias.architectures.measure import saved_activation_bytes, saved_activation_mb

    model = _Chain(checkpointed).eval()
    x = torch.randn(2, 4)
    assert saved_activation_bytes(model, x) == expected
    assert saved_activation_mb(model, x) == expected / 2 ** 20
    assert not model.training  # mode restored


def test_fias_is_built_by_its_trainer_from_the_benchmark_configuration(monkeypatch):
    from nnunetv2_fias.trainers import FIASTrainer_S

    calls = []
    real = FIASTrainer_S.build_network_architecture.__func__

    def spy(cls, plans_manager, configuration_manager, channels, classes, enable_deep_supervision=True):
        calls.append((cls.__name__, configuration_manager, channels, classes, enable_deep_supervision))
        return real(cls, plans_manager, configuration_manager, channels, classes, enable_deep_supervision)

    monkeypatch.setattr(FIASTrainer_S, "build_network_architecture", classmethod(spy))
    arch = benchmark.default_nnunet_architecture([64, 64])
    model = benchmark.build_model(dict(kind="fias", preset="S", channels=2, classes=3, patch=[64, 64], batch=5,
                                       arch=arch))
    (name, cm, channels, classes, ds), = calls
    assert (name, channels, classes, ds) == ("FIASTrainer_S", 2, 3, True)
    assert (cm.patch_size, cm.batch_size, cm.network_arch_init_kwargs) == ([64, 64], 5, arch["arch_kwargs"])
    assert model.decoder.deep_supervision


def test_skip_timing_reports_activation_memory_and_its_ratio(tmp_path, capsys):
    out = tmp_path / "sizes.json"
    assert benchmark.main(["--skip-timing", "--patch", "64", "64", "--batch", "2", "--device", "cpu",
                           "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["activation_batch"] == 2
    rows = {r["model"]: r for r in report["results"]}
    assert set(rows) == {"FIAS-T", "nnU-Net"}
    assert rows["FIAS-T"]["activation_mb"] > 0 and rows["nnU-Net"]["activation_mb"] > 0
    assert rows["nnU-Net"]["ratio_activation"] == 1.0
    ratio = rows["FIAS-T"]["activation_mb"] / rows["nnU-Net"]["activation_mb"]
    assert rows["FIAS-T"]["ratio_activation"] == pytest.approx(ratio)
    # The table printed is the report: an act MB column with the ratio to nnU-Net's U-Net.
    table = capsys.readouterr().out
    assert "act MB" in table
    fias_line = next(line for line in table.splitlines() if line.startswith("| FIAS-T "))
    assert f"| {rows['FIAS-T']['activation_mb']:.1f} | {ratio:.2f} |" in fias_line


def test_fias_alone_accepts_a_patch_nnunet_would_pad(tmp_path):
    out = tmp_path / "sizes.json"
    assert benchmark.main(["--skip-timing", "--patch", "40", "40", "--batch", "1", "--baselines", "none",
                           "--device", "cpu", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "FIAS-T" and row["activation_mb"] > 0 and row["ratio_activation"] is None


def _grads(module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_breakdown_parts_backpropagate_through_their_part_only():
    from nnunetv2_fias.benchmark.parts import part_steps

    torch.manual_seed(0)
    model = FIAS(1, 3, deep_supervision=True, checkpoint_stages=(0,))
    enc = model.encoder
    steps = part_steps("fias", model, torch.randn(2, 1, 64, 64))
    assert tuple(steps) == benchmark.FIAS_PARTS
    reached = {}
    for name, run in steps.items():
        run()
        reached[name] = {part: _grads(m) for part, m in
                         [("global", enc.global_branch), ("local", enc.local_branch), ("fusion", enc.fusions),
                          ("decoder", model.decoder)]}
    assert reached["global branch"] == {"global": True, "local": False, "fusion": False, "decoder": False}
    assert reached["local branch"] == {"global": False, "local": True, "fusion": False, "decoder": False}
    assert reached["fusion + decoder"] == {"global": False, "local": False, "fusion": True, "decoder": True}
    assert all(reached[w] == dict.fromkeys(("global", "local", "fusion", "decoder"), True)
               for w in ("whole", "whole, no recomputation"))
    # The checkpointed stages are back after the run without recomputation.
    assert enc.global_branch.checkpoint_stages == enc.local_branch.checkpoint_stages == frozenset({0})


def test_breakdown_splits_nnunets_unet_into_encoder_and_decoder():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunetv2_fias.benchmark.parts import part_steps

    arch = benchmark.default_nnunet_architecture((32, 32))
    unet = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                  3, deep_supervision=True)
    steps = part_steps("nnunet", unet, torch.randn(2, 1, 32, 32))
    assert tuple(steps) == benchmark.UNET_PARTS
    steps["decoder"]()
    assert _grads(unet.decoder) and not _grads(unet.encoder)
    steps["encoder"]()
    assert _grads(unet.encoder)


def test_encoder_output_is_the_fusion_of_its_branches():
    torch.manual_seed(0)
    model = FIAS(1, 3, full_resolution_decoder=True).eval()  # with the stem's skips
    enc, x = model.encoder, torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        fused = enc.fuse(enc.global_branch(x, enc.stem_skips), enc.local_branch(x))
        expected = enc(x)
    assert enc.stem_skips and len(fused) == len(expected) == 6
    assert all(torch.equal(a, b) for a, b in zip(fused, expected))


def test_worker_builds_the_parts_only_when_asked_and_reports_its_peak_on_request():
    spec = dict(kind="nnunet", channels=1, classes=2, patch=[32, 32], batch=1, device="cpu", amp=False, threads=1,
                seed=0, arch=benchmark.default_nnunet_architecture((32, 32)))
    worker = benchmark.Worker("unet", spec)
    try:
        with pytest.raises(benchmark.BenchmarkError, match="unknown command 'part:whole'"):
            worker.request("part:whole")
        assert worker.request("peak")["peak_mem_mb"] >= worker.info["base_mem_mb"] > 0
        assert worker.request("parts") == {"parts": list(benchmark.UNET_PARTS)}
        assert worker.request("part:decoder")["ms"] > 0
        final = worker.request("quit")
        assert final["peak_mem_mb"] > 0 and final["activation_mb"] > 0
    finally:
        worker.close()
