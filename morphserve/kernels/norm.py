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
from morphserve.kernels.triton_support import launch_options


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, stride_x, stride_r, stride_o, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    t = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < n
    x = tl.load(x_ptr + t * stride_x + c, mask=m, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_r + c, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + t * stride_r + c, x, mask=m)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    y = (xf * rstd).to(x.dtype)
    tl.store(out_ptr + t * stride_o + c, (y.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=m)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype} (rows contiguous) and weight "
                         f"{tuple(weight.shape)} {weight.dtype} do not match")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    t, n = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if t:
        block = triton.next_power_of_2(n)
        res = residual if residual is not None else x
        _rms_norm_kernel[(t,)](x, res, weight, out, n, x.stride(0), res.stride(0), out.stride(0), eps,
                               HAS_RESIDUAL=residual is not None, BLOCK=block,
                               num_warps=max(1, min(16, block // 512)), **launch_options(x.device))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of ``x`` (``[T, hidden]``); returns a new tensor."""
    return _launch(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` (in place); returns ``(rms_norm(residual), residual)``."""
    return _launch(x, residual, weight, eps), residual
