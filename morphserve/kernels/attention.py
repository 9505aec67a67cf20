"""Paged attention in Triton: a prefill kernel (variable lengths, causal, continuing from cached KV) and a
flash-decoding decode kernel (the context split across programs, then merged).

Reference: :func:`morphserve.kernels.reference.paged_attention`.  Both kernels read K/V through the pool's
segment table (:func:`morphserve.kernels.kv_store.kv_row_ptrs`), so blocks of extension segments are read like
base-pool blocks.  Softmax runs in the base-2 domain (``scale * log2(e)`` folded into the scores) with float32
statistics and accumulators; probabilities are cast to the activation dtype before the ``P @ V`` product, as in
FlashAttention.

**Batch layout** (:class:`PagedAttentionMetadata`, all int64 on the device).  Sequence ``s`` owns query rows
``query_start[s]:query_start[s+1]``: the *last* ``n_s`` of its ``context_lens[s]`` cached tokens (the current
step's K/V are stored before attention runs), so query row ``i`` sits at position ``ctx - n_s + i`` and attends to
keys ``0..ctx - n_s + i``.  That covers a whole prompt, a chunk continuing a partly computed prompt, and a single
decode token alike.  ``block_tables[s, j]`` is the global id of the block holding tokens ``j*bs:(j+1)*bs``.

**Prefill** (any batch).  The grid is (query tile, head).  The host builds the tile map (which sequence and which
row offset each tile covers) from the query lengths it already knows, so a step that mixes one long chunk with many
decode rows launches exactly the tiles it needs; an engine step uploads the map with the rest of its metadata.  A
tile stops at its last row's causal bound.

**Decode** (every sequence has one query row).  The grid is (sequence, KV head, split): one program serves all the
query heads of a KV head (GQA groups share each K/V tile; the group is padded to 16 rows for the tensor cores; MHA's
single query row is padded the same way by default, :attr:`DecodeTuning.mha_dot`, or multiplied on the CUDA cores), and
each sequence's context is cut into ``num_splits`` equal ranges rounded to ``BLOCK_N``.  With one split the kernel
writes the output; otherwise each program writes its normalised partial output and log-sum-exp, and
:func:`_decode_reduce_kernel` merges them.  ``num_splits`` depends only on the batch shape (never on the context
lengths), so one CUDA graph per batch size serves every context; a split past the end of a short context writes an
empty partial (log-sum-exp ``-inf``).  A sequence with ``context_lens = 0`` (a padding row) yields zeros.

**RoPE + KV store in the decode launch** (:func:`rope_store_decode`).  Given the QKV projection instead of rotated
queries, each decode program rotates its queries itself, and the program whose split holds the newest key
rotates and stores it before its loop reads it back: one launch fewer per layer than
:func:`~morphserve.kernels.kv_store.rope_and_store` followed by the decode kernel, with the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from morphserve.kernels.kv_store import KVAddress, check_slots, kv_row_ptrs, store_rows
from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.rotary import rope_rotate
from morphserve.kernels.split_accum import Accumulated, input_args, load_input, zero_input
from morphserve.kernels.triton_support import dot_precision, launch_options

PREFILL_BLOCK_M = 64  # query rows per prefill tile (the host's tile map uses it)
PREFILL_BLOCK_N = 64
MAX_DECODE_SPLITS = 16
# Decode steps of the Triton kernel set that split the context run RoPE + KV store inside the decode kernel's launch
# (rope_store_decode; TritonKernels.rope_store_attention says when)
FUSE_ROPE_DECODE = True
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeTuning:
    """Launch parameters of the decode kernel.  ``block_n``: keys per loop iteration; ``prefetch``: resolve the
    next iteration's block addresses (block table, then segment table) before this iteration's arithmetic, so the
    two dependent lookups overlap with compute instead of preceding every K/V load; ``programs_per_sm``: the
    split count aims at this many programs per multiprocessor (:func:`decode_splits`); ``mha_dot``: MHA only (one
    query row per KV head): pad that row with zero rows to 16 so both products run on tensor cores as ``tl.dot``
    (15 of 16 rows wasted, but no float32 conversion and cross-thread reduction per element as on the CUDA cores;
    GQA always uses tensor cores)."""

    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2
    prefetch: bool = False
    programs_per_sm: int = 8
    mha_dot: bool = False


# Chosen by measurement (benchmarks/tune_decode_attention.py on an H200; BENCHMARKS.md, fast path).  MHA: the query
# row padded to 16 rows on tensor cores (mha_dot), 32-key tiles, 3 stages, address prefetch, about 8 programs per SM:
# 1.2-1.8x faster than the best CUDA-core launch at batch 1-128 and within 1% of each setting's best by geometric
# mean (2026-12-02, fourth campaign; batch 64 at 0.96 of the copy rate, against 0.53 on the CUDA cores).  GQA (the
# group's rows on tensor cores): 32-key tiles, 3 stages and the address prefetch, with fewer programs (4 per SM: at
# batch 64, 2 splits were 1.4x slower than 1; second campaign).
DECODE_TUNING = DecodeTuning(num_stages=3, prefetch=True, mha_dot=True)
DECODE_TUNING_GQA = DecodeTuning(num_stages=3, prefetch=True, programs_per_sm=4)


def decode_tuning(group: int) -> DecodeTuning:
    """The shipped launch parameters for query groups of ``group`` heads per KV head (1: MHA)."""
    return DECODE_TUNING if group == 1 else DECODE_TUNING_GQA


@dataclass
class PagedAttentionMetadata:
    """Device-side description of a step's sequences (see the module docstring)."""

    query_start: torch.Tensor  # int64 [S + 1]
    context_lens: torch.Tensor  # int64 [S]
    block_tables: torch.Tensor  # int64 [S, W]
    max_query_len: int
    tile_seq: torch.Tensor | None = None  # int64 [tiles]: prefill tile -> sequence
    tile_start: torch.Tensor | None = None  # int64 [tiles]: prefill tile -> first query row within the sequence
    num_splits: int = 1  # decode context splits

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1

    @staticmethod
    def from_lists(query_start: list[int], context_lens: list[int], block_tables: list[list[int]],
                   device: torch.device | str, num_splits: int = 1) -> "PagedAttentionMetadata":
        """Build from host lists (tests, and batches that arrive without device metadata)."""
        qs = np.asarray(query_start, dtype=np.int64)
        width = max((len(t) for t in block_tables), default=0) or 1
        tables = np.zeros((len(block_tables), width), dtype=np.int64)
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = t
        meta = PagedAttentionMetadata(torch.from_numpy(qs).to(device),
                                      torch.tensor(context_lens, dtype=torch.int64, device=device),
                                      torch.from_numpy(tables).to(device),
                                      int(np.diff(qs).max()) if len(qs) > 1 else 0, num_splits=num_splits)
        if not meta.is_decode:
            meta.tile_seq, meta.tile_start = prefill_tile_map(qs, device)
        return meta


