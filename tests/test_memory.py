"""Weight arena layout, KV pool segment addressing and the block manager."""

import pytest
import torch

from morphserve.memory.block_manager import BlockManager
from morphserve.memory.kv_pool import KVPool
from morphserve.memory.weight_arena import ALIGN, Precision, WeightArena, fp16_layout
from morphserve.model.config import ARCHITECTURES, ModelConfig

CFG = ModelConfig(name="t", vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512)


def test_slot_views_are_contiguous_aligned_and_inside_their_slot():
    arena = WeightArena(CFG, torch.float32, "cpu")
    layout = fp16_layout(CFG, torch.float32)
    assert arena.slot_bytes == layout.nbytes
    for i, lw in enumerate(arena.layers):
        base = arena.slot(i).data_ptr()
        assert lw.precision is Precision.FP16
        for spec in layout.specs:
            t = lw[spec.name]
            assert t.is_contiguous() and tuple(t.shape) == spec.shape
            assert t.data_ptr() - base == spec.offset and spec.offset % ALIGN == 0
            assert base <= t.data_ptr() and t.data_ptr() + spec.nbytes <= base + arena.slot_bytes
    # writing through a view writes the slot's bytes (no copies anywhere)
    arena.layers[1]["down"].fill_(3.0)
    spec = {s.name: s for s in layout.specs}["down"]
    assert torch.all(arena.slot(1)[spec.offset:spec.offset + spec.nbytes].view(torch.float32) == 3.0)
    assert arena.free_tail(0) == (arena.slot_bytes, 0)


@pytest.mark.parametrize("name,params", [("llama2-7b", 6_738_415_616), ("llama3-8b", 8_030_261_248),
                                         ("codellama-34b", 33_743_970_304), ("smollm2-135m", 134_515_008)])
def test_architecture_parameter_counts(name, params):
    cfg = ARCHITECTURES[name]
    assert cfg.param_count() == params
    layout = fp16_layout(cfg, torch.float16)
    tensor_bytes = sum(s.nbytes for s in layout.specs)
    assert tensor_bytes == cfg.layer_param_count() * 2 and layout.nbytes - tensor_bytes < 6 * ALIGN


def test_attention_kind():
    assert ARCHITECTURES["llama2-7b"].attention == "MHA" and ARCHITECTURES["llama3-8b"].attention == "GQA"


def _pool(blocks=4):
    return KVPool(CFG, blocks, 16, torch.float32, "cpu", max_segment_blocks=64)


