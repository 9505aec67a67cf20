"""RMSNorm, alone and fused with the residual add, in Triton.

Reference: :func:`morphserve.kernels.reference.rms_norm` / :func:`~morphserve.kernels.reference.add_rms_norm`
(transformers' Llama numerics): ``residual = residual + x`` in the activation dtype, then the mean of squares in
float32, the normalised row cast back to the activation dtype, and the product with the weight in that dtype.  The
kernel rounds at the same points.  One program normalises one row (``hidden`` elements in one tile).

The fused kernel updates ``residual`` *in place* (the reference returns a new tensor): the decoder owns its
residual stream, and one fewer buffer per layer keeps CUDA-graph memory flat.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.split_accum import Accumulated, input_args, load_input, zero_input
from morphserve.kernels.triton_support import launch_options, tl_dtype

# Warps of a norm program (one row); None: one warp per 512 elements of the row, 1 to 16
NUM_WARPS: int | None = None
# Load the norm weight and the residual before the programmatic-launch wait, so they arrive while the kernel in
# front (a GEMV) finishes, and the wait is followed by one memory round trip (the input) instead of three (the
# input; the residual, issued after the barrier that zeroes accumulated input; the weight, issued after the
# row's reduction).  Safe: neither is written by the kernel just before.  The residual is last written by the
# add-RMSNorm of the previous half-layer, at least three launches back, and every kernel of this package
# triggers its dependents only after its own wait, so work two launches back has completed when a program
# starts.  Norm weights change only through copies (layer swaps), which are not programmatic launches and
# serialize fully.  Measured inside graph-captured batch-1 Llama-2-7B steps on an H200 (2026-12-04, three rounds of
# benchmarks/probe_b1_small_kernels.py): 3.61-3.62 ms against 3.64-3.65 ms with the loads after the wait.
EARLY_LOADS = True


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, stride_x, stride_r, stride_o, eps, part_stride,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr, DTYPE: tl.constexpr,
                     EARLY: tl.constexpr, USE_PDL: tl.constexpr):
    t = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < n
    if EARLY:  # the weight and the residual before the wait (EARLY_LOADS)
        w = tl.load(w_ptr + c, mask=m, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + t * stride_r + c, mask=m, other=0.0)
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    x = load_input(x_ptr + t * stride_x, c, m, PARTS, part_stride, DTYPE)
    zero_input(x_ptr + t * stride_x, c, m, PARTS, part_stride)
    if HAS_RESIDUAL:
        if not EARLY:
            r = tl.load(res_ptr + t * stride_r + c, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + t * stride_r + c, x, mask=m)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    if not EARLY:
        w = tl.load(w_ptr + c, mask=m, other=0.0)
    y = (xf * rstd).to(x.dtype)
    tl.store(out_ptr + t * stride_o + c, (y.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=m)


def _launch(x: "torch.Tensor | Accumulated", residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> torch.Tensor:
    if (len(x.shape) != 2 or (isinstance(x, torch.Tensor) and x.stride(1) != 1) or weight.shape != (x.shape[1],)
            or weight.dtype != x.dtype):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype} (rows contiguous) and weight "
                         f"{tuple(weight.shape)} {weight.dtype} do not match")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    t, n = x.shape
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t:
        block = triton.next_power_of_2(n)
        xp, stride_x, parts, part_stride = input_args(x)
        res = residual if residual is not None else out  # not read without a residual
        _rms_norm_kernel[(t,)](xp, res, weight, out, n, stride_x, res.stride(0), out.stride(0), eps, part_stride,
                               HAS_RESIDUAL=residual is not None, BLOCK=block, PARTS=parts, DTYPE=tl_dtype(x.dtype),
                               EARLY=EARLY_LOADS, num_warps=NUM_WARPS or max(1, min(16, block // 512)),
                               **launch_options(x.device))
    return out


def rms_norm(x: "torch.Tensor | Accumulated", weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of ``x`` (``[T, hidden]``, or a projection's accumulated sums:
    :mod:`morphserve.kernels.split_accum`); returns a new tensor."""
    return _launch(x, None, weight, eps)


def add_rms_norm(x: "torch.Tensor | Accumulated", residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` (in place; ``x`` may be accumulated sums); returns ``(rms_norm(residual), residual)``."""
    return _launch(x, residual, weight, eps), residual
