"""Deferred split-K sums: a projection's float32 partial sums handed to the kernel that consumes its output.

A split-K GEMV (:mod:`morphserve.kernels.gemv`) leaves ``S`` float32 partial sums per output element.  Instead of
a second launch that adds them (``_splitk_reduce_kernel``), the Triton kernel set may hand them on as
:class:`SplitSums`; the consumer kernels (RMSNorm with residual, RoPE + KV store, SiLU-and-multiply) read their
input through :func:`load_input`, which adds the ``S`` partials in split order in float32 and rounds to the
activation dtype exactly as the reduce kernel would, so the bits are the same either way.  Anything else that
needs the values calls :func:`morphserve.kernels.gemv.finish`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class SplitSums:
    """Partial sums ``part`` (``[S, M, N]`` float32, contiguous) of an ``[M, N]`` result of dtype ``dtype``."""

    part: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.part.shape[1], self.part.shape[2])

    @property
    def device(self) -> torch.device:
        return self.part.device

    @property
    def splits(self) -> int:
        return self.part.shape[0]


def input_args(x: "torch.Tensor | SplitSums") -> tuple[torch.Tensor, int, int, int]:
    """``(pointer tensor, row stride, splits, split stride)`` for a consumer kernel reading ``x`` with
    :func:`load_input` (one split, stride 0, for a plain tensor)."""
    if isinstance(x, SplitSums):
        return x.part, x.part.stride(1), x.splits, x.part.stride(0)
    return x, x.stride(0), 1, 0


@triton.jit
def load_input(ptr, offs, mask, SPLITS: tl.constexpr, split_stride, DTYPE: tl.constexpr):
    """The consumer's input at ``ptr + offs``: loaded as is (``SPLITS == 1``), or the sum of ``SPLITS`` float32
    partials ``split_stride`` elements apart, added in split order and rounded to ``DTYPE``."""
    if SPLITS == 1:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        acc = tl.zeros(offs.shape, dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(ptr + s * split_stride + offs, mask=mask, other=0.0)
        return acc.to(DTYPE)
