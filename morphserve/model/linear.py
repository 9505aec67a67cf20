"""Precision dispatch for the linear projections of a decoder layer.

Every projection goes through :func:`linear`, which looks up the kernel registered for the layer's *current*
precision.  The FP16 kernel is a plain GEMM (cuBLAS on GPU); quantized precisions register their own kernels
(which may in turn pick a path by batch size) with :func:`register_linear`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from morphserve.memory.weight_arena import LayerWeights, Precision

LinearFn = Callable[[torch.Tensor, LayerWeights, str, "torch.Tensor | None"], torch.Tensor]


def output_buffer(out: torch.Tensor | None, m: int, n: int, x: torch.Tensor) -> torch.Tensor:
    """The ``[m, n]`` result tensor of a product with ``x``: ``out`` once checked (``x``'s dtype and device,
    contiguous: the kernels store rows at a stride of ``n``), or a new tensor when ``out`` is None."""
    if out is None:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor on {x.device}, got "
                         f"{'contiguous' if out.is_contiguous() else 'strided'} {tuple(out.shape)} {out.dtype} "
                         f"on {out.device}")
    return out


def dense_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w)`` (``w`` a dense ``[N, K]`` weight), written into ``out`` when given (``x`` 2-D)."""
    if out is None:
        return F.linear(x, w)
    return torch.mm(x, w.t(), out=output_buffer(out, x.shape[0], w.shape[0], x))


def _fp16_linear(x: torch.Tensor, lw: LayerWeights, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    return dense_linear(x, lw.tensors[name], out)


_KERNELS: dict[Precision, LinearFn] = {Precision.FP16: _fp16_linear}


def register_linear(precision: Precision, fn: LinearFn) -> None:
    _KERNELS[precision] = fn


def linear(x: torch.Tensor, lw: LayerWeights, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W[name].T`` for layer ``lw`` at its current precision.  ``out``: a contiguous ``[M, N]`` tensor to
    write the result into (``x`` must then be 2-D ``[M, K]``), as the per-layer CUDA graphs do to hand a layer's
    output to the next layer's graph without a copy."""
    if out is not None and x.dim() != 2:
        raise ValueError(f"linear with out= needs a 2-D x [M, K], got shape {tuple(x.shape)}")
    try:
        fn = _KERNELS[lw.precision]
    except KeyError:
        raise ValueError(f"layer {lw.index}: no linear kernel registered for precision {lw.precision!r}") from None
    return fn(x, lw, name, out)
