"""The layer swapper on CPU (synchronous copies): in-place swaps into fixed slots, byte-exact restores, outputs
that follow the precision map, and the queue semantics (retarget, cancel, no swap on an in-flight layer)."""

import random

import pytest
import torch

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and linear kernels)
from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.engine.sampling_params import SamplingParams
from morphserve.memory.layer_swapper import LayerSwapper, ScratchBlocks, SwapState
from morphserve.memory.weight_arena import Precision
from morphserve.quant.layouts import w4_group_size
from morphserve.quant.packing import dequantize_w4
from morphserve.quant.staging import StagedVariants

P = Precision


@pytest.fixture(scope="module")
def setup(tiny_mha):
    engine = LLMEngine(EngineConfig(model=str(tiny_mha), num_kv_blocks=64, device="cpu"))
    staged = StagedVariants.build(engine.model)
    return engine, staged


def _swap(swapper, layer, dst):
    swapper.request(layer, dst)
    swapper.issue()
    swapper.before_layer(layer)
    assert [s.layer for s in swapper.poll()] == [layer]


def test_thousand_random_cycles_restore_fp16_byte_identical(setup):
    engine, staged = setup
    arena = engine.model.arena
    original = arena.storage.clone()
    pointers = {i: {k: t.data_ptr() for k, t in arena.layers[i].tensors.items()} for i in range(3)}
    swapper = LayerSwapper(arena, staged, "cpu")
    rng = random.Random(0)
    for _ in range(1000):
        layer = rng.randrange(arena.cfg.num_layers)
        dst = rng.choice([p for p in (P.FP16, P.W8, P.W4) if p != swapper.precision(layer)])
        _swap(swapper, layer, dst)
        assert arena.layers[layer].precision == dst
        assert torch.equal(arena.slot(layer)[:staged.buffer(layer, dst).numel()], staged.buffer(layer, dst))
    for layer in range(arena.cfg.num_layers):
        if swapper.precision(layer) != P.FP16:
            _swap(swapper, layer, P.FP16)
    assert torch.equal(arena.storage, original)
    for i in range(3):  # no view moved: swapping never changes a pointer
        assert {k: t.data_ptr() for k, t in arena.layers[i].tensors.items()} == pointers[i]


def test_outputs_follow_the_precision_map(setup, tiny_mha):
    engine, staged = setup
    swapper = LayerSwapper(engine.model.arena, staged, "cpu")
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    def run():
        engine.add_request("the quick brown fox jumps", params)
        return engine.run_until_done()[0].output_token_ids

    fp16 = run()
    for layer in range(engine.model_config.num_layers):
        _swap(swapper, layer, P.W4)
    w4 = run()
    # the W4 model is the dequantized model: compare with an engine whose FP16 weights are the dequantized ones
    for layer in range(engine.model_config.num_layers):
        _swap(swapper, layer, P.FP16)
    assert run() == fp16
    deq = LLMEngine(EngineConfig(model=str(tiny_mha), num_kv_blocks=64, device="cpu"))
    g = w4_group_size(deq.model_config)
    for i in range(deq.model_config.num_layers):
        src = staged.tensors(i, P.W4)
        lw = deq.model.arena.layers[i]
        for name in ("qkv", "o", "gate_up", "down"):
            lw[name].copy_(dequantize_w4(src[f"{name}.qweight"], src[f"{name}.scales"], src[f"{name}.zeros"], g))
        lw["input_norm"].copy_(src["input_norm"])
        lw["post_norm"].copy_(src["post_norm"])
    deq.add_request("the quick brown fox jumps", params)
    assert deq.run_until_done()[0].output_token_ids == w4


def test_queue_semantics(setup):
    engine, staged = setup
    swapper = LayerSwapper(engine.model.arena, staged, "cpu")
    assert swapper.request(0, P.FP16) is None  # already there
    s = swapper.request(0, P.W8)
    assert s.state is SwapState.QUEUED and swapper.target(0) == P.W8 and not s.grows
    w4 = swapper.request(0, P.W4)  # retarget before issue
    assert swapper.target(0) == P.W4 and len(swapper.queued()) == 1
    assert swapper.request(0, P.W4) is w4  # the same target again: the queued swap as it is
    assert swapper.cancel(0) and swapper.target(0) == P.FP16
    swapper.request(1, P.W4)
    swapper.request(2, P.W8)
    assert len(swapper.issue()) == 2 and swapper.bytes_copied > 0
    with pytest.raises(ValueError, match="layer 7 out of range"):
        swapper.request(7, P.W4)
    for layer in (1, 2):
        swapper.before_layer(layer)
    assert sorted(s.layer for s in swapper.poll()) == [1, 2]
    up = swapper.request(1, P.FP16)
    assert up.grows
    swapper.issue()
    swapper.before_layer(1)
    swapper.poll()
    _swap(swapper, 2, P.FP16)


