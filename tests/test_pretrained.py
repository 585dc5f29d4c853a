"""ImageNet DilateFormer weights into FIAS: synthetic checkpoints in the official layout (keys and shapes as the
official DilateFormer-T/S/B produce them, random values), exact values after loading, input-channel folding, the
report, the errors, and the trainer variants that read the file from nnUNet_FIAS_pretrained.
"""
from __future__ import annotations

import argparse
import copy
import fractions
import math
import re

import pytest
import torch
import torch.nn.functional as F

from nnunet_env import DATASET_NAME, load_plans_and_dataset_json, tiny_fias_overrides
from nnunetv2_fias.architectures import FIAS, LoadReport, load_dilateformer_weights
from nnunetv2_fias.trainers import FIASTrainer_ImageNet, FIASTrainer_ImageNet_B, FIASTrainer_ImageNet_S

pytestmark = pytest.mark.timeout(300)

OFFICIAL = {"T": (72, (2, 2, 6, 2)), "S": (72, (3, 5, 8, 3)), "B": (96, (4, 8, 10, 3))}
TINY = tiny_fias_overrides()  # widths 12..96, one block per stage: a DilateFormer with embed 12, depths 1,1,1,1
ENV = "nnUNet_FIAS_pretrained"
ASIDE = ("patch_embed.proj.0.weight", "norm.weight", "norm.bias", "head.weight", "head.bias")


def official_state_dict(embed: int, depths, seed: int = 0, classes: int = 1000) -> dict[str, torch.Tensor]:
    """Keys and shapes of the official DilateFormer (overlapping 16/32/64 stem, dilate attention with a 1x1-conv qkv
    in stages 1-2, global attention with a Linear qkv in stages 3-4, conv3_2 merging, final norm, classifier)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def add(key, *shape):
        sd[key] = torch.randn(*shape, generator=g)

    def batchnorm(prefix, c):
        for name in ("weight", "bias", "running_mean"):
            add(f"{prefix}.{name}", c)
        sd[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(12345)

    for i, (cin, cout) in zip((0, 3, 6), ((3, 16), (16, 32), (32, 64))):
        add(f"patch_embed.proj.{i}.weight", cout, cin, 3, 3)
        batchnorm(f"patch_embed.proj.{i + 1}", cout)
    add("patch_embed.proj.9.weight", embed, 64, 3, 3)
    for s, depth in enumerate(depths):
        c = embed * 2 ** s
        for j in range(depth):
            p = f"stages.{s}.blocks.{j}."
            add(p + "pos_embed.weight", c, 1, 3, 3)
            add(p + "pos_embed.bias", c)
            for norm in ("norm1", "norm2"):
                add(p + f"{norm}.weight", c)
                add(p + f"{norm}.bias", c)
            add(p + "attn.qkv.weight", *((3 * c, c, 1, 1) if s < 2 else (3 * c, c)))
            add(p + "attn.qkv.bias", 3 * c)
            add(p + "attn.proj.weight", c, c)
            add(p + "attn.proj.bias", c)
            add(p + "mlp.fc1.weight", 4 * c, c)
            add(p + "mlp.fc1.bias", 4 * c)
            add(p + "mlp.fc2.weight", c, 4 * c)
            add(p + "mlp.fc2.bias", c)
        if s < 3:
            add(f"stages.{s}.downsample.proj.0.weight", 2 * c, c, 3, 3)
            add(f"stages.{s}.downsample.proj.0.bias", 2 * c)
            batchnorm(f"stages.{s}.downsample.proj.1", 2 * c)
    add("norm.weight", embed * 8)
    add("norm.bias", embed * 8)
    add("head.weight", classes, embed * 8)
    add("head.bias", classes)
    return sd


def expected_in_fias(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where an official tensor must reappear in FIAS (written from the official layout, official -> FIAS)."""
    g = "encoder.global_branch."
    m = re.fullmatch(r"patch_embed\.proj\.(\d)\.(.+)", key)
    if m:
        n = int(m.group(1))
        return {g + ("stem.3." if n == 9 else f"stem.{n // 3}.{n % 3}.") + m.group(2): value}
    m = re.fullmatch(r"stages\.(\d)\.downsample\.proj\.(\d)\.(.+)", key)
    if m:
        return {g + f"downsamples.{int(m.group(1)) + 1}.{m.group(2)}.{m.group(3)}": value}
    m = re.fullmatch(r"stages\.(\d)\.blocks\.(\d+)\.(.+)", key)
    stage, block, rest = int(m.group(1)), m.group(2), m.group(3).replace("pos_embed", "cpe")
    prefix = g + f"stages.{stage}.{block}."
    if rest.startswith("attn.qkv."):
        param = rest.rsplit(".", 1)[1]
        if stage < 2:  # MSDA: the 1x1 conv as a Linear, same channel order
            return {prefix + f"attn.qkv.{param}": value.reshape(value.shape[0], -1) if value.ndim > 1 else value}
        c = value.shape[0] // 3
        return {prefix + f"attn.q.{param}": value[:c], prefix + f"attn.kv.{param}": value[c:]}
    return {prefix + rest: value}


