"""Triton KV store and paged attention against the pure-PyTorch references, on a pool whose blocks are spread
over the base pool and an extension segment carved from foreign bytes (interleaved block ids).

Runs compiled on CUDA, or under the Triton interpreter on CPU (shapes kept tiny).  The interpreter run is also the
check that an int64 read from the segment table can be cast to a pointer and dereferenced there.
"""

import random

import pytest
import torch

if not torch.cuda.is_available():
    from morphserve.kernels.triton_support import enable_interpreter

    enable_interpreter()

from morphserve.kernels import reference as ref  # noqa: E402
from morphserve.kernels.attention import (DecodeTuning, PagedAttentionMetadata, attention_flops,  # noqa: E402
                                          decode_splits, decode_tuning, paged_attention, paged_attention_decode,
                                          paged_attention_prefill, prefill_tile_map, rope_store_decode)
from morphserve.kernels import kv_store  # noqa: E402
from morphserve.kernels.kv_store import KVAddress, rope_and_store, store_kv  # noqa: E402
from morphserve.memory.kv_pool import KVPool  # noqa: E402
from morphserve.model.config import ModelConfig  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BS = 8
# (heads, kv_heads, head_dim): MHA and GQA (group 4 and a non-power-of-two group 3), head dims 64 and 128
SHAPES = [(4, 4, 64), (8, 2, 128), (6, 2, 64)]
TOL = {torch.float32: 2e-5, torch.float16: 2e-2}


def _pool(heads, kv_heads, head_dim, dtype, base_blocks=24, ext_blocks=24):
    cfg = ModelConfig(name="t", vocab_size=32, hidden_size=heads * head_dim, intermediate_size=32, num_layers=2,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=512)
    pool = KVPool(cfg, base_blocks, BS, dtype, DEV, max_segment_blocks=64)
    raw = torch.zeros(ext_blocks * pool.block_bytes + 300, dtype=torch.uint8, device=DEV)  # foreign bytes
    pool.attach(2, pool.segment_from_bytes(raw), "layer:1")
    ids = [i for pair in zip(pool.block_ids(0), pool.block_ids(2)) for i in pair]  # base, ext, base, ext...
    return pool, raw, ids