def prefill_tile_map_host(query_start: np.ndarray,
                          block_m: int = PREFILL_BLOCK_M) -> tuple[np.ndarray, np.ndarray]:
    """For each prefill tile, its sequence and its first row within that sequence's query rows (int64 host arrays,
    vectorised).  The engine's steps upload these with the rest of their metadata
    (:meth:`TritonKernels.upload_regions <morphserve.model.kernel_set.TritonKernels.upload_regions>`)."""
    lens = np.diff(query_start)
    tiles = -(-lens // block_m)
    seq = np.repeat(np.arange(len(lens), dtype=np.int64), tiles)
    first = np.repeat(np.cumsum(tiles) - tiles, tiles)
    start = (np.arange(seq.shape[0], dtype=np.int64) - first) * block_m
    return seq, start


def prefill_tile_map(query_start: np.ndarray, device: torch.device | str,
                     block_m: int = PREFILL_BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prefill_tile_map_host` copied to ``device`` by a copy of its own: for batches that arrive without
    device metadata (:meth:`PagedAttentionMetadata.from_lists`); an engine step's map travels in its packed upload
    instead (see :meth:`morphserve.engine.model_runner.ModelRunner.upload`)."""
    seq, start = prefill_tile_map_host(query_start, block_m)
    # One copy for both maps, each row padded to an even length, so the second map starts on a 16-byte boundary as
    # the packed upload's regions do (an unaligned map once compiled new prefill-kernel variants mid-serving, H200,
    # 2026-12-02; the kernel no longer specializes on it, and engine steps no longer come through here).
    n = seq.shape[0]
    both = np.zeros((2, n + (n & 1)), dtype=np.int64)
    both[0, :n], both[1, :n] = seq, start
    dev = torch.from_numpy(both).to(device)
    return dev[0, :n], dev[1, :n]


def decode_splits(num_seqs: int, num_kv_heads: int, num_sms: int, programs_per_sm: int | None = None,
                  group: int = 1) -> int:
    """Context splits for a decode batch: enough programs for ``programs_per_sm`` (default: the shipped tuning's
    for this query ``group``) per multiprocessor, at most :data:`MAX_DECODE_SPLITS`.  A function of the batch shape
    only (see the module docstring), with the batch rounded up to a power of two: the CUDA-graph buckets, so eager
    and graph decode split alike."""
    per_sm = decode_tuning(group).programs_per_sm if programs_per_sm is None else programs_per_sm
    padded = 1 << max(0, num_seqs - 1).bit_length()
    return max(1, min(MAX_DECODE_SPLITS, (per_sm * num_sms) // max(1, padded * num_kv_heads)))


# The block-table width changes step by step, and the per-step metadata pointers are only read element by element:
# neither is specialized (on value 1 / multiples of 16, or on 16-byte alignment), so no step shape compiles a new
# variant in the middle of serving.
@triton.jit(do_not_specialize=["table_stride"],
            do_not_specialize_on_alignment=["qs_ptr", "ctx_ptr", "tables_ptr", "tile_seq_ptr", "tile_start_ptr"])
def _prefill_kernel(q_ptr, out_ptr, qs_ptr, ctx_ptr, tables_ptr, table_stride, tile_seq_ptr, tile_start_ptr,
                    kv_ptr, seg_base_ptr, shift, block_stride, base_addr, layer, scale_log2, H: tl.constexpr,
                    KVH: tl.constexpr, ELEM_BYTES: tl.constexpr,
                    GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    s = tl.load(tile_seq_ptr + tile).to(tl.int32)
    m0 = tl.load(tile_start_ptr + tile).to(tl.int32)
    q_lo = tl.load(qs_ptr + s).to(tl.int32)
    n_q = tl.load(qs_ptr + s + 1).to(tl.int32) - q_lo
    ctx = tl.load(ctx_ptr + s).to(tl.int32)
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < n_q
    qpos = ctx - n_q + rows
    d = tl.arange(0, D)
    q = tl.load(q_ptr + ((q_lo + rows) * H + h)[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    head_off = (layer * 2 * KVH + kvh) * (BS * D)
    kv_end = tl.minimum(ctx, ctx - n_q + m0 + BLOCK_M)
    for n0 in range(0, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < kv_end
        blk = tl.load(tables_ptr + s * table_stride + n // BS, mask=nmask, other=0)
        base = kv_row_ptrs(kv_ptr, seg_base_ptr, blk, head_off + (n % BS) * D, shift, block_stride, base_addr,
                           ELEM_BYTES)
        k = tl.load(base[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(base[:, None] + KVH * BS * D + d[None, :], mask=nmask[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        sc = tl.where((n[None, :] <= qpos[:, None]) & nmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DTYPE), v, input_precision=DOT_PREC)
        m_i = m_new
    pdl_trigger(USE_PDL)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + ((q_lo + rows) * H + h)[:, None] * D + d[None, :], o.to(DTYPE), mask=rmask[:, None])


@triton.jit
def _rope_rows(row, heads, hmask, cos, sin, part_stride, D: tl.constexpr, PARTS: tl.constexpr, DTYPE: tl.constexpr):
    """Heads ``heads`` (``[R]``, rows ``hmask``) of the projection row ``row`` (or its accumulated sums) rotated at
    ``cos``/``sin`` (``[1, D]``), rounded as :func:`morphserve.kernels.kv_store.rope_and_store` rounds them."""
    d = tl.arange(0, D)[None, :]
    x = load_input(row, heads[:, None] * D + d, hmask[:, None], PARTS, part_stride, DTYPE)
    xp = load_input(row, heads[:, None] * D + (d + D // 2) % D, hmask[:, None], PARTS, part_stride, DTYPE)
    return rope_rotate(x, xp, cos, sin, d, D // 2).to(DTYPE)


@triton.jit
def _zero_qkv_heads(row, part_stride, q_heads, q_mask, kv_heads, kv_mask, H: tl.constexpr, KVH: tl.constexpr,
                    D: tl.constexpr, PARTS: tl.constexpr):
    """Zero the accumulated sums (``PARTS > 0``) of query heads ``q_heads`` and of the keys and values of KV heads
    ``kv_heads`` in the projection row ``row`` (:func:`morphserve.kernels.split_accum.zero_input`)."""
    d = tl.arange(0, D)[None, :]
    zero_input(row, q_heads[:, None] * D + d, q_mask[:, None], PARTS, part_stride)
    zero_input(row, (H + kv_heads)[:, None] * D + d, kv_mask[:, None], PARTS, part_stride)
    zero_input(row, (H + KVH + kv_heads)[:, None] * D + d, kv_mask[:, None], PARTS, part_stride)


@triton.jit(do_not_specialize=["table_stride"], do_not_specialize_on_alignment=["ctx_ptr", "tables_ptr"])  # as prefill
def _decode_kernel(q_ptr, out_ptr, part_o_ptr, part_lse_ptr, ctx_ptr, tables_ptr, table_stride, kv_ptr,
                   seg_base_ptr, shift, block_stride, base_addr, layer, scale_log2, num_splits, stride_q,
                   part_stride, pos_ptr, cos_ptr, sin_ptr, slot_ptr, H: tl.constexpr,
                   KVH: tl.constexpr, ELEM_BYTES: tl.constexpr,
                   GROUP: tl.constexpr, GROUP_P2: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr, DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                   ROPE: tl.constexpr, PARTS: tl.constexpr, USE_PDL: tl.constexpr):
    # ROPE: q_ptr is the QKV projection (rows stride_q apart; PARTS > 0: accumulated sums), see rope_store_decode
    pdl_wait(USE_PDL)
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + s).to(tl.int32)
    per = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, ctx)
    g = tl.arange(0, GROUP_P2)
    gmask = g < GROUP
    head = kvh * GROUP + g
    d = tl.arange(0, D)
    if ROPE:  # RoPE fused (rope_store_decode): the queries rotated from the projection row
        qkv_row = q_ptr + s * stride_q
        pos = tl.load(pos_ptr + s)
        cos = tl.load(cos_ptr + pos * D + d[None, :])
        sin = tl.load(sin_ptr + pos * D + d[None, :])
        q = _rope_rows(qkv_row, head, gmask, cos, sin, part_stride, D, PARTS, DTYPE)
        if (start < end) & (end == ctx):  # this split holds the newest key (position ctx - 1): store it first
            slot = tl.load(slot_ptr + s)
            if slot >= 0:
                kvh1 = kvh + tl.zeros([1], tl.int32)
                one = kvh1 == kvh
                k = _rope_rows(qkv_row + H * D, kvh1, one, cos, sin, part_stride, D, PARTS, DTYPE)
                v = load_input(qkv_row + (H + KVH) * D, kvh1[:, None] * D + d[None, :], one[:, None], PARTS,
                               part_stride, DTYPE)
                store_rows(kv_ptr, seg_base_ptr, shift, block_stride, base_addr, slot, layer, k, v, kvh1,
                           one[:, None], KVH, BS, D, ELEM_BYTES)
            # the loop below reads that key back from the cache: a CTA barrier orders the program's global
            # stores before its loads
            tl.debug_barrier()
    else:
        q = tl.load(q_ptr + (s * H + head)[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, D], tl.float32)
    head_off = (layer * 2 * KVH + kvh) * (BS * D)
    if PREFETCH:  # the first iteration's addresses
        n_next = start + tl.arange(0, BLOCK_N)
        blk_next = tl.load(tables_ptr + s * table_stride + n_next // BS, mask=n_next < end, other=0)
        base_next = kv_row_ptrs(kv_ptr, seg_base_ptr, blk_next, head_off + (n_next % BS) * D, shift, block_stride,
                                base_addr, ELEM_BYTES)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        if PREFETCH:  # addresses resolved during the previous iteration
            base = base_next
        else:
            blk = tl.load(tables_ptr + s * table_stride + n // BS, mask=nmask, other=0)
            base = kv_row_ptrs(kv_ptr, seg_base_ptr, blk, head_off + (n % BS) * D, shift, block_stride, base_addr,
                               ELEM_BYTES)
        k = tl.load(base[:, None] + d[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(base[:, None] + KVH * BS * D + d[None, :], mask=nmask[:, None], other=0.0)
        if PREFETCH:
            n_next = n + BLOCK_N
            blk_next = tl.load(tables_ptr + s * table_stride + n_next // BS, mask=n_next < end, other=0)
            base_next = kv_row_ptrs(kv_ptr, seg_base_ptr, blk_next, head_off + (n_next % BS) * D, shift,
                                    block_stride, base_addr, ELEM_BYTES)
        if GROUP_P2 == 1:  # MHA on CUDA cores: one query row (a [1, D] x [D, N] product is a dot per key)
            sc = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale_log2
        else:  # tensor cores: the group's rows (GQA), or MHA's one row (mha_dot), padded to 16 rows
            sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        sc = tl.where(nmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if GROUP_P2 == 1:
            pv = tl.sum(p.to(DTYPE).to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        else:
            pv = tl.dot(p.to(DTYPE), v, input_precision=DOT_PREC)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    pdl_trigger(USE_PDL)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if num_splits == 1:
        tl.store(out_ptr + (s * H + head)[:, None] * D + d[None, :], o.to(DTYPE), mask=gmask[:, None])
        if ROPE:  # the only reader of its heads' accumulated sums: zero them (with splits, the merge does)
            kvh1 = kvh + tl.zeros([1], tl.int32)
            _zero_qkv_heads(q_ptr + s * stride_q, part_stride, head, gmask, kvh1, kvh1 == kvh, H, KVH, D, PARTS)
    else:
        row = (s * H + head) * num_splits + split
        tl.store(part_o_ptr + row[:, None] * D + d[None, :], o, mask=gmask[:, None])
        lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))
        tl.store(part_lse_ptr + row, tl.where(l_i > 0, lse, float("-inf")), mask=gmask)


@triton.jit
def _decode_reduce_kernel(out_ptr, part_o_ptr, part_lse_ptr, num_splits, qkv_ptr, stride_qkv, part_stride,
                          H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, SPLITS_P2: tl.constexpr,
                          DTYPE: tl.constexpr, PARTS: tl.constexpr, USE_PDL: tl.constexpr):
    # PARTS > 0: the decode programs read the accumulated sums of a fused-RoPE projection (rope_store_decode);
    # all of them have completed, so each merge program zeroes its query head (and KV head h < KVH)
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    s = tl.program_id(0)
    h = tl.program_id(1)
    if PARTS > 0:
        h1 = h + tl.zeros([1], tl.int32)
        _zero_qkv_heads(qkv_ptr + s * stride_qkv, part_stride, h1, h1 == h, h1, h1 < KVH, H, KVH, D, PARTS)
    j = tl.arange(0, SPLITS_P2)
    jmask = j < num_splits
    row = (s * H + h) * num_splits + j
    lse = tl.load(part_lse_ptr + row, mask=jmask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    d = tl.arange(0, D)
    o = tl.load(part_o_ptr + row[:, None] * D + d[None, :], mask=jmask[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + (s * H + h) * D + d, res.to(DTYPE))


def _check(q: torch.Tensor, addr: KVAddress, meta: PagedAttentionMetadata) -> tuple[int, int, int]:
    if q.dim() != 3 or not q.is_contiguous() or q.shape[2] != addr.head_dim or q.shape[1] % addr.num_kv_heads:
        raise ValueError(f"paged attention expects contiguous q [T, heads, {addr.head_dim}] with heads a multiple "
                         f"of {addr.num_kv_heads} KV heads, got {tuple(q.shape)}")
    t, heads, d = q.shape
    return t, heads, d


def paged_attention_prefill(q: torch.Tensor, addr: KVAddress, layer: int, meta: PagedAttentionMetadata,
                            scale: float) -> torch.Tensor:
    """Causal paged attention for any batch (see the module docstring); ``q``: ``[T, heads, head_dim]``
    contiguous, rotated.  Returns ``[T, heads * head_dim]``."""
    t, heads, d = _check(q, addr, meta)
    if meta.tile_seq is None or meta.tile_start is None:
        raise ValueError("prefill attention needs the tile map (PagedAttentionMetadata.tile_seq/tile_start)")
    out = torch.empty((t, heads * d), dtype=q.dtype, device=q.device)
    tiles = meta.tile_seq.shape[0]
    if tiles:
        _prefill_kernel[(tiles, heads)](
            q, out, meta.query_start, meta.context_lens, meta.block_tables, meta.block_tables.stride(0),
            meta.tile_seq, meta.tile_start, addr.base, addr.seg_base_ptr, addr.shift, addr.block_stride,
            addr.base_addr, layer, scale * LOG2E, H=heads, KVH=addr.num_kv_heads, ELEM_BYTES=addr.elem_bytes,
            GROUP=heads // addr.num_kv_heads, D=d,
            BS=addr.block_size, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, DTYPE=addr.dtype,
            DOT_PREC=dot_precision(q.dtype), num_warps=4 if d <= 64 else 8, num_stages=2, **launch_options(q.device))
    return out


def paged_attention_decode(q: torch.Tensor, addr: KVAddress, layer: int, meta: PagedAttentionMetadata,
                           scale: float, tuning: DecodeTuning | None = None) -> torch.Tensor:
    """Flash-decoding over the paged cache for batches of one query row per sequence (``q``: ``[S, heads,
    head_dim]``, row ``s`` belongs to sequence ``s``); ``meta.num_splits`` context splits; ``tuning``: launch
    parameters (default :func:`decode_tuning` of the query group).  Returns ``[S, heads * head_dim]``."""
    t, heads, _ = _check(q, addr, meta)
    return _decode(q, t, heads, q.dtype, addr, layer, meta, scale, tuning, None)


def rope_store_decode(qkv: "torch.Tensor | Accumulated", num_heads: int, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, addr: KVAddress, layer: int, slot_mapping: torch.Tensor,
                      meta: PagedAttentionMetadata, scale: float, tuning: DecodeTuning | None = None) -> torch.Tensor:
    """:func:`morphserve.kernels.kv_store.rope_and_store` followed by :func:`paged_attention_decode`, in the decode
    kernel's launch: from the fused projection ``qkv`` (``[S, (heads + 2 * kv_heads) * head_dim]``, rows
    contiguous, or its accumulated sums, :mod:`morphserve.kernels.split_accum`), every program rotates its queries
    itself, and the program whose split holds a sequence's newest key (position ``context_lens[s] - 1``) rotates
    that key and stores it with its value at ``slot_mapping[s]`` (negative: skipped) before reading it back with
    the rest.  Same bits as the two kernels; one launch fewer per layer.  Accumulated sums are zeroed by the merge
    kernel (every decode program has completed by then), or by the one program of a (sequence, KV head) with a
    single split.  Returns ``[S, heads * head_dim]``."""
    t = qkv.shape[0]
    d, kvh = addr.head_dim, addr.num_kv_heads
    if (len(qkv.shape) != 2 or num_heads % kvh or qkv.shape[1] != (num_heads + 2 * kvh) * d
            or (isinstance(qkv, torch.Tensor) and qkv.stride(1) != 1)):
        raise ValueError(f"rope_store_decode: qkv {tuple(qkv.shape)} must be [S, {(num_heads + 2 * kvh) * d}] with "
                         f"contiguous rows, and {num_heads} heads a multiple of {kvh} KV heads")
    if positions.shape != (t,) or cos.shape[-1] != d or sin.shape != cos.shape or cos.dtype != qkv.dtype:
        raise ValueError(f"rope_store_decode: positions {tuple(positions.shape)} (expected ({t},)) or cos/sin "
                         f"{tuple(cos.shape)} {cos.dtype} (expected [max_position, {d}] {qkv.dtype}) do not match")
    check_slots(slot_mapping, t)
    src, stride, parts, part_stride = input_args(qkv)
    return _decode(src, t, num_heads, qkv.dtype, addr, layer, meta, scale, tuning,
                   _RopeInput(stride, part_stride, parts, positions, cos, sin, slot_mapping))


class _RopeInput(NamedTuple):
    """What the decode launch of :func:`rope_store_decode` reads besides the projection (``src``)."""

    row_stride: int  # between the projection's rows (or its accumulator's)
    part_stride: int  # between accumulated parts (split_accum.input_args)
    parts: int  # 0: a plain tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor


def _decode(src: torch.Tensor, t: int, heads: int, dtype: torch.dtype, addr: KVAddress, layer: int,
            meta: PagedAttentionMetadata, scale: float, tuning: DecodeTuning | None,
            rope: "_RopeInput | None") -> torch.Tensor:
    """The decode launch of :func:`paged_attention_decode` (``rope`` None: ``src`` is the rotated queries) and of
    :func:`rope_store_decode` (``src`` is the projection or its accumulator)."""
    tuning = tuning or decode_tuning(heads // addr.num_kv_heads)
    if tuning.block_n < 16 or tuning.block_n & (tuning.block_n - 1):
        raise ValueError(f"decode block_n must be a power of two >= 16, got {tuning.block_n}")
    if t != meta.num_seqs or not meta.is_decode:
        raise ValueError(f"decode attention needs one query row per sequence: {t} rows for {meta.num_seqs} "
                         f"sequences (max query length {meta.max_query_len})")
    splits = meta.num_splits
    if not 1 <= splits <= MAX_DECODE_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_DECODE_SPLITS}], got {splits}")
    d = addr.head_dim
    out = torch.empty((t, heads * d), dtype=dtype, device=src.device)
    if not t:
        return out
    kvh = addr.num_kv_heads
    group = heads // kvh
    # query rows per program: MHA's one row on the CUDA cores, or the group padded to 16 rows for the tensor cores
    group_rows = 1 if group == 1 and not tuning.mha_dot else max(16, triton.next_power_of_2(group))
    if splits > 1:
        part_o = torch.empty((t, heads, splits, d), dtype=torch.float32, device=src.device)
        part_lse = torch.empty((t, heads, splits), dtype=torch.float32, device=src.device)
    else:
        part_o = part_lse = out  # unused
    rope_args = rope or _RopeInput(0, 0, 0, out, out, out, out)  # unused without ROPE
    opts = launch_options(src.device)
    _decode_kernel[(t, kvh, splits)](
        src, out, part_o, part_lse, meta.context_lens, meta.block_tables, meta.block_tables.stride(0), addr.base,
        addr.seg_base_ptr, addr.shift, addr.block_stride, addr.base_addr, layer, scale * LOG2E, splits,
        rope_args.row_stride, rope_args.part_stride, rope_args.positions, rope_args.cos, rope_args.sin,
        rope_args.slots, H=heads, KVH=kvh, ELEM_BYTES=addr.elem_bytes,
        GROUP=group, GROUP_P2=group_rows, D=d, BS=addr.block_size,
        BLOCK_N=tuning.block_n, PREFETCH=tuning.prefetch, DTYPE=addr.dtype, DOT_PREC=dot_precision(dtype),
        ROPE=rope is not None, PARTS=rope_args.parts, num_warps=tuning.num_warps, num_stages=tuning.num_stages,
        **opts)
    if splits > 1:
        _decode_reduce_kernel[(t, heads)](out, part_o, part_lse, splits, src, rope_args.row_stride,
                                          rope_args.part_stride, H=heads, KVH=kvh, D=d,
                                          SPLITS_P2=triton.next_power_of_2(MAX_DECODE_SPLITS), DTYPE=addr.dtype,
                                          PARTS=rope_args.parts, num_warps=4, **opts)
    return out


def paged_attention(q: torch.Tensor, addr: KVAddress, layer: int, meta: PagedAttentionMetadata,
                    scale: float) -> torch.Tensor:
    """The decode kernel when every sequence has one query row, else the prefill kernel."""
    if meta.is_decode:
        return paged_attention_decode(q, addr, layer, meta, scale)
    return paged_attention_prefill(q, addr, layer, meta, scale)


def attention_flops(query_lens: list[int], context_lens: list[int], num_heads: int, head_dim: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of causal attention for one layer: ``QK^T`` and ``PV`` over each query
    row's visible keys."""
    total = 0.0
    for n, ctx in zip(query_lens, context_lens):
        first = ctx - n + 1  # keys visible to the first query row
        keys = n * (first + ctx) / 2  # sum over rows of visible keys
        total += 4.0 * keys * head_dim * num_heads
    return total

