"""A step's metadata uploaded from pinned host memory by a kernel (zero-copy reads), not by the copy engine.

Why: the GPU's copy engine serves host-to-device copies in order, whatever stream issued them.  While a layer
swap's copy (100-440 MB for a 7B/8B layer) is in flight, a step's own metadata upload issued as a
``cudaMemcpyAsync`` waits behind it, and with it the whole step.  Measured on an H200 (``benchmarks/bench_morph.py``,
2026-11-22): one bare layer-sized copy in flight stretched a batch-8 Llama-3-8B decode step from 5.3 to 12.6 ms of
device time, i.e. by the copy's own duration.  Here an ordinary kernel reads the pinned buffer over the bus (pinned
memory is mapped into the device's address space under unified virtual addressing), so the upload does not queue
behind the swap copy.  The metadata is small (tens of KB), so the zero-copy reads cost microseconds.

Reference: ``dst.copy_(src)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit(do_not_specialize=["n"])  # one compiled variant for every size (sizes change step by step)
def _upload_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m), mask=m)


def upload(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for a contiguous device tensor ``dst`` and a contiguous pinned host tensor ``src`` of the
    same dtype and size, done by a kernel on the current stream (asynchronous, like ``non_blocking=True``)."""
    if src.dtype != dst.dtype or src.numel() != dst.numel():
        raise ValueError(f"upload needs the same dtype and size, got {src.dtype}[{src.numel()}] -> "
                         f"{dst.dtype}[{dst.numel()}]")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("upload needs contiguous tensors")
    if dst.device.type == "cuda" and not src.is_pinned():
        raise ValueError("upload reads the host buffer from the device: it must be pinned (pin_memory=True)")
    n = src.numel()
    if n:
        _upload_kernel[(triton.cdiv(n, _BLOCK),)](src, dst, n, BLOCK=_BLOCK)
    return dst
