"""Split-K sums accumulated in place: a batch-1 projection's float32 sums handed to the kernel that consumes them.

A split-K GEMV (:mod:`morphserve.kernels.gemv`) cuts K into ranges handled by separate programs.  By default each
program stores its float32 partial sums and a second small kernel adds them and rounds.  At batch 1 that reduce
launch sits on the critical path of every projection (about 1 us each under programmatic dependent launch; 129 per
Llama-2-7B step: BENCHMARKS.md, fast path, eleventh campaign).  In *accumulate* mode the programs instead add their
partial sums with relaxed float32 atomics (``red.global.add.f32``, no round trip) into a zeroed buffer, and the
consumer kernel (RoPE + KV store, add-RMSNorm, SiLU-and-multiply) reads that buffer through :func:`load_input`,
rounds it to the activation dtype and stores zeros back (:func:`zero_input`) so the buffer is ready for the next
product of the same width.  The LM head accumulates too; :func:`finish` rounds its sums and widens them to
float32 logits in one kernel.

**Same bits.**  Splits are added in pairs: split ``2i`` and split ``2i + 1`` add into float32 buffer ``i`` of the
product, and the consumer adds the buffers in order.  ``0 + a + b`` is the same float32 value in either order
(IEEE addition is commutative and ``0 + a == a``), so every buffer holds exactly ``a + b`` whichever split came
first, and the result is deterministic.  The reduce kernel adds the partial sums in the same pairs and order
(:func:`morphserve.kernels.gemv._splitk_reduce_kernel`) and rounds the same way, so the two paths give the same
bits.  (One exception: the GPU's float32 atomic add flushes subnormal operands and sums, below 1.2e-38 in
magnitude, to zero.  In float16 such values round to zero either way, so at most the sign of a zero differs;
bfloat16 has float32's exponent range and would keep them as bfloat16 subnormals.)

**Buffers.**  One zeroed ``[P, M, N]`` float32 buffer per (device, P pairs, M, N) (:func:`accumulator`), shared by
every projection of that shape: each product's consumer zeroes it before the next such product starts (kernels of
one stream complete in order; under programmatic dependent launch every kernel waits for the one before it to
complete before touching memory, and a GEMV's atomics come after its wait).  :func:`finish` turns an accumulated
result into a plain tensor (and zeroes the buffer) for anything else.  :func:`reset` zeroes every buffer; the
model calls it when a forward fails part-way, so a product whose consumer never ran cannot leak into the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.triton_support import launch_options, tl_dtype

_BUFFERS: dict[tuple[str, int, int, int], torch.Tensor] = {}


@dataclass(frozen=True)
class Accumulated:
    """The ``[M, N]`` result of dtype ``dtype`` of a projection, held as float32 sums of split pairs in ``acc``
    (``[P, M, N]``, an :func:`accumulator` buffer) until a consumer kernel reads and zeroes them."""

    acc: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.acc.shape[1], self.acc.shape[2])

    @property
    def device(self) -> torch.device:
        return self.acc.device


def accumulator(device: torch.device, pairs: int, m: int, n: int) -> torch.Tensor:
    """The zeroed float32 ``[pairs, m, n]`` buffer that accumulating products of that shape on ``device`` add
    into."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), pairs, m, n)
    buf = _BUFFERS.get(key)
    if buf is None:
        buf = _BUFFERS[key] = torch.zeros((pairs, m, n), dtype=torch.float32, device=device)
    return buf


def reset() -> None:
    """Zero every accumulator (after a forward that stopped between a product and its consumer)."""
    for buf in _BUFFERS.values():
        buf.zero_()


def input_args(x: "torch.Tensor | Accumulated") -> tuple[torch.Tensor, int, int, int]:
    """``(pointer tensor, row stride, PARTS, part stride)`` for a consumer kernel that reads ``x`` with
    :func:`load_input` (``PARTS`` 0: a plain tensor)."""
    if isinstance(x, Accumulated):
        return x.acc, x.acc.stride(1), x.acc.shape[0], x.acc.stride(0)
    return x, x.stride(0), 0, 0


@triton.jit
def load_input(ptr, offs, mask, PARTS: tl.constexpr, part_stride, DTYPE: tl.constexpr):
    """The consumer's input at ``ptr + offs``: loaded as is (``PARTS == 0``), or the sum of ``PARTS`` float32
    buffers ``part_stride`` elements apart, added in order and rounded to ``DTYPE``."""
    if PARTS == 0:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        acc = tl.load(ptr + offs, mask=mask, other=0.0)
        for i in tl.static_range(1, PARTS):
            acc += tl.load(ptr + i * part_stride + offs, mask=mask, other=0.0)
        return acc.to(DTYPE)


@triton.jit
def zero_input(ptr, offs, mask, PARTS: tl.constexpr, part_stride):
    """Zero what :func:`load_input` read (accumulated sums only), after a barrier: another thread of the program may
    still have to load an element (as a rotation partner, or as a replica where the tile is smaller than the
    program)."""
    if PARTS > 0:
        tl.debug_barrier()
        for i in tl.static_range(PARTS):
            tl.store(ptr + i * part_stride + offs, tl.zeros(offs.shape, dtype=tl.float32), mask=mask)


@triton.jit
def _finish_kernel(acc_ptr, y_ptr, n, part_stride, PARTS: tl.constexpr, BLOCK: tl.constexpr, DTYPE: tl.constexpr,
                   USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    t = tl.program_id(1)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < n
    row = acc_ptr + t * n
    tl.store(y_ptr + t * n + c, load_input(row, c, m, PARTS, part_stride, DTYPE).to(y_ptr.dtype.element_ty), mask=m)
    zero_input(row, c, m, PARTS, part_stride)


def finish(x: "torch.Tensor | Accumulated", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` as a tensor: accumulated sums rounded to their dtype (then converted to ``dtype`` when given: the
    float32 logits of float16 sums, in one kernel) and their buffer zeroed; a tensor returned as is (or
    converted)."""
    if not isinstance(x, Accumulated):
        return x if dtype is None else x.to(dtype)
    m, n = x.shape
    y = torch.empty((m, n), dtype=dtype or x.dtype, device=x.device)
    if m and n:
        block = min(1024, triton.next_power_of_2(n))
        _finish_kernel[(triton.cdiv(n, block), m)](x.acc, y, n, x.acc.stride(0), PARTS=x.acc.shape[0], BLOCK=block,
                                                   DTYPE=tl_dtype(x.dtype), num_warps=4,
                                                   **launch_options(x.device))
    return y
