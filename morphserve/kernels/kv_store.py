"""KV-cache addressing through the pool's segment table, and the kernels that store K/V into blocks.

Every kernel that touches the cache resolves a *global* block id the same way (see
:mod:`morphserve.memory.kv_pool`)::

    segment = id >> shift            local = id & (2**shift - 1)
    block   = (seg_base_ptr[segment] - base_addr) / elem_bytes + local * block_stride      # element offset
    element (layer, kv, head, offset, d) = block + ((layer * 2 + kv) * kv_heads + head) * block_size * head_dim
                                                 + offset * head_dim + d

``seg_base_ptr`` is the pool's int64 device tensor of segment data pointers, read *inside* the kernel (one load
per block), so blocks in an extension segment carved from a weight slot, or in any other allocation, are read and
written like base-pool blocks, and a CUDA graph captured before a segment was attached still reaches it (the table
is updated in place).  Addresses are formed as element offsets from the base segment (segment 0, which never
moves), passed to the kernel as an ordinary tensor argument: offsets into other allocations may be negative, which
int64 arithmetic handles.  Casting the table's int64 to a pointer also works (compiled and interpreted), but then
the compiler cannot see that rows are 16-byte aligned and issues 2-byte loads (measured in the PTX: no
``ld.global.v4``); with a tensor base plus an offset hinted as a multiple of 16 bytes it issues 16-byte loads.
Offsets are int64: a Llama-2-7B block is 4 Mi elements, so ``local * block_stride`` passes 2**31 at 512 blocks.

:class:`KVAddress` bundles what a launch needs from the pool.  :func:`store_kv` writes K/V (the reference is
:meth:`KVPool.store`); :func:`rope_and_store` is what the engine runs after the QKV projection: it rotates Q
(into a new tensor) and K, and stores the rotated K and V into the cache, in one launch.  A negative slot skips
the store (padding rows of a CUDA-graph batch).  Up to :data:`HEAD_SPLIT_MAX_TOKENS` tokens it runs one program
per (token, KV head), which also handles that head's queries: a decode step's RoPE then spreads over as many
multiprocessors as there are KV heads (one program per token left a batch-1 step's RoPE on one multiprocessor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.rotary import rope_rotate
from morphserve.kernels.split_accum import Accumulated, input_args, load_input, zero_input
from morphserve.kernels.triton_support import launch_options, tl_dtype
from morphserve.memory.kv_pool import KVPool

# rope_and_store runs one program per (token, KV head) up to this many tokens (module docstring)
HEAD_SPLIT_MAX_TOKENS = 64


@triton.jit
def kv_block_offset(seg_base_ptr, block_ids, shift, block_stride, base_addr, ELEM_BYTES: tl.constexpr):
    """Element offset(s), from the base segment's first element, of the first element of global block(s)
    ``block_ids`` (int64 scalar or tensor).  Offsets into other allocations may be negative (int64)."""
    seg = block_ids >> shift
    local = (block_ids & ((1 << shift) - 1)).to(tl.int64)
    return (tl.load(seg_base_ptr + seg) - base_addr) // ELEM_BYTES + local * block_stride


@triton.jit
def kv_row_ptrs(kv_ptr, seg_base_ptr, block_ids, offsets, shift, block_stride, base_addr, ELEM_BYTES: tl.constexpr):
    """Pointers to K/V rows: block(s) ``block_ids`` plus element ``offsets`` within them.  Every row starts on a
    16-byte boundary (segments are 256-byte aligned, rows are ``head_dim >= 16`` elements): saying so lets the
    compiler issue 16-byte vector loads along ``head_dim``."""
    rows = kv_block_offset(seg_base_ptr, block_ids, shift, block_stride, base_addr, ELEM_BYTES) + offsets
    return kv_ptr + tl.multiple_of(rows, 16 // ELEM_BYTES)


@dataclass(frozen=True)
class KVAddress:
    """The constants a kernel needs to address a pool: its segment table, id split and block geometry."""

    seg_base_ptr: torch.Tensor  # int64 [max_segments], updated in place by the pool
    base: torch.Tensor  # the base segment (index 0, never detached): kernels address every block from it
    shift: int
    block_stride: int  # elements per block (all layers)
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: object  # triton element type of the cache

    @staticmethod
    def of(pool: KVPool) -> "KVAddress":
        cfg = pool.cfg
        if cfg.head_dim & (cfg.head_dim - 1):
            raise ValueError(f"Triton KV kernels need a power-of-two head_dim, got {cfg.head_dim}")
        stride = cfg.num_layers * 2 * cfg.num_kv_heads * pool.block_size * cfg.head_dim
        return KVAddress(pool.seg_base_ptr, pool.segments[0].tensor, pool.shift, stride, cfg.num_kv_heads,
                         pool.block_size, cfg.head_dim, tl_dtype(pool.dtype))

    @property
    def base_addr(self) -> int:
        return self.base.data_ptr()

    @property
    def elem_bytes(self) -> int:
        return self.base.element_size()


@triton.jit
def store_rows(kv_ptr, seg_base_ptr, shift, block_stride, base_addr, slot, layer, k, v, heads, hmask,
               KVH: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, ELEM_BYTES: tl.constexpr):
    """Store one token's ``k``/``v`` (``[len(heads), D]``: KV heads ``heads``, padding rows masked by ``hmask``) at
    global slot ``slot`` of ``layer``."""
    block = slot // BS
    off = slot % BS
    rows = kv_row_ptrs(kv_ptr, seg_base_ptr, block, (layer * 2 * KVH + heads) * (BS * D) + off * D, shift,
                       block_stride, base_addr, ELEM_BYTES)
    d = tl.arange(0, D)[None, :]
    tl.store(rows[:, None] + d, k.to(kv_ptr.dtype.element_ty), mask=hmask)
    tl.store(rows[:, None] + KVH * BS * D + d, v.to(kv_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh, slot_ptr, kv_ptr, seg_base_ptr,
                     shift, block_stride, base_addr, layer, KVH: tl.constexpr, KVH_P2: tl.constexpr,
                     BS: tl.constexpr, D: tl.constexpr, ELEM_BYTES: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        h = tl.arange(0, KVH_P2)[:, None]
        d = tl.arange(0, D)[None, :]
        hmask = h < KVH
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=hmask, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=hmask, other=0.0)
        store_rows(kv_ptr, seg_base_ptr, shift, block_stride, base_addr, slot, layer, k, v, tl.arange(0, KVH_P2),
                   hmask, KVH, BS, D, ELEM_BYTES)


@triton.jit
def _rope_store_kernel(qkv_ptr, stride_t, part_stride, q_out_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kv_ptr,
                       seg_base_ptr, shift, block_stride, base_addr, layer, H: tl.constexpr, QH: tl.constexpr,
                       QH_P2: tl.constexpr, KVH: tl.constexpr, KH: tl.constexpr, KH_P2: tl.constexpr,
                       BS: tl.constexpr, D: tl.constexpr, ELEM_BYTES: tl.constexpr, PARTS: tl.constexpr,
                       DTYPE: tl.constexpr, USE_PDL: tl.constexpr):
    # program (t, j): token t's query heads j*QH ... and KV heads j*KH ... (QH = H, KH = KVH: all of them)
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    t = tl.program_id(0)
    j = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, D)[None, :]
    dp = (d + D // 2) % D
    cos = tl.load(cos_ptr + pos * D + d)
    sin = tl.load(sin_ptr + pos * D + d)
    row = qkv_ptr + t * stride_t
    # queries: rotated into q_out (a separate buffer: rotating in place would race between the threads that read
    # an element as a partner and the thread that overwrites it)
    iq = tl.arange(0, QH_P2)[:, None]
    hq = j * QH + iq
    qmask = iq < QH
    q = load_input(row, hq * D + d, qmask, PARTS, part_stride, DTYPE)
    qp = load_input(row, hq * D + dp, qmask, PARTS, part_stride, DTYPE)
    tl.store(q_out_ptr + t * (H * D) + hq * D + d, rope_rotate(q, qp, cos, sin, d, D // 2), mask=qmask)
    slot = tl.load(slot_ptr + t)
    ik = tl.arange(0, KH_P2)
    h = (j * KH + ik)[:, None]
    hmask = ik[:, None] < KH
    krow = row + H * D
    if slot >= 0:
        k = load_input(krow, h * D + d, hmask, PARTS, part_stride, DTYPE)
        kp = load_input(krow, h * D + dp, hmask, PARTS, part_stride, DTYPE)
        v = load_input(krow, KVH * D + h * D + d, hmask, PARTS, part_stride, DTYPE)
        k = rope_rotate(k, kp, cos, sin, d, D // 2)
        store_rows(kv_ptr, seg_base_ptr, shift, block_stride, base_addr, slot, layer, k, v, j * KH + ik, hmask,
                   KVH, BS, D, ELEM_BYTES)
    # zero the accumulated row (split_accum; after a barrier: threads read their partners' elements)
    zero_input(row, hq * D + d, qmask, PARTS, part_stride)
    zero_input(krow, h * D + d, hmask, PARTS, part_stride)
    zero_input(krow, KVH * D + h * D + d, hmask, PARTS, part_stride)


def check_slots(slot_mapping: torch.Tensor, t: int) -> None:
    if slot_mapping.shape != (t,) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 of shape ({t},), got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")


def store_kv(k: torch.Tensor, v: torch.Tensor, addr: KVAddress, layer: int, slot_mapping: torch.Tensor) -> None:
    """Write ``k``/``v`` (``[T, kv_heads, head_dim]``, last dim contiguous) of ``layer`` at global slots
    ``slot_mapping`` (``block_id * block_size + offset``; negative slots are skipped)."""
    t = k.shape[0]
    if k.shape != v.shape or k.shape[1:] != (addr.num_kv_heads, addr.head_dim) or k.stride(-1) != 1 \
            or v.stride(-1) != 1:
        raise ValueError(f"store_kv: k {tuple(k.shape)} / v {tuple(v.shape)} must be [T, {addr.num_kv_heads}, "
                         f"{addr.head_dim}] with a contiguous last dim")
    check_slots(slot_mapping, t)
    if t:
        _store_kv_kernel[(t,)](k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1), slot_mapping, addr.base,
                               addr.seg_base_ptr, addr.shift, addr.block_stride, addr.base_addr, layer,
                               KVH=addr.num_kv_heads, KVH_P2=triton.next_power_of_2(addr.num_kv_heads),
                               BS=addr.block_size, D=addr.head_dim, ELEM_BYTES=addr.elem_bytes,
                               **launch_options(k.device))


def rope_and_store(qkv: "torch.Tensor | Accumulated", num_heads: int, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, addr: KVAddress, layer: int, slot_mapping: torch.Tensor) -> torch.Tensor:
    """From the fused projection ``qkv`` (``[T, (heads + 2 * kv_heads) * head_dim]``, rows contiguous, or its
    accumulated sums: :mod:`morphserve.kernels.split_accum`): returns the rotated queries ``[T, heads, head_dim]``
    and stores the rotated keys and the values of ``layer`` into the cache at ``slot_mapping``.  ``cos``/``sin``
    are the full tables, ``positions`` the tokens' positions."""
    t = qkv.shape[0]
    d, kvh = addr.head_dim, addr.num_kv_heads
    if (len(qkv.shape) != 2 or qkv.shape[1] != (num_heads + 2 * kvh) * d
            or (isinstance(qkv, torch.Tensor) and qkv.stride(1) != 1)):
        raise ValueError(f"rope_and_store: qkv {tuple(qkv.shape)} must be [T, {(num_heads + 2 * kvh) * d}] "
                         f"with contiguous rows")
    if positions.shape != (t,):
        raise ValueError(f"rope_and_store: positions has shape {tuple(positions.shape)}, expected ({t},)")
    check_slots(slot_mapping, t)
    q = torch.empty((t, num_heads, d), dtype=qkv.dtype, device=qkv.device)
    if t:
        xp, stride_x, parts, part_stride = input_args(qkv)
        # few tokens: one program per (token, KV head) with that head's queries, so a batch-1 step's RoPE is
        # spread over KV-head-many multiprocessors instead of one; many tokens: one program per token
        progs = kvh if t <= HEAD_SPLIT_MAX_TOKENS and num_heads % kvh == 0 else 1
        qh, kh = num_heads // progs, kvh // progs
        _rope_store_kernel[(t, progs)](xp, stride_x, part_stride, q, positions, cos, sin, slot_mapping, addr.base,
                                       addr.seg_base_ptr, addr.shift, addr.block_stride, addr.base_addr, layer,
                                       H=num_heads, QH=qh, QH_P2=triton.next_power_of_2(qh), KVH=kvh, KH=kh,
                                       KH_P2=triton.next_power_of_2(kh), BS=addr.block_size, D=d,
                                       ELEM_BYTES=addr.elem_bytes, PARTS=parts, DTYPE=tl_dtype(qkv.dtype),
                                       **launch_options(qkv.device))
    return q