def _tables(ids, ctx_lens, seed=0):
    rng = random.Random(seed)
    free = list(ids)
    rng.shuffle(free)
    tables = []
    for ctx in ctx_lens:
        n = -(-ctx // BS)
        tables.append([free.pop() for _ in range(n)])
    return tables


def _randomize(pool):
    g = torch.Generator(device=DEV).manual_seed(1)
    for seg in pool.segments.values():
        seg.tensor.copy_(torch.randn(seg.tensor.shape, generator=g, device=DEV).to(pool.dtype))


def _close(a, b, dtype):
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item() + 1e-6
    assert err <= TOL[dtype] * max(1.0, scale), (err, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_across_segments(dtype):
    pool, raw, ids = _pool(4, 2, 64, dtype)
    tables = [ids[:3]]  # base, extension, base
    n = 19
    slots = torch.tensor([tables[0][p // BS] * BS + p % BS for p in range(n)], device=DEV)
    k = torch.randn(n, 2, 64, device=DEV).to(dtype)
    v = torch.randn(n, 2, 64, device=DEV).to(dtype)
    addr = KVAddress.of(pool)
    store_kv(k, v, addr, 1, slots)
    k2, v2 = pool.gather(1, torch.tensor(tables[0], device=DEV), n)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert raw.abs().sum() > 0  # the foreign bytes hold data
    assert torch.count_nonzero(pool.segments[0].tensor[:, 0]) == 0  # layer 0 untouched
    # a negative slot is skipped (padding rows of a CUDA-graph batch)
    before = [s.tensor.clone() for s in pool.segments.values()]
    store_kv(k[:2], v[:2], addr, 0, torch.tensor([-1, -1], device=DEV))
    assert all(torch.equal(b, s.tensor) for b, s in zip(before, pool.segments.values()))


@pytest.mark.parametrize("split_heads", [True, False])  # a program per (token, KV head), or per token
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES + [(9, 3, 64)])  # + SmolLM2's 3 queries per KV head
def test_rope_and_store_matches_reference(heads, kv_heads, head_dim, split_heads, monkeypatch):
    monkeypatch.setattr(kv_store, "HEAD_SPLIT_MAX_TOKENS", 64 if split_heads else 0)
    dtype = torch.float16
    pool, _, ids = _pool(heads, kv_heads, head_dim, dtype)
    ref_pool, _, _ = _pool(heads, kv_heads, head_dim, dtype)
    n = 11
    table = _tables(ids, [n])[0]
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(n)], device=DEV)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, device=DEV).to(dtype)
    positions = torch.arange(3, 3 + n, device=DEV)
    cos = torch.randn(64, head_dim, device=DEV).to(dtype)
    sin = torch.randn(64, head_dim, device=DEV).to(dtype)
    q = rope_and_store(qkv, heads, positions, cos, sin, KVAddress.of(pool), 1, slots)
    qs, ks = heads * head_dim, kv_heads * head_dim
    q_ref = ref.rotary(qkv[:, :qs].view(n, heads, head_dim), cos[positions], sin[positions])
    k_ref = ref.rotary(qkv[:, qs:qs + ks].view(n, kv_heads, head_dim), cos[positions], sin[positions])
    v_ref = qkv[:, qs + ks:].view(n, kv_heads, head_dim)
    ref_pool.store(1, k_ref, v_ref, slots)
    # RoPE is x*cos + rot*sin: the GPU may fuse one product into the add (one rounding fewer than PyTorch), so
    # compare against the largest magnitude rather than bit for bit
    eps = torch.finfo(dtype).eps
    assert (q.float() - q_ref.float()).abs().max() <= 2 * eps * q_ref.float().abs().max()
    ids_t = torch.tensor(table, device=DEV)
    k_got, v_got = pool.gather(1, ids_t, n)
    k_want, v_want = ref_pool.gather(1, ids_t, n)
    assert (k_got.float() - k_want.float()).abs().max() <= 2 * eps * k_want.float().abs().max()
    assert torch.equal(v_got, v_want)  # values are stored as they are


@pytest.mark.parametrize("split_heads", [True, False])
@pytest.mark.parametrize("skip_slot", [False, True])
def test_rope_and_store_reads_accumulated_sums_bit_for_bit(skip_slot, split_heads, monkeypatch):
    """Given a projection's accumulated float32 sums (split_accum.Accumulated), rope_and_store gives the bits of
    the same sums rounded first: the queries and the stored keys and values.  It zeroes the whole row afterwards,
    also for a token whose slot is negative (no KV write), so the buffer is ready for the next product."""
    from morphserve.kernels.split_accum import Accumulated

    monkeypatch.setattr(kv_store, "HEAD_SPLIT_MAX_TOKENS", 64 if split_heads else 0)
    heads, kv_heads, head_dim, dtype = 6, 2, 64, torch.float16
    got_pool, _, ids = _pool(heads, kv_heads, head_dim, dtype)
    want_pool, _, _ = _pool(heads, kv_heads, head_dim, dtype)
    table = _tables(ids, [1])[0]
    slots = torch.tensor([-1 if skip_slot else table[0] * BS + 0], device=DEV)
    acc = torch.randn(2, 1, (heads + 2 * kv_heads) * head_dim, device=DEV)  # two pairs of splits
    plain = (acc[0] + acc[1]).to(dtype)
    positions = torch.tensor([5], device=DEV)
    cos, sin = torch.randn(16, head_dim, device=DEV).to(dtype), torch.randn(16, head_dim, device=DEV).to(dtype)
    q_got = rope_and_store(Accumulated(acc, dtype), heads, positions, cos, sin, KVAddress.of(got_pool), 1, slots)
    q_want = rope_and_store(plain, heads, positions, cos, sin, KVAddress.of(want_pool), 1, slots)
    assert torch.equal(q_got, q_want) and torch.count_nonzero(acc).item() == 0
    ids_t = torch.tensor(table, device=DEV)
    assert all(torch.equal(a, b) for a, b in zip(got_pool.gather(1, ids_t, 1), want_pool.gather(1, ids_t, 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
def test_prefill_matches_reference(heads, kv_heads, head_dim, dtype):
    pool, _, ids = _pool(heads, kv_heads, head_dim, dtype)
    _randomize(pool)
    # (context, new query rows): a whole prompt, a chunk continuing a cached prefix, a decode row in a mixed
    # batch, and a prompt longer than one query tile and one key tile
    if DEV == "cpu":
        seqs = [(13, 13), (21, 6), (9, 1), (70, 70)]
    else:
        seqs = [(13, 13), (21, 6), (9, 1), (70, 70), (200, 130)]
    ctx_lens = [c for c, _ in seqs]
    tables = _tables(ids, ctx_lens)
    qs = [0]
    for _, n in seqs:
        qs.append(qs[-1] + n)
    q = torch.randn(qs[-1], heads, head_dim, device=DEV).to(dtype)
    meta = PagedAttentionMetadata.from_lists(qs, ctx_lens, tables, DEV)
    assert not meta.is_decode and meta.tile_seq is not None
    scale = head_dim ** -0.5
    for layer in (0, 1):
        got = paged_attention_prefill(q, KVAddress.of(pool), layer, meta, scale)
        want = ref.paged_attention(q, pool, layer, qs, ctx_lens, tables, scale)
        _close(got, want, dtype)
    assert torch.equal(paged_attention(q, KVAddress.of(pool), 1, meta, scale), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
def test_decode_matches_reference_for_every_split(heads, kv_heads, head_dim, dtype):
    pool, _, ids = _pool(heads, kv_heads, head_dim, dtype)
    _randomize(pool)
    ctx_lens = [1, 9, 70, 16]  # shorter than, equal to and longer than the split ranges
    tables = _tables(ids, ctx_lens, seed=3)
    qs = list(range(len(ctx_lens) + 1))
    q = torch.randn(len(ctx_lens), heads, head_dim, device=DEV).to(dtype)
    scale = head_dim ** -0.5
    want = ref.paged_attention(q, pool, 1, qs, ctx_lens, tables, scale)
    for splits in (1, 3, 16):
        meta = PagedAttentionMetadata.from_lists(qs, ctx_lens, tables, DEV, num_splits=splits)
        assert meta.is_decode
        got = paged_attention_decode(q, KVAddress.of(pool), 1, meta, scale)
        _close(got, want, dtype)


@pytest.mark.parametrize("accumulated", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES + [(9, 3, 64)])
def test_rope_store_decode_gives_the_bits_of_the_two_kernels(heads, kv_heads, head_dim, accumulated):
    """The fused decode launch (RoPE + KV store inside the decode kernel) against rope_and_store followed by
    paged_attention_decode, for 1, 3 and 16 splits: the same output bits and the same cache bytes, including a
    sequence whose newest key lands on a block boundary, a one-token context, and a padding row (negative slot:
    nothing stored, the cache read as it is).  Accumulated sums (split_accum) are rounded like the plain
    projection and zeroed afterwards, by the merge kernel or, with one split, by the decode program."""
    from morphserve.kernels.split_accum import Accumulated

    dtype = torch.float16
    ctx_lens = [1, 9, 70, 16]
    cos = torch.randn(80, head_dim, device=DEV).to(dtype)
    sin = torch.randn(80, head_dim, device=DEV).to(dtype)
    positions = torch.tensor(ctx_lens, device=DEV) - 1
    width = (heads + 2 * kv_heads) * head_dim
    for splits in (1, 3, 16):
        got_pool, _, ids = _pool(heads, kv_heads, head_dim, dtype)
        want_pool, _, _ = _pool(heads, kv_heads, head_dim, dtype)
        _randomize(got_pool)
        _randomize(want_pool)
        tables = _tables(ids, ctx_lens, seed=splits)
        slots = [t[(c - 1) // BS] * BS + (c - 1) % BS for t, c in zip(tables, ctx_lens)]
        slots[2] = -1  # a padding row: its newest key is not stored
        slots = torch.tensor(slots, device=DEV)
        meta = PagedAttentionMetadata.from_lists(list(range(len(ctx_lens) + 1)), ctx_lens, tables, DEV,
                                                 num_splits=splits)
        acc = torch.randn(2, len(ctx_lens), width, device=DEV)
        plain = (acc[0] + acc[1]).to(dtype)
        q = rope_and_store(plain, heads, positions, cos, sin, KVAddress.of(want_pool), 1, slots)
        want = paged_attention_decode(q, KVAddress.of(want_pool), 1, meta, head_dim ** -0.5)
        got = rope_store_decode(Accumulated(acc, dtype) if accumulated else plain, heads, positions, cos, sin,
                                KVAddress.of(got_pool), 1, slots, meta, head_dim ** -0.5)
        assert torch.equal(got, want), splits
        assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(got_pool.segments.values(),
                                                                    want_pool.segments.values())), splits
        if accumulated:
            assert torch.count_nonzero(acc).item() == 0, splits


def test_rope_store_decode_rejects_mismatched_inputs():
    pool, _, ids = _pool(4, 2, 64, torch.float16)
    meta = PagedAttentionMetadata.from_lists([0, 1], [3], [ids[:1]], DEV)
    cos = torch.zeros(8, 64, device=DEV, dtype=torch.float16)
    pos, slots = torch.tensor([2], device=DEV), torch.tensor([2], device=DEV)
    qkv = torch.zeros(1, 8 * 64, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"qkv \(1, 448\) must be \[S, 512\]"):
        rope_store_decode(qkv[:, :-64].contiguous(), 4, pos, cos, cos, KVAddress.of(pool), 0, slots, meta, 1.0)
    with pytest.raises(ValueError, match="positions"):
        rope_store_decode(qkv, 4, pos[:0], cos, cos, KVAddress.of(pool), 0, slots, meta, 1.0)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_store_decode(qkv, 4, pos, cos, cos, KVAddress.of(pool), 0, slots.int(), meta, 1.0)


@pytest.mark.parametrize("tuning", [DecodeTuning(block_n=16, prefetch=True), DecodeTuning(block_n=32, prefetch=True),
                                    DecodeTuning(block_n=128, num_warps=8, num_stages=3, prefetch=False),
                                    DecodeTuning(block_n=32, mha_dot=True), DecodeTuning(block_n=64, mha_dot=True,
                                                                                         prefetch=True)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (6, 2, 64)])
def test_decode_tunings_match_reference(heads, kv_heads, head_dim, tuning):
    """Every launch variant the tuner may choose (address prefetch, other key tiles) gives the reference result,
    with contexts ending inside a tile, on a tile boundary and past several blocks."""
    dtype = torch.float16
    pool, _, ids = _pool(heads, kv_heads, head_dim, dtype)
    _randomize(pool)
    ctx_lens = [1, 32, 70, 17]
    tables = _tables(ids, ctx_lens, seed=5)
    qs = list(range(len(ctx_lens) + 1))
    q = torch.randn(len(ctx_lens), heads, head_dim, device=DEV).to(dtype)
    want = ref.paged_attention(q, pool, 0, qs, ctx_lens, tables, 0.125)
    for splits in (1, 3):
        meta = PagedAttentionMetadata.from_lists(qs, ctx_lens, tables, DEV, num_splits=splits)
        _close(paged_attention_decode(q, KVAddress.of(pool), 0, meta, 0.125, tuning), want, dtype)


def test_decode_empty_context_rows_are_zero_and_segments_attached_later_are_read():
    dtype = torch.float32
    pool, _, ids = _pool(4, 2, 64, dtype)
    _randomize(pool)
    addr = KVAddress.of(pool)
    # a segment attached after the address bundle was built is reached through the same table
    raw = torch.zeros(3 * pool.block_bytes + 256, dtype=torch.uint8, device=DEV)
    pool.attach(1, pool.segment_from_bytes(raw), "layer:0")
    pool.segments[1].tensor.normal_()
    late = list(pool.block_ids(1))
    ctx_lens = [0, 20, 0]
    tables = [[], [late[2], ids[0], late[0]], []]
    qs = [0, 1, 2, 3]
    q = torch.randn(3, 4, 64, device=DEV)
    for splits in (1, 4):
        meta = PagedAttentionMetadata.from_lists(qs, ctx_lens, tables, DEV, num_splits=splits)
        got = paged_attention_decode(q, addr, 0, meta, 0.125)
        assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))
        want = ref.paged_attention(q[1:2], pool, 0, [0, 1], [20], [tables[1]], 0.125)
        _close(got[1:2], want, dtype)


def test_metadata_and_helpers():
    tile_seq, tile_start = prefill_tile_map(torch.tensor([0, 3, 3 + 130, 3 + 130 + 1]).numpy(), "cpu", 64)
    assert tile_seq.tolist() == [0, 1, 1, 1, 2] and tile_start.tolist() == [0, 0, 64, 128, 0]
    # both maps start on 16-byte boundaries for odd and even tile counts (Triton specializes pointers on it)
    for qs in ([0, 3, 3 + 130, 3 + 130 + 1], [0, 3, 3 + 130]):
        maps = prefill_tile_map(torch.tensor(qs).numpy(), "cpu", 64)
        assert all(t.data_ptr() % 16 == 0 for t in maps), [t.data_ptr() % 16 for t in maps]
    assert decode_splits(1, 32, 132, 2) == 8 and decode_splits(256, 8, 132, 2) == 1 and decode_splits(1, 1, 132, 2) == 16
    assert decode_splits(1, 32, 132) == 16 and decode_splits(8, 32, 132) == 4 and decode_splits(32, 32, 132) == 1
    # GQA (group 4, 8 KV heads): 4 programs per SM, so batch 64 runs unsplit (measured 1.4x faster than 2 splits)
    assert decode_splits(64, 8, 132, group=4) == 1 and decode_splits(8, 8, 132, group=4) == 8
    assert decode_tuning(1).mha_dot and decode_tuning(1).programs_per_sm == 8 and decode_tuning(4).programs_per_sm == 4
    # causal FLOPs: a 4-token prompt sees 1+2+3+4 keys; one decode row at context 10 sees 10
    assert attention_flops([4, 1], [4, 10], 2, 8) == 4.0 * (10 + 10) * 8 * 2
    with pytest.raises(ValueError, match="one query row per sequence"):
        pool, _, ids = _pool(4, 4, 64, torch.float32)
        meta = PagedAttentionMetadata.from_lists([0, 2], [2], [[ids[0]]], DEV)
        paged_attention_decode(torch.zeros(2, 4, 64, device=DEV), KVAddress.of(pool), 0, meta, 1.0)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 48"):
        meta = PagedAttentionMetadata.from_lists([0, 1], [2], [[ids[0]]], DEV)
        paged_attention_decode(torch.zeros(1, 4, 64, device=DEV), KVAddress.of(pool), 0, meta, 1.0,
                               DecodeTuning(block_n=48))
    assert decode_splits(8, 32, 132, programs_per_sm=8) == 4 and decode_splits(64, 32, 132, programs_per_sm=8) == 1
    with pytest.raises(ValueError, match="num_splits"):
        meta = PagedAttentionMetadata.from_lists([0, 1], [2], [[ids[0]]], DEV, num_splits=99)
        paged_attention_decode(torch.zeros(1, 4, 64, device=DEV), KVAddress.of(pool), 0, meta, 1.0)