@pytest.fixture(scope="module")
def checkpoints():
    return {size: official_state_dict(*OFFICIAL[size], seed=i) for i, size in enumerate("TSB")}


@pytest.fixture(scope="module")
def tiny_checkpoint():
    return official_state_dict(TINY["widths"][0], TINY["global_depths"], seed=7)


def tiny_fias(in_channels: int = 1) -> FIAS:
    return FIAS(in_channels, 3, **TINY)


def snapshot(net) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_unchanged(net, before) -> None:
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------------------ exact values
@pytest.mark.parametrize("size, container", [("T", "file_model_dict"), ("S", "module_prefix"), ("B", "bare_file")])
def test_official_checkpoint_reappears_with_identical_values(checkpoints, tmp_path, size, container):
    sd = checkpoints[size]
    net = FIAS(1, 4, preset=size)
    if container == "file_model_dict":  # as DeiT-style training scripts save it, argparse.Namespace included
        path = tmp_path / "dilateformer.pth"
        torch.save({"model": sd, "epoch": 299, "args": argparse.Namespace(model="dilateformer_tiny")}, path)
        report = load_dilateformer_weights(net, path)
    elif container == "module_prefix":
        report = load_dilateformer_weights(net, {"model": {"module." + k: v for k, v in sd.items()}})
    else:
        path = tmp_path / "bare.pth"
        torch.save(sd, path)
        report = load_dilateformer_weights(net, str(path))

    state = net.state_dict()
    total = equal = 0
    for key, value in sd.items():
        if key in ASIDE:
            continue
        for fias_key, expected in expected_in_fias(key, value).items():
            total += expected.numel()
            equal += int((state[fias_key] == expected.to(state[fias_key].dtype)).sum())
    assert total > 0.95 * sum(v.numel() for k, v in sd.items() if k not in ("head.weight", "head.bias"))
    assert equal / total >= 0.98
    assert equal == total  # every encoder element, in fact
    # The final norm sits where FIAS's last stage norm is; it is loaded there.
    assert torch.equal(state["encoder.global_branch.norms.3.weight"], sd["norm.weight"])

    assert isinstance(report, LoadReport) and report.checkpoint.size == size
    assert [t.source for t in report.adapted] == ["patch_embed.proj.0.weight"]
    assert sorted(k for k, _ in report.skipped) == ["head.bias", "head.weight"]
    assert all("classifier" in reason for _, reason in report.skipped)
    loaded_sources = {t.source for t in report.loaded}
    assert loaded_sources == set(sd) - {"patch_embed.proj.0.weight", "head.weight", "head.bias"}
    assert report.not_pretrained == tuple(f"encoder.global_branch.norms.{i}.{p}" for i in range(3)
                                          for p in ("weight", "bias"))
    summary = "\n".join(report.summary())
    assert f"DilateFormer-{size}" in summary and "RGB weights summed" in summary


