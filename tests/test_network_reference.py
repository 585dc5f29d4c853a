"""FIAS and FIAS-3D against values recorded from an earlier version of the code: same state-dict keys and shapes,
same outputs (train and eval, deep supervision on and off), same gradients of one backward pass, same BatchNorm
statistics after it. A refactoring of ``architectures/`` must leave all of them unchanged; a change of the network
must come with a new reference (``python tests/test_network_reference.py`` rewrites it) and a reason.

The reference is compact (sums, absolute sums and a few sampled values per tensor), so the tolerances are tight but
not zero: summation order may differ between machines, a changed network differs by far more. The thread count
changes how CPU kernels split their sums by more than that (up to 1e-3 relative here), so the comparison runs with
the two threads the reference was recorded with, whatever the suite's workers use.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nnunetv2_fias.architectures import FIAS, FIAS3d

REFERENCE = Path(__file__).parent / "data" / "fias_reference.pt"
RECORDED_THREADS = 2
TINY = dict(widths=(12, 24, 48, 96), global_depths=(1, 2, 1, 1), num_heads=(3, 3, 6, 6), local_depths=(2, 1, 1, 1))
THIN = ((2, 1), (2, 2), (1, 2), (1, 2), (2, 1))
ANISO_3D = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))

# name: (network class, constructor keyword arguments, input shape (B, C, *spatial))
CASES = {
    "T-default-64x64": (FIAS, dict(preset="T"), (2, 1, 64, 64)),
    "S-sigmoid-fullres-40x56": (FIAS, dict(preset="S", caf_variant="sigmoid", full_resolution_decoder=True),
                                (1, 2, 40, 56)),
    "B-concat-thin-16x72": (FIAS, dict(preset="B", caf_variant="concat", strides=THIN), (2, 1, 16, 72)),
    "tiny-concat-fullres-nockpt-24x40": (FIAS, dict(TINY, caf_variant="concat", full_resolution_decoder=True,
                                                    checkpoint_stages=(), drop_path_rate=0.3,
                                                    dilations=(1, 2, 3), kernel_size=5), (2, 3, 24, 40)),
    "3d-T-default-8x32x32": (FIAS3d, dict(preset="T"), (1, 1, 8, 32, 32)),
    "3d-tiny-aniso-concat-fullres": (FIAS3d, dict(TINY, strides=ANISO_3D, caf_variant="concat",
                                                  full_resolution_decoder=True,
                                                  stage_kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))),
                                     (2, 1, 4, 32, 48)),
}


def _stats(t: torch.Tensor) -> torch.Tensor:
    """Sum, absolute sum and eight evenly spaced values of a tensor, in float64."""
    flat = t.detach().double().flatten()
    picks = flat[torch.linspace(0, flat.numel() - 1, 8).long()]
    return torch.cat([flat.sum().view(1), flat.abs().sum().view(1), picks])


def record(name: str) -> dict:
    cls, kwargs, shape = CASES[name]
    torch.manual_seed(0)
    net = cls(shape[1], 4, deep_supervision=True, **kwargs)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    result = {"keys": [(k, tuple(v.shape)) for k, v in net.state_dict().items()]}
    net.train()
    torch.manual_seed(2)  # drop-path and Monte Carlo draws
    outs = net(x)
    sum(o.square().mean() for o in outs).backward()
    result["train_ds"] = [_stats(o) for o in outs]
    result["grads"] = torch.stack([_stats(p.grad)[:2] if p.grad is not None else torch.full((2,), float("nan"))
                                   for p in net.parameters()])
    result["buffers"] = torch.stack([_stats(b)[:2] for b in net.buffers() if b.dtype.is_floating_point])
    net.decoder.deep_supervision = False
    torch.manual_seed(3)
    with torch.no_grad():
        result["train_no_ds"] = [_stats(net(x))]
        net.eval()
        result["eval_no_ds"] = [_stats(net(x))]
        net.decoder.deep_supervision = True
        result["eval_ds"] = [_stats(o) for o in net(x)]
    return result


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture(autouse=True)
def recorded_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CASES))
def test_network_matches_the_recorded_reference(name, reference):
    expected, got = reference[name], record(name)
    assert got["keys"] == [tuple(k) if isinstance(k, list) else k for k in expected["keys"]]
    for part in ("train_ds", "train_no_ds", "eval_no_ds", "eval_ds"):
        assert len(got[part]) == len(expected[part]), part
        for i, (a, b) in enumerate(zip(got[part], expected[part])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} {part}[{i}]")
    for part in ("grads", "buffers"):
        torch.testing.assert_close(got[part], expected[part], rtol=1e-4, atol=1e-6, equal_nan=True,
                                   msg=f"{name} {part}")


def test_the_reference_notices_a_changed_network(reference):
    # A network that differs only in one initial value must fail the comparison: the check is not vacuous.
    cls, kwargs, shape = CASES["tiny-concat-fullres-nockpt-24x40"]
    torch.manual_seed(0)
    net = cls(shape[1], 4, deep_supervision=True, **kwargs)
    with torch.no_grad():
        net.decoder.seg_layers[0].bias[0] += 1e-3
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    net.eval()
    with torch.no_grad():
        out = _stats(net(x)[0])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, reference["tiny-concat-fullres-nockpt-24x40"]["eval_ds"][0], rtol=1e-5,
                                   atol=1e-6)


if __name__ == "__main__":  # rewrite the reference from the code as it is now
    torch.set_num_threads(RECORDED_THREADS)
    torch.save({name: record(name) for name in CASES}, REFERENCE)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes)", file=sys.stderr)
