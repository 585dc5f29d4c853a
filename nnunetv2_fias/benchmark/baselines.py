"""Reference formulations of dilated neighbourhood attention, kept out of the network as baselines.

* :func:`dilated_neighborhood_attention_unfold`: the naive ``F.unfold`` formulation of the official DilateFormer code;
  with ``mask_out_of_image=False`` it reproduces the official zero padding exactly (bit-parity with its weights).
* :func:`dilated_neighborhood_attention_shifted`: one shifted view of the padded keys/values per neighbour under
  plain autograd (FIAS's earlier formulation).

The network uses :func:`nnunetv2_fias.architectures.attention.dilated_neighborhood_attention`;
``python -m nnunetv2_fias.benchmark.baselines`` compares its time and saved-for-backward memory with these two.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from nnunetv2_fias.architectures.attention import _check_qkv, dilated_neighborhood_attention
from nnunetv2_fias.architectures.measure import saved_tensor_bytes


def _neighbour_offsets(kernel_size: int, dilation: int) -> list[tuple[int, int]]:
    r = kernel_size // 2
    return [(dy * dilation, dx * dilation) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]


def _key_validity(height: int, width: int, kernel_size: int, dilation: int, device) -> torch.Tensor:
    """(H, W, K*K) bool: True where the k-th neighbour of a query lies inside the image."""
    ys = torch.arange(height, device=device).view(height, 1, 1)
    xs = torch.arange(width, device=device).view(1, width, 1)
    offsets = torch.tensor(_neighbour_offsets(kernel_size, dilation), device=device)
    ny = ys + offsets[:, 0].view(1, 1, -1)
    nx = xs + offsets[:, 1].view(1, 1, -1)
    return (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)


def dilated_neighborhood_attention_shifted(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int = 3,
    dilation: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """One shifted view of the zero-padded keys/values per neighbour under plain autograd.

    Same arguments and shapes as :func:`~nnunetv2_fias.architectures.attention.dilated_neighborhood_attention`.
    """
    _check_qkv(q, k, v, kernel_size, dilation)
    height, width, head_dim = q.shape[2], q.shape[3], q.shape[4]
    scale = head_dim ** -0.5 if scale is None else scale
    pad = (kernel_size // 2) * dilation
    q32 = q.float() * scale
    k_pad = F.pad(k.float(), (0, 0, pad, pad, pad, pad))
    v_pad = F.pad(v, (0, 0, pad, pad, pad, pad))
    offsets = _neighbour_offsets(kernel_size, dilation)

    def window(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        return t[:, :, pad + dy:pad + dy + height, pad + dx:pad + dx + width]

    logits = torch.stack([(q32 * window(k_pad, dy, dx)).sum(-1) for dy, dx in offsets], dim=-1)
    logits = logits.masked_fill(~_key_validity(height, width, kernel_size, dilation, q.device), float("-inf"))
    attn = logits.softmax(dim=-1).to(v_pad.dtype)
    out = attn[..., 0, None] * window(v_pad, *offsets[0])
    for i, (dy, dx) in enumerate(offsets[1:], start=1):
        out = out + attn[..., i, None] * window(v_pad, dy, dx)
    return out.to(v.dtype)


def dilated_neighborhood_attention_unfold(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int = 3,
    dilation: int = 1,
    scale: float | None = None,
    mask_out_of_image: bool = True,
) -> torch.Tensor:
    """The naive ``F.unfold`` formulation, as in the official DilateFormer code.

    With ``mask_out_of_image=False`` the zero-padded keys take part in the softmax exactly as in DilateFormer.
    Same arguments and shapes as :func:`~nnunetv2_fias.architectures.attention.dilated_neighborhood_attention`.
    """
    _check_qkv(q, k, v, kernel_size, dilation)
    b, h, height, width, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    pad = (kernel_size // 2) * dilation
    kk = kernel_size * kernel_size

    def unfold(t: torch.Tensor) -> torch.Tensor:  # (B, h, H, W, d) -> (B, h, H, W, K*K, d)
        t = t.permute(0, 1, 4, 2, 3).reshape(b, h * d, height, width)
        t = F.unfold(t, kernel_size, dilation=dilation, padding=pad)  # (B, h*d*K*K, H*W)
        return t.view(b, h, d, kk, height, width).permute(0, 1, 4, 5, 3, 2)

    logits = torch.einsum("bhyxd,bhyxkd->bhyxk", q.float() * scale, unfold(k.float()))
    if mask_out_of_image:
        logits = logits.masked_fill(~_key_validity(height, width, kernel_size, dilation, q.device), float("-inf"))
    attn = logits.softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhyxk,bhyxkd->bhyxd", attn, unfold(v))


def attention_benchmark(size: int = 128, batch: int = 2, heads: int = 1, head_dim: int = 24,
                        repeats: int = 5) -> dict[str, tuple[float, float]]:
    """Forward+backward time (dilations 1-3) and memory saved for backward (dilation 2) of the fused attention and
    both baselines at ``size x size`` on the CPU; returns ``{name: (seconds, MiB)}`` and prints a table."""
    torch.manual_seed(0)
    shape = (batch, heads, size, size, head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    impls = {"fused (ours)": dilated_neighborhood_attention, "shifted windows": dilated_neighborhood_attention_shifted,
             "unfold (naive)": dilated_neighborhood_attention_unfold}
    print(f"dilated attention fwd+bwd, q/k/v {shape}, kernel 3, dilations 1-3, median of {repeats}")
    results = {}
    for name, fn in impls.items():
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for dil in (1, 2, 3):
                fn(q, k, v, 3, dil).sum().backward()
            times.append(time.perf_counter() - t0)
        # Memory saved for backward: the tensors autograd keeps alive between forward and backward.
        saved = saved_tensor_bytes(functools.partial(fn, q, k, v, 3, 2))
        results[name] = (statistics.median(times[1:]), saved / 2 ** 20)
    base_t, base_m = results["unfold (naive)"]
    for name, (t, m) in results.items():
        print(f"  {name:<16} {t * 1e3:8.1f} ms  ({t / base_t:4.2f}x)   saved for backward {m:7.1f} MiB "
              f"({m / base_m:4.2f}x)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nnunetv2_fias.benchmark.baselines",
        description="Time and saved-for-backward memory of FIAS's dilated neighbourhood attention next to the "
                    "shifted-window and naive unfold formulations (CPU).")
    parser.add_argument("--size", type=int, default=128, help="image edge (default: 128)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is printed (default: 5)")
    args = parser.parse_args(argv)
    for name in ("size", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    attention_benchmark(args.size, args.batch, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
