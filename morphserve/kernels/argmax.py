"""Greedy sampling's argmax over each row of the logits, in Triton.

Reference: :func:`morphserve.kernels.reference.greedy` (``torch.argmax`` over the last dimension): the index of the
first maximal value of each row; a row holding NaN gives its first NaN (PyTorch orders NaN above every number); a
row of ``-inf`` gives 0.  The kernel returns the same index in every case.

``torch.argmax`` on one float32 row of a 32k (Llama-2) or 128k (Llama-3) vocabulary is a single-block reduction that
took 10 and 28 us of a batch-1 decode step on an H200, and it runs without programmatic dependent launch (see
BENCHMARKS.md, fast path, thirteenth campaign).  Here one program reduces one row: each lane keeps the first
maximum of the elements it visits (in ascending order) and the first NaN, then the lanes are reduced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.triton_support import launch_options

# Elements per loop iteration of a row's program, and its warps (H200, kernel alone: 11.9 us for a 32k
# row, 36.6 us for a 128k row, against 14.9 and 41.0 us for torch.argmax; argmax_sweep_h200.json)
BLOCK = 4096
NUM_WARPS = 16


@triton.jit(do_not_specialize=["stride"])  # a row stride per logits view
def _argmax_kernel(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    row = x_ptr + tl.program_id(0).to(tl.int64) * stride
    lane = tl.arange(0, BLOCK)
    none = n  # "no index yet" (larger than every index)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], 0, tl.int32) + none
    nan_i = tl.full([BLOCK], 0, tl.int32) + none
    for c0 in range(0, n, BLOCK):
        c = c0 + lane
        m = c < n
        x = tl.load(row + c, mask=m, other=float("-inf")).to(tl.float32)
        nan_i = tl.where(m & (x != x) & (nan_i == none), c, nan_i)
        # strictly greater keeps a lane's earlier index on ties; a lane's first element is always taken, so a
        # row of -inf ends with index 0
        take = m & ((x > best) | (best_i == none))
        best = tl.where(take, x, best)
        best_i = tl.where(take, c, best_i)
    top = tl.max(tl.where(best_i < none, best, float("-inf")), axis=0)
    first = tl.min(tl.where((best == top) & (best_i < none), best_i, none), axis=0)
    first_nan = tl.min(nan_i, axis=0)
    tl.store(out_ptr + tl.program_id(0), tl.where(first_nan < none, first_nan, first).to(tl.int64))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """int64 ``[S]``: the argmax of each row of ``logits`` (``[S, vocab]``, last dim contiguous), as
    ``logits.argmax(dim=-1)``."""
    if logits.dim() != 2 or logits.stride(1) != 1 or not logits.dtype.is_floating_point:
        raise ValueError(f"greedy expects floating [S, vocab] logits with a contiguous last dim, got "
                         f"{tuple(logits.shape)} {logits.dtype} strides {logits.stride()}")
    s, n = logits.shape
    if n == 0 or n >= 2 ** 31 - 1:
        raise ValueError(f"greedy: vocabulary size {n} out of range")
    out = torch.empty(s, dtype=torch.int64, device=logits.device)
    if s:
        _argmax_kernel[(s,)](logits, out, n, logits.stride(0), BLOCK=min(BLOCK, triton.next_power_of_2(n)),
                             num_warps=NUM_WARPS, **launch_options(logits.device))
    return out