@pytest.fixture(scope="module")
def staged_setup(tiny_mha):
    engine = LLMEngine(EngineConfig(model=str(tiny_mha), num_kv_blocks=512, device="cpu"))
    return engine, StagedVariants.build(engine.model)


def _staged_swapper(engine, staged):
    return LayerSwapper(engine.model.arena, staged, "cpu", scratch=ScratchBlocks(engine.pool, engine.block_manager))


def test_staged_swaps_restore_fp16_byte_identical_and_return_their_scratch(staged_setup):
    """Staged swaps (bytes through free KV blocks, landing between steps): 1000 random down/up cycles leave the FP16
    slot byte-identical, every landed variant equals its staged bytes, and every scratch block comes back."""
    engine, staged = staged_setup
    arena, bm = engine.model.arena, engine.block_manager
    original = arena.storage.clone()
    swapper = _staged_swapper(engine, staged)
    rng = random.Random(2)
    for _ in range(1000):
        layer = rng.randrange(arena.cfg.num_layers)
        dst = rng.choice([p for p in (P.FP16, P.W8, P.W4) if p != swapper.precision(layer)])
        s = swapper.request(layer, dst)
        assert s.is_staged and s.state is SwapState.STAGING and bm.num_used == len(s.scratch)
        assert not swapper.active()  # no per-layer hooks for staged swaps
        assert swapper.precision(layer) != dst  # the slot is untouched until the swap lands
        assert swapper.land() == [s] and bm.num_used == 0
        assert arena.layers[layer].precision == dst
        assert torch.equal(arena.slot(layer)[:staged.buffer(layer, dst).numel()], staged.buffer(layer, dst))
    for layer in range(arena.cfg.num_layers):
        if swapper.precision(layer) != P.FP16:
            swapper.request(layer, P.FP16)
    swapper.land()
    assert torch.equal(arena.storage, original) and not swapper.swaps


def test_staged_swap_cancel_and_fallback_to_in_place(staged_setup):
    engine, staged = staged_setup
    bm = engine.block_manager
    swapper = _staged_swapper(engine, staged)
    s = swapper.request(0, P.W4)
    with pytest.raises(RuntimeError, match="in flight"):
        swapper.request(0, P.W8)  # its bytes are travelling: no retarget
    assert swapper.cancel(0) and bm.num_used == 0 and swapper.precision(0) == P.FP16 and not swapper.swaps
    held = bm.allocate(bm.num_free_in(0), segment=0)  # no scratch left: the swap runs in place
    s = swapper.request(0, P.W4)
    assert not s.is_staged and s.state is SwapState.QUEUED and swapper.active()
    swapper.issue()
    swapper.before_layer(0)
    swapper.poll()
    assert swapper.precision(0) == P.W4
    bm.free_blocks(held)
    swapper.request(0, P.FP16)
    assert [x.layer for x in swapper.land()] == [0] and swapper.precision(0) == P.FP16


def test_staged_only_swapper_waits_for_scratch_instead_of_running_in_place(staged_setup):
    engine, staged = staged_setup
    bm = engine.block_manager
    with pytest.raises(ValueError, match="staged_only needs scratch"):
        LayerSwapper(engine.model.arena, staged, "cpu", staged_only=True)
    swapper = LayerSwapper(engine.model.arena, staged, "cpu", scratch=ScratchBlocks(engine.pool, bm),
                           staged_only=True)
    held = bm.allocate(bm.num_free_in(0), segment=0)
    assert swapper.request(0, P.W4) is None and not swapper.swaps and swapper.declined == 1
    assert swapper.precision(0) == P.FP16 and bm.num_used == len(held)
    bm.free_blocks(held)
    s = swapper.request(0, P.W4)  # asked again once scratch is free: staged
    assert s.is_staged and swapper.land() == [s] and swapper.precision(0) == P.W4
    swapper.request(0, P.FP16)
    swapper.land()
    assert swapper.precision(0) == P.FP16 and bm.num_used == 0


