"""FIAS's training-memory measures and the cases nnU-Net's GPU path meets: activation checkpointing, batch 1 at a
1x1 stage, the official DilateFormer stem, and the heads' names that nnU-Net's fine-tuning relies on."""
import pytest
import torch
from torch import nn

from nnunetv2_fias.architectures import FIAS, SafeBatchNorm2d
from tiny_fias import conv_op, make_tiny, tiny_fias  # noqa: F401 (fixtures)

# Two blocks in stage 2 (global) and stage 1 (local): checkpointing recomputes block after block.
DEEPER = dict(global_depths=(1, 2, 1, 1), local_depths=(2, 1, 1, 1))
TINY = dict(widths=(12, 24, 48, 96), num_heads=(3, 3, 6, 6), **DEEPER)


def tiny(**kwargs):
    return make_tiny(**{**DEEPER, **kwargs})


def _step(net, x, seed=1):
    torch.manual_seed(seed)  # same drop-path and Monte Carlo draws
    net.zero_grad(set_to_none=True)
    outs = net(x)
    sum(o.square().mean() for o in outs).backward()
    return [o.detach() for o in outs]


def test_checkpointing_changes_nothing_but_memory(monkeypatch, tiny_fias):
    import nnunetv2_fias.architectures.checkpointing as checkpointing

    monkeypatch.setattr(checkpointing, "CHECKPOINT_MIN_POSITIONS", 1)  # small test maps: checkpoint them all
    torch.manual_seed(0)
    plain = tiny_fias(checkpoint_stages=(), drop_path_rate=0.2, **DEEPER)
    ckpt = tiny_fias(checkpoint_stages=(0, 1, 2, 3), drop_path_rate=0.2, **DEEPER)
    ckpt.load_state_dict(plain.state_dict())
    plain.train(), ckpt.train()
    x = tiny_fias.input()
    for _ in range(2):
        for a, b in zip(_step(plain, x), _step(ckpt, x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    # The recomputation in backward must not update BatchNorm running statistics a second time.
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    bn = ckpt.encoder.local_branch.stages[0][0].expand[1]
    assert int(bn.num_batches_tracked) == 2


def test_checkpointing_keeps_fewer_tensors_for_backward():
    def saved_bytes(net, x):
        seen = {}
        params = {t.untyped_storage().data_ptr() for t in list(net.parameters()) + list(net.buffers())}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x)
        return sum(seen.values())

    x = torch.randn(1, 1, 128, 128)  # stage 2 at 16x16: the smallest map that is checkpointed
    plain, ckpt = tiny(checkpoint_stages=()).train(), tiny(checkpoint_stages=(0, 1)).train()
    assert saved_bytes(ckpt, x) < 0.8 * saved_bytes(plain, x)
    # Small maps (thin plans) are not checkpointed: their activations are small and recomputing costs more.
    small = torch.randn(1, 1, 16, 72)
    assert saved_bytes(ckpt, small) == saved_bytes(plain, small)
    with torch.no_grad():  # no checkpointing without gradients (inference, validation)
        ckpt(x)


def test_default_is_checkpointing_the_two_fine_stages():
    net = FIAS(1, 2)
    assert net.encoder.global_branch.checkpoint_stages == {0, 1}
    assert net.encoder.local_branch.checkpoint_stages == {0, 1}
    with pytest.raises(ValueError, match="checkpoint_stages"):
        FIAS(1, 2, checkpoint_stages=(4,))


@pytest.mark.parametrize("op, size", [(nn.Conv2d, (32, 32)), (nn.Conv2d, (16, 24)), (nn.Conv2d, (1, 1)),
                                      (nn.Conv3d, (2, 8, 16)), (nn.Conv3d, (1, 1, 1)), (nn.Conv3d, (4, 16, 16))])
def test_batch_one_trains_when_a_stage_is_1x1(op, size):
    net = make_tiny(op, **DEEPER).train()
    outs = net(torch.randn(1, 1, *size))
    sum(o.mean() for o in outs).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_batchnorm_single_value_uses_running_statistics_and_keeps_them():
    bn = SafeBatchNorm2d(4).train()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    x = torch.full((1, 4, 1, 1), 3.0)
    torch.testing.assert_close(bn(x), torch.ones(1, 4, 1, 1), rtol=1e-4, atol=1e-4)
    assert bn.running_mean.eq(1.0).all() and bn.running_var.eq(4.0).all()
    ref = torch.nn.BatchNorm2d(4).train()
    y = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(bn(y), ref(y))  # otherwise plain BatchNorm


def test_official_dilateformer_stem_layout():
    stem = FIAS(3, 2).encoder.global_branch.stem
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.bias is None) for c in convs] == [
        (3, 16, 1, True), (16, 32, 2, True), (32, 64, 1, True), (64, 72, 2, True)]
    assert FIAS(1, 2, stem_width=8).encoder.global_branch.stem[0][0].out_channels == 8


def test_heads_are_seg_layers():
    heads = [k for k in tiny().state_dict() if ".seg_layers." in "." + k]
    # nnU-Net's -pretrained_weights skips exactly the keys containing ".seg_layers.": all head tensors, no others.
    assert sorted(heads) == sorted(f"decoder.seg_layers.{i}.{p}" for i in range(4) for p in ("weight", "bias"))


def test_checkpoint_that_no_longer_fits_names_what_changed():
    from nnunetv2_fias.architectures import CheckpointMismatchError

    full, stage_one = tiny(full_resolution_decoder=True), tiny()
    with pytest.raises(CheckpointMismatchError, match="no full-resolution decoder stages"):
        full.load_state_dict(stage_one.state_dict())
    with pytest.raises(CheckpointMismatchError, match="has full-resolution decoder stages"):
        stage_one.load_state_dict(full.state_dict())
    with pytest.raises(CheckpointMismatchError, match="number of output channels differs .checkpoint 3, network 5"):
        FIAS(1, 5, **TINY).load_state_dict(stage_one.state_dict())
    with pytest.raises(CheckpointMismatchError, match="stem differs"):
        tiny(stem_width=8).load_state_dict(stage_one.state_dict())
    with pytest.raises(CheckpointMismatchError, match="preset or the network arguments"):
        tiny(local_depths=(2, 2, 1, 1)).load_state_dict(stage_one.state_dict())
    tiny().load_state_dict(stage_one.state_dict())  # a fitting one loads
    partial = dict(stage_one.state_dict())
    partial.pop("decoder.seg_layers.0.weight")
    tiny().load_state_dict(partial, strict=False)  # non-strict loading is left to torch