def test_loaded_stem_and_attention_compute_what_dilateformer_computes(checkpoints):
    """Forward passes with the official tensors, written from DilateFormer's formulation, against FIAS's modules."""
    sd = checkpoints["T"]
    net = FIAS(1, 4, preset="T").eval()
    load_dilateformer_weights(net, sd)
    branch = net.encoder.global_branch
    torch.manual_seed(0)

    # Stem: a grey image through FIAS (1 channel) equals the RGB image (x, x, x) through DilateFormer's stem.
    x = torch.randn(2, 1, 32, 32)
    y = x.repeat(1, 3, 1, 1)
    for i, stride in zip((0, 3, 6), (1, 2, 1)):
        y = F.conv2d(y, sd[f"patch_embed.proj.{i}.weight"], stride=stride, padding=1)
        bn = {n: sd[f"patch_embed.proj.{i + 1}.{n}"] for n in ("running_mean", "running_var", "weight", "bias")}
        y = F.gelu(F.batch_norm(y, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0, 1e-5))
    y = F.conv2d(y, sd["patch_embed.proj.9.weight"], stride=2, padding=1)
    with torch.no_grad():  # summed weights round differently than three equal channels: tolerance of the scale
        torch.testing.assert_close(branch.stem(x), y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))

    # Global attention (stage 3): qkv reshaped to (3, heads, head_dim), softmax(q k^T / sqrt(d)) v, proj.
    c, heads = 288, 12
    t = 0.05 * torch.randn(2, 4, 5, c)  # small tokens: unit-variance random weights would saturate the softmax
    p = "stages.2.blocks.1.attn."
    qkv = (t @ sd[p + "qkv.weight"].T + sd[p + "qkv.bias"]).reshape(2, 20, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
    ref = ((attn @ qkv[2]).transpose(1, 2).reshape(2, 4, 5, c)) @ sd[p + "proj.weight"].T + sd[p + "proj.bias"]
    with torch.no_grad():
        torch.testing.assert_close(branch.stages[2][1].attn(t), ref, rtol=1e-4, atol=1e-4)

    # Dilated attention (stage 1): the 1x1-conv qkv split into (q/k/v, dilation group); group i attends with
    # dilation i+1 over zero-padded 3x3 neighbourhoods. FIAS excludes outside keys, so compare inside positions.
    c, heads, size = 72, 3, 12
    t = 0.05 * torch.randn(1, size, size, c)
    p = "stages.0.blocks.0.attn."
    qkv = F.conv2d(t.permute(0, 3, 1, 2), sd[p + "qkv.weight"], sd[p + "qkv.bias"]).reshape(1, 3, 3, c // 3, size,
                                                                                             size)
    outs = []
    for grp, dil in enumerate((1, 2, 3)):
        q, k, v = qkv[:, 0, grp], qkv[:, 1, grp], qkv[:, 2, grp]
        d = c // heads  # one head per dilation group here
        kw = F.unfold(k, 3, dilation=dil, padding=dil).reshape(1, d, 9, size * size)
        vw = F.unfold(v, 3, dilation=dil, padding=dil).reshape(1, d, 9, size * size)
        a = (q.reshape(1, d, 1, size * size) * kw).sum(1, keepdim=True).mul(d ** -0.5).softmax(2)
        outs.append((a * vw).sum(2).reshape(1, d, size, size))
    ref = torch.cat(outs, 1).permute(0, 2, 3, 1) @ sd[p + "proj.weight"].T + sd[p + "proj.bias"]
    with torch.no_grad():
        out = branch.stages[0][0].attn(t)
    torch.testing.assert_close(out[:, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- folding
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_first_convolution_is_folded_to_the_input_channels(tiny_checkpoint, channels):
    rgb = tiny_checkpoint["patch_embed.proj.0.weight"]
    expected = {1: rgb.sum(1, keepdim=True), 2: rgb[:, [0, 1]] * 1.5, 3: rgb,
                4: rgb[:, [0, 1, 2, 0]] * 0.75}[channels]
    net = tiny_fias(channels)
    report = load_dilateformer_weights(net, tiny_checkpoint)
    torch.testing.assert_close(net.encoder.global_branch.stem[0][0].weight.detach(), expected)
    if channels == 3:
        assert report.adapted == () and "patch_embed.proj.0.weight" in {t.source for t in report.loaded}
    else:
        (adapted,) = report.adapted
        assert adapted.target == "encoder.global_branch.stem.0.0.weight"
        assert ("summed" if channels == 1 else f"scaled by 3/{channels}") in adapted.note
    assert report.checkpoint.size is None and "DilateFormer variant" in report.checkpoint.describe()


def test_bare_and_wrapped_state_dicts_load_the_same(tiny_checkpoint, tmp_path):
    torch.save({"model": tiny_checkpoint}, tmp_path / "wrapped.pth")
    torch.save(tiny_checkpoint, tmp_path / "bare.pth")
    nets = [tiny_fias() for _ in range(4)]
    load_dilateformer_weights(nets[0], tmp_path / "wrapped.pth")
    load_dilateformer_weights(nets[1], str(tmp_path / "bare.pth"))
    load_dilateformer_weights(nets[2], {"model": tiny_checkpoint})
    load_dilateformer_weights(nets[3], {"module." + k: v for k, v in tiny_checkpoint.items()})
    states = [n.encoder.global_branch.state_dict() for n in nets]
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])


# ----------------------------------------------------------------------------------------------------- errors
def test_checkpoint_of_another_size_is_refused_naming_both(checkpoints):
    net = FIAS(1, 4, preset="T")
    before = snapshot(net)
    with pytest.raises(ValueError, match=re.escape(
            "checkpoint is DilateFormer-B (embed 96, depths 4,8,10,3) but the network is FIAS-T (embed 72, "
            "depths 2,2,6,2); it fits FIAS preset 'B'")):
        load_dilateformer_weights(net, checkpoints["B"])
    with pytest.raises(ValueError, match=r"DilateFormer-S \(embed 72, depths 3,5,8,3\) but the network is FIAS-T"):
        load_dilateformer_weights(net, checkpoints["S"])
    assert_unchanged(net, before)


def test_a_late_mismatch_leaves_the_network_unchanged(tiny_checkpoint):
    net = tiny_fias()
    before = snapshot(net)
    bad = dict(tiny_checkpoint, **{"norm.weight": torch.randn(5)})  # norms.3 is the last tensor FIAS receives
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \(5,\), which does not fit "
                                         r"encoder.global_branch.norms.3.weight \(96,\)"):
        load_dilateformer_weights(net, bad)
    assert_unchanged(net, before)
    incomplete = {k: v for k, v in tiny_checkpoint.items() if k != "stages.3.blocks.0.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"lacks 'stages.3.blocks.0.mlp.fc2.bias'"):
        load_dilateformer_weights(net, incomplete)
    assert_unchanged(net, before)
    with pytest.raises(ValueError, match="mlp.fc1.weight' has shape"):  # mlp_ratio 2 instead of DilateFormer's 4
        load_dilateformer_weights(FIAS(1, 3, mlp_ratio=2.0, **TINY), tiny_checkpoint)


def test_files_that_are_not_dilateformer_checkpoints(tmp_path, tiny_checkpoint):
    missing = tmp_path / "nowhere" / "dilateformer-tiny.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"DilateFormer checkpoint {missing} does not exist")):
        load_dilateformer_weights(tiny_fias(), missing)
    with pytest.raises(IsADirectoryError, match=re.escape(f"DilateFormer checkpoint {tmp_path} is a folder")):
        load_dilateformer_weights(tiny_fias(), tmp_path)
    pickled = tmp_path / "with_objects.pth"
    torch.save({"model": tiny_checkpoint, "ratio": fractions.Fraction(1, 3)}, pickled)
    with pytest.raises(ValueError, match=r"it holds a fractions.Fraction, which weights-only loading refuses"):
        load_dilateformer_weights(tiny_fias(), pickled)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(f"{text} is not a readable PyTorch checkpoint")):
        load_dilateformer_weights(tiny_fias(), text)
    nnunet = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": tiny_fias().state_dict(), "trainer_name": "FIASTrainer"}, nnunet)
    with pytest.raises(ValueError, match=re.escape(f"{nnunet} is an nnU-Net training checkpoint")) as err:
        load_dilateformer_weights(tiny_fias(), nnunet)
    assert "-pretrained_weights" in str(err.value)
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match="not a DilateFormer checkpoint: it holds a list"):
        load_dilateformer_weights(tiny_fias(), listed)
    with pytest.raises(ValueError, match="needs a FIAS network"):
        load_dilateformer_weights(torch.nn.Linear(2, 2), tiny_checkpoint)