def test_store_gather_roundtrip_across_segments():
    pool = _pool(blocks=2)
    # an extension segment carved out of foreign bytes (as a shrunken weight slot's tail will be)
    raw = torch.zeros(5 * pool.block_bytes + 300, dtype=torch.uint8)
    ext = pool.attach(2, pool.segment_from_bytes(raw), "layer:1")
    assert ext.num_blocks == 5 and pool.num_blocks == 7
    ids = [1, (2 << pool.shift) + 3, 0, (2 << pool.shift) + 0]  # interleave base and extension blocks
    n = 3 * 16 + 5
    slots = torch.tensor([ids[p // 16] * 16 + p % 16 for p in range(n)])
    k = torch.randn(n, CFG.num_kv_heads, CFG.head_dim)
    v = torch.randn(n, CFG.num_kv_heads, CFG.head_dim)
    pool.store(2, k, v, slots)
    k2, v2 = pool.gather(2, torch.tensor(ids), n)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    # the extension bytes really hold the data, other layers are untouched
    assert raw.abs().sum() > 0
    assert torch.count_nonzero(pool.segments[0].tensor[:, 0]) == 0
    # the segment table points at the segment's memory
    assert pool.seg_base_ptr[2].item() == ext.tensor.data_ptr() and pool.seg_num_blocks[2].item() == 5


def test_segment_table_validation():
    pool = _pool()
    with pytest.raises(ValueError, match="base pool"):
        pool.detach(0)
    with pytest.raises(ValueError, match="index"):
        pool.attach(0, torch.zeros(1, *pool.block_shape), "x")
    pool.attach(1, torch.zeros(2, *pool.block_shape), "layer:0")
    with pytest.raises(ValueError, match="already attached"):
        pool.attach(1, torch.zeros(2, *pool.block_shape), "layer:0")
    with pytest.raises(ValueError, match="does not match"):
        pool.attach(2, torch.zeros(2, 1, 1), "layer:1")
    pool.detach(1)
    assert pool.seg_base_ptr[1].item() == 0 and pool.num_blocks == 4


def test_block_manager_prefers_base_pool_and_drains_segments():
    pool = _pool(blocks=3)
    bm = BlockManager(pool)
    pool.attach(1, torch.zeros(4, *pool.block_shape), "layer:0")
    bm.add_segment(1)
    assert bm.num_total_blocks == 7 and bm.num_free_blocks == 7
    first = bm.allocate(3)
    assert first == [0, 1, 2]  # base pool first, ascending
    ext = bm.allocate(2)
    assert [b >> pool.shift for b in ext] == [1, 1]
    bm.close_segment(1)
    assert bm.num_free_blocks == 0 and not bm.can_allocate(1)
    with pytest.raises(RuntimeError, match="live blocks"):
        bm.remove_segment(1)
    bm.free_blocks(ext)
    bm.remove_segment(1)
    pool.detach(1)
    bm.free_blocks(first)
    assert bm.num_free_blocks == 3 and bm.num_used == 0 and bm.utilization() == 0.0
    with pytest.raises(RuntimeError, match="asked for"):
        bm.allocate(4)


def test_block_manager_base_reserve_is_only_for_the_base_pools_explicit_users():
    """Sequences never take the last ``reserve`` base-pool blocks (they spill to extension segments, or wait); the
    staged swaps' scratch (``allocate(n, segment=0)``) may."""
    pool = _pool(blocks=6)
    bm = BlockManager(pool)
    with pytest.raises(ValueError, match="reserve of 6 blocks"):
        bm.set_base_reserve(6)
    bm.set_base_reserve(2)
    assert bm.num_free_blocks == 4 and bm.can_allocate(4) and not bm.can_allocate(5)
    seq = bm.allocate(4)
    assert seq == [0, 1, 2, 3] and bm.num_free_blocks == 0 and bm.num_free_in(0) == 2
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks, 0 free"):
        bm.allocate(1)
    pool.attach(1, torch.zeros(3, *pool.block_shape), "layer:0")
    bm.add_segment(1)
    assert [b >> pool.shift for b in bm.allocate(3)] == [1, 1, 1]  # spills to the extension, not the reserve
    scratch = bm.allocate(2, segment=0)
    assert scratch == [4, 5] and bm.num_free_in(0) == 0
    bm.free_blocks(scratch + seq[:1])
    assert bm.num_free_blocks == 1 and bm.num_free_in(0) == 3  # one block beyond the refilled reserve


def test_kv_capacity_sizing():
    from morphserve.engine.config import EngineConfig

    cfg7b = ARCHITECTURES["llama2-7b"]
    block = KVPool.block_nbytes(cfg7b, 16, torch.float16)
    assert block == 32 * 2 * 32 * 16 * 128 * 2  # 8 MiB: all 32 layers of 16 tokens
    weights = cfg7b.param_count() * 2
    cpu = torch.device("cpu")
    # an L4-sized budget on a device without reserve: what the weights leave, in whole blocks
    assert EngineConfig(memory_budget_bytes=24 * 10**9).kv_blocks(block, weights, cpu, 10**6) == \
        (24 * 10**9 - weights) // block
    assert EngineConfig(num_kv_blocks=7).kv_blocks(block, weights, cpu, 1) == 7
    assert EngineConfig(kv_cache_bytes=block * 3 + 5).kv_blocks(block, weights, cpu, 1) == 3
    assert EngineConfig().kv_blocks(1024, 0, cpu, max_useful=10) == 10  # capped at what can be used
    with pytest.raises(ValueError, match="leaves no room"):
        EngineConfig(memory_budget_bytes=10**9).kv_blocks(block, weights, cpu, 10)
