"""L2 prefetch: asking the GPU to pull bytes that a *later* kernel will read into its L2 cache now.

At batch 1 a decode step alternates bandwidth-bound GEMVs with latency-bound small kernels (RoPE and KV store,
decode attention, norms, SiLU), during which HBM sits mostly idle.  Prefetching the next projection's weights into
L2 while those run turns that idle time into useful transfer, and the GEMV then reads from L2.  A prefetch only
moves bytes into the cache: L2 is the point of coherence of device memory (kernel stores and copy-engine writes
both go through it), so a prefetch can never make a later read see stale data, and the results of every kernel
are the same with or without it.  What it can do is waste bandwidth (bytes evicted before they are read), which
is why where and how much to prefetch is decided by measurement (``benchmarks/probe_l2_prefetch.py``).

The instruction is Hopper's ``cp.async.bulk.prefetch.L2.global [addr], size``: one thread asks the SM's copy
engine to fetch ``size`` bytes, without waiting and without registers to receive them.  It needs a 16-byte aligned
address and a size that is a multiple of 16, so :func:`l2_prefetch` covers the aligned interior of each range
(at most 15 bytes at either end are left to the reader's own load).

The helpers are ``@triton.jit`` functions called from other kernels; ``ENABLED`` is a ``tl.constexpr``: False
under the interpreter and below compute capability 9 (:func:`supported`), where they compile to nothing.  Their
pure-PyTorch reference is doing nothing: tests check that kernels give identical results with and without them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from morphserve.kernels.triton_support import interpreting

_ASM = tl.constexpr("""{
.reg .pred p;
.reg .b64 a, e, d;
.reg .b32 s;
add.s64 a, $1, 15;
and.b64 a, a, 0xFFFFFFFFFFFFFFF0;
cvt.s64.s32 d, $2;
add.s64 e, $1, d;
and.b64 e, e, 0xFFFFFFFFFFFFFFF0;
setp.gt.s64 p, e, a;
sub.s64 d, e, a;
cvt.u32.u64 s, d;
@p cp.async.bulk.prefetch.L2.global [a], s;
mov.u32 $0, 0;
}""")


def supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can issue the prefetch (compiled CUDA, compute capability >= 9)."""
    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def l2_prefetch(ptrs, nbytes, ENABLED: tl.constexpr):
    """Prefetch ``nbytes`` (int32, elementwise) from each of ``ptrs`` into L2 (ranges of 0 bytes or less are
    skipped).  Each element is one bulk prefetch issued by the thread holding it."""
    if ENABLED:
        tl.inline_asm_elementwise(_ASM, "=r,l,r", [ptrs, nbytes.to(tl.int32)], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def l2_prefetch_share(base_ptr, n, part, parts, NT: tl.constexpr, ENABLED: tl.constexpr):
    """Program ``part`` of ``parts`` prefetches its share of elements ``[0, n)`` of ``base_ptr``: the range is cut
    into ``parts * NT`` equal pieces, one per thread (``NT``: the program's thread count)."""
    if ENABLED:
        EB: tl.constexpr = base_ptr.dtype.element_ty.primitive_bitwidth // 8
        piece = tl.cdiv(n, parts * NT)
        start = (part * NT + tl.arange(0, NT)).to(tl.int64) * piece
        count = tl.minimum(piece, n - start)
        l2_prefetch(base_ptr + start, count * EB, ENABLED)


def programs_for(nbytes: int, piece_bytes: int = 16384, threads: int = 128) -> int:
    """How many programs of ``threads`` threads prefetch ``nbytes`` in pieces of about ``piece_bytes``."""
    return triton.cdiv(nbytes, piece_bytes * threads)