class _Graphs:
    """Stands in for the decode graphs (CUDA only) in front of :func:`land_staged`: which maps replay without a
    build, and the maps built, with the layer's precision at the time of each build."""

    def __init__(self, swapper, layer, bucket=8):
        self.swapper, self.layer, self.last_bucket = swapper, layer, bucket
        self.built: set = set()
        self.builds: list = []

    def ready(self, key, b):
        return (key, b) in self.built

    def prepare(self, key, b):
        self.builds.append((key, b, self.swapper.precision(self.layer)))
        self.built.add((key, b))


def test_land_staged_builds_the_graphs_of_the_new_map_before_landing(staged_setup):
    from morphserve.engine.morpher import land_staged

    engine, staged = staged_setup
    swapper = _staged_swapper(engine, staged)
    graphs = _Graphs(swapper, layer=1)
    fp16 = swapper.target_map()
    s = swapper.request(1, P.W4)
    key = swapper.map_after([s])
    assert key == fp16[:1] + (P.W4,) + fp16[2:] == swapper.target_map()
    assert swapper.landable() == [s]  # on CPU the bytes are in scratch at once
    assert land_staged(swapper, graphs) == [s] and swapper.precision(1) == P.W4
    assert graphs.builds == [(key, 8, P.FP16)]  # built once, before the layer switched
    assert engine.block_manager.num_used == 0  # the scratch came back
    s = swapper.request(1, P.FP16)
    graphs.built.add((fp16, 8))  # a map that replays already (e.g. its whole-step graph): nothing to build
    assert land_staged(swapper, graphs) == [s] and len(graphs.builds) == 1
    # without decode graphs (CPU, eager) a swap lands at the first launch after its bytes are in
    s = swapper.request(2, P.W8)
    assert land_staged(swapper, None) == [s] and swapper.precision(2) == P.W8
    swapper.request(2, P.FP16)
    assert [x.layer for x in swapper.land()] == [2]


def test_paced_staged_swaps_copy_a_budget_per_step_and_land_byte_identical(staged_setup, monkeypatch):
    """With a copy budget, a staged swap's copies (a growing swap's tail into the slot, the rest into scratch) go
    out a budget per issue(); the swap lands only once all are done, byte-identical, with its scratch returned,
    and a cancel part-way gives everything back."""
    import morphserve.memory.layer_swapper as ls

    engine, staged = staged_setup
    arena, bm = engine.model.arena, engine.block_manager
    original = arena.storage.clone()
    monkeypatch.setattr(ls, "COPY_CHUNK_BYTES", 4096)  # the tiny model's layers are a few hundred KiB: many pieces
    swapper = LayerSwapper(arena, staged, "cpu", scratch=ScratchBlocks(engine.pool, bm), copy_budget=3 * 4096)
    rng = random.Random(5)
    for _ in range(40):
        layer = rng.randrange(arena.cfg.num_layers)
        dst = rng.choice([p for p in (P.FP16, P.W8, P.W4) if p != swapper.precision(layer)])
        s = swapper.request(layer, dst)
        left = sum(x.numel() for _, x in s.pending)
        assert all(x.numel() <= 4096 for _, x in s.pending) and left > 3 * 4096
        if s.grows:  # the tail part comes first, into the slot itself
            assert s.pending[0][0].data_ptr() == arena.slot(layer)[staged.buffer(layer, s.src).numel():].data_ptr()
        while not swapper.landable():
            assert swapper.land() == [] and swapper.precision(layer) != dst  # nothing lands early
            swapper.issue()
            now = sum(x.numel() for _, x in s.pending)
            assert (left - now >= 3 * 4096 or now == 0) and left - now < 4 * 4096  # the budget, in whole pieces
            left = now
        assert s.copy_steps >= 2 and swapper.land() == [s] and swapper.precision(layer) == dst
        assert bm.num_used == 0
        assert torch.equal(arena.slot(layer)[:staged.buffer(layer, dst).numel()], staged.buffer(layer, dst))
    s = swapper.request(0, P.W4 if swapper.precision(0) != P.W4 else P.W8)
    swapper.issue()
    assert s.pending and swapper.cancel(0) and bm.num_used == 0 and not swapper.swaps
    for layer in range(arena.cfg.num_layers):
        if swapper.precision(layer) != P.FP16:
            swapper.request(layer, P.FP16)
    assert len(swapper.land(wait=True)) >= 1  # wait: the pending copies all go now
    assert torch.equal(arena.storage, original) and not swapper.swaps and bm.num_used == 0
    with pytest.raises(ValueError, match="copy_budget"):
        LayerSwapper(arena, staged, "cpu", copy_budget=0)