# ---------------------------------------------------------------------------------------------------- trainers
@pytest.fixture(scope="module")
def root(tiny_dataset):
    return tiny_dataset


def _construct(cls, root, results):
    plans, dataset_json = load_plans_and_dataset_json(root)
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    return cls(plans=plans, configuration="2d", fold=0, dataset_json=dataset_json, device=torch.device("cpu"))


def test_trainer_variants_build_their_presets():
    assert [c.fias_preset for c in (FIASTrainer_ImageNet, FIASTrainer_ImageNet_S, FIASTrainer_ImageNet_B)] == \
        ["T", "S", "B"]


def test_trainer_refuses_a_missing_checkpoint_before_writing_anything(root, tmp_path, monkeypatch,
                                                                      tiny_checkpoint):
    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ValueError, match=re.escape(f"export {ENV}=/path/dilateformer-tiny.pth")):
        _construct(FIASTrainer_ImageNet, root, results)
    missing = tmp_path / "missing.pth"
    monkeypatch.setenv(ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{ENV}: DilateFormer checkpoint {missing} does not exist")):
        _construct(FIASTrainer_ImageNet_B, root, results)
    unreadable = tmp_path / "empty.pth"
    unreadable.write_bytes(b"")
    monkeypatch.setenv(ENV, str(unreadable))
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
        _construct(FIASTrainer_ImageNet, root, results)
    small = tmp_path / "variant.pth"
    torch.save({"model": tiny_checkpoint}, small)
    monkeypatch.setenv(ENV, str(small))
    with pytest.raises(ValueError, match=r"checkpoint is a DilateFormer variant \(embed 12, depths 1,1,1,1\) but "
                                         r"the network of FIASTrainer_ImageNet_S is FIAS-S"):
        _construct(FIASTrainer_ImageNet_S, root, results)
    assert not results.exists()


def test_trainer_loads_the_checkpoint_in_initialize_and_logs_the_report(root, tmp_path, monkeypatch,
                                                                       tiny_checkpoint):
    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    path = tmp_path / "variant.pth"
    torch.save({"model": tiny_checkpoint}, path)
    monkeypatch.setenv(ENV, str(path))
    cls = type("TinyImageNetTrainer", (FIASTrainer_ImageNet,), {"fias_overrides": TINY})
    trainer = _construct(cls, root, results)
    path.unlink()  # read in __init__: initialize() does not need the file any more
    trainer.initialize()
    branch = trainer._fias().encoder.global_branch
    qkv = tiny_checkpoint["stages.2.blocks.0.attn.qkv.weight"]
    assert torch.equal(branch.stages[2][0].attn.q.weight.detach(), qkv[:48])
    assert torch.equal(branch.stem[0][0].weight.detach(), tiny_checkpoint["patch_embed.proj.0.weight"].sum(1, True))
    log = open(trainer.log_file).read()
    assert f"from {path}" in log and "RGB weights summed" in log and "head.weight, head.bias" in log
    assert (results / DATASET_NAME).is_dir()
    assert math.isclose(trainer.initial_lr, 3e-4)  # FIASTrainer's schedule, unchanged


# ------------------------------------------------------------------------------- what a new user hit (issue 21)
def _nnunet_training_checkpoint(path, network_weights) -> None:
    """The keys nnUNetTrainer.save_checkpoint writes, with the numpy scalars its logger holds."""
    import numpy as np

    torch.save({"network_weights": network_weights, "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.4)]},
                "_best_ema": np.float64(0.4), "current_epoch": 3,
                "init_args": {"plans": {}, "configuration": "2d", "fold": 0, "dataset_json": {},
                              "device": torch.device("cpu")},
                "trainer_name": "FIASTrainer", "inference_allowed_mirroring_axes": (0, 1)}, path)


def test_random_bytes_are_not_a_checkpoint_and_no_weights_only_advice(tmp_path):
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name, content in (("random.pth", noise), ("random_pickle.pth", b"\x80" + noise)):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable PyTorch checkpoint")) as err:
            load_dilateformer_weights(tiny_fias(), path)
        assert "weights_only" not in str(err.value) and len(str(err.value).splitlines()) == 1


def test_nnunet_checkpoint_gets_the_fine_tuning_hint(tmp_path, root, monkeypatch):
    path = tmp_path / "checkpoint_final.pth"
    _nnunet_training_checkpoint(path, tiny_fias().state_dict())
    with pytest.raises(ValueError, match=re.escape(f"{path} is an nnU-Net training checkpoint")) as err:
        load_dilateformer_weights(tiny_fias(), path)
    assert "-pretrained_weights" in str(err.value) and "checkpoint['model']" not in str(err.value)
    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    monkeypatch.setenv(ENV, str(path))
    with pytest.raises(ValueError, match=r"nnUNet_FIAS_pretrained: .* is an nnU-Net training checkpoint.*"
                                         r"-pretrained_weights"):
        _construct(FIASTrainer_ImageNet, root, results)
    assert not results.exists()


@pytest.mark.parametrize("defect", ["wrong_shape", "missing_key", "wrong_stem_channels"])
def test_trainer_refuses_a_misfitting_checkpoint_before_writing_anything(root, tmp_path, monkeypatch,
                                                                        tiny_checkpoint, defect):
    bad = dict(tiny_checkpoint)
    if defect == "wrong_shape":
        bad["stages.1.blocks.0.mlp.fc1.weight"] = torch.randn(7, 24)
    elif defect == "missing_key":
        del bad["stages.3.blocks.0.mlp.fc2.bias"]
    else:
        bad["patch_embed.proj.0.weight"] = torch.randn(16, 2, 3, 3)
    path = tmp_path / "variant.pth"
    torch.save({"model": bad}, path)
    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    monkeypatch.setenv(ENV, str(path))
    cls = type("TinyImageNetTrainer", (FIASTrainer_ImageNet,), {"fias_overrides": TINY})
    with pytest.raises(ValueError, match=r"TinyImageNetTrainer: nnUNet_FIAS_pretrained=.* does not fit the network"):
        _construct(cls, root, results)
    assert not results.exists()


def _with_3d_configuration(plans: dict) -> dict:
    """The tiny 2D dataset's plans with a 3d_fullres configuration (only its patch decides the network's dimension
    in the check before nnU-Net's constructor)."""
    plans = copy.deepcopy(plans)
    cfg = copy.deepcopy(plans["configurations"]["2d"])
    cfg.update(data_identifier="nnUNetPlans_3d_fullres", patch_size=[4, 64, 64])
    arch = cfg["architecture"]["arch_kwargs"]
    n = arch["n_stages"]
    arch.update(conv_op="torch.nn.modules.conv.Conv3d", norm_op="torch.nn.modules.instancenorm.InstanceNorm3d",
                kernel_sizes=[[1, 3, 3]] * n, strides=[[1, 1, 1]] + [[1, 2, 2]] * (n - 1))
    plans["configurations"]["3d_fullres"] = cfg
    return plans


def test_2d_checkpoint_for_a_3d_configuration_is_one_line_before_anything_is_written(root, tmp_path, monkeypatch):
    from nnunetv2_fias.trainers import FIASTrainer

    path = tmp_path / "checkpoint_final.pth"
    _nnunet_training_checkpoint(path, tiny_fias().state_dict())
    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train", "987", "3d_fullres", "0", "-tr", "FIASTrainer",
                                     "-pretrained_weights", str(path), "-device", "cpu"])
    plans, dataset_json = load_plans_and_dataset_json(root)
    plans = _with_3d_configuration(plans)
    plans["continue_training"] = False
    with pytest.raises(ValueError, match=r"holds a 2D network .* configuration '3d_fullres' builds a 3D FIAS") as err:
        FIASTrainer(plans=plans, configuration="3d_fullres", fold=0, dataset_json=dataset_json,
                    device=torch.device("cpu"))
    assert len(str(err.value).splitlines()) == 1 and len(str(err.value)) < 400
    assert not results.exists()
    # The same checkpoint for the 2d configuration passes this check (nnU-Net then loads it as usual).
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train", "987", "2d", "0", "-pretrained_weights", str(path)])
    plans["continue_training"] = False
    FIASTrainer(plans=plans, configuration="2d", fold=0, dataset_json=dataset_json, device=torch.device("cpu"))
