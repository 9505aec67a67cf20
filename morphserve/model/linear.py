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

LinearFn = Callable[[torch.Tensor, LayerWeights, str], torch.Tensor]


def _fp16_linear(x: torch.Tensor, lw: LayerWeights, name: str) -> torch.Tensor:
    return F.linear(x, lw.tensors[name])


_KERNELS: dict[Precision, LinearFn] = {Precision.FP16: _fp16_linear}


def register_linear(precision: Precision, fn: LinearFn) -> None:
    _KERNELS[precision] = fn


def linear(x: torch.Tensor, lw: LayerWeights, name: str) -> torch.Tensor:
    """``x @ W[name].T`` for layer ``lw`` at its current precision."""
    try:
        fn = _KERNELS[lw.precision]
    except KeyError:
        raise ValueError(f"layer {lw.index}: no linear kernel registered for precision {lw.precision!r}") from None
    return fn(x, lw, name)
