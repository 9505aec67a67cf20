"""Elastic KV capacity on real shrunken slots: layers swapped to W8/W4 give their freed bytes to the KV pool,
requests keep running while the pool grows and shrinks (with migration or draining), and their greedy outputs are
identical to a run without resizing at the same precision schedule."""

import pytest
import torch

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and linear kernels)
from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.engine.sampling_params import SamplingParams
from morphserve.memory.kv_resizer import KVResizer, ReleasePolicy
from morphserve.memory.layer_swapper import LayerSwapper
from morphserve.memory.weight_arena import Precision
from morphserve.parity import PARITY_PROMPTS
from morphserve.quant.staging import StagedVariants

P = Precision


@pytest.fixture(scope="module", params=["mha", "gqa"])
def wide(request, tmp_path_factory):
    """A tiny checkpoint with a wide MLP, so that each rung of the ladder frees at least a few KV blocks."""
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp(f"wide-{request.param}"), request.param,
                                intermediate_size=512)


PARAMS = SamplingParams(max_tokens=40, ignore_eos=True)


def _engine(path, blocks):
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=blocks, max_num_batched_tokens=64,
                                    device="cpu"))
    swapper = LayerSwapper(engine.model.arena, StagedVariants.build(engine.model), "cpu")
    resizer = KVResizer(engine.pool, engine.block_manager, engine.model.arena,
                        lambda: [r.block_table for r in engine.scheduler.running])
    return engine, swapper, resizer


def _swap(swapper, layer, dst):
    swapper.request(layer, dst)
    swapper.issue()  # synchronous on CPU
    swapper.poll()


def _run(engine, before_step):
    for p in PARITY_PROMPTS[:8]:
        engine.add_request(p, PARAMS)
    outs, step = {}, 0
    while engine.has_unfinished():
        before_step(step)
        for o in engine.step():
            outs[o.request_id] = o.output_token_ids
        step += 1
    return [outs[k] for k in sorted(outs, key=int)], step


@pytest.mark.parametrize("policy", [ReleasePolicy.MIGRATE, ReleasePolicy.DRAIN])
def test_grow_and_shrink_mid_run_keeps_outputs(wide, policy):
    """KV blocks live in extension segments carved from shrunken slots, then migrate (or drain) while requests
    run.  Capacity never binds in either run, so both schedule identically and must produce identical tokens."""
    engine, swapper, resizer = _engine(wide, 200)
    schedule: list[tuple[int, int, Precision]] = []  # (step, layer, precision) as it actually happened
    grown, live_at_release, ballast = [], {}, []

    def morph(step):
        if step == 0:  # out of order and mixed rungs: layer 2 -> W4, layer 0 -> W8, layer 1 -> W4
            for layer, dst in ((2, P.W4), (0, P.W8), (1, P.W4)):
                _swap(swapper, layer, dst)
                schedule.append((step, layer, dst))
                grown.append(resizer.grow(layer))
            # ballast: occupy most of the base pool so the requests' blocks land in the extension segments
            ballast.extend(engine.block_manager.allocate(engine.block_manager.num_free_blocks - sum(grown) - 8))
        if step == 3:  # the second rung of layer 0, while its first-rung segment holds live blocks
            _swap(swapper, 0, P.W4)
            schedule.append((step, 0, P.W4))
            grown.append(resizer.grow(0))
        if step == 20:
            engine.block_manager.free_blocks(ballast)
            for layer in (0, 2):
                live_at_release[layer] = resizer.live_blocks(layer)
                resizer.begin_release(layer, P.FP16, policy)
        for layer in resizer.releasing_layers():
            resizer.try_finish_release(layer)
            if resizer.ready_to_grow(layer, P.FP16) and swapper.precision(layer) != P.FP16:
                _swap(swapper, layer, P.FP16)
                schedule.append((step, layer, P.FP16))

    outs, steps = _run(engine, morph)
    assert len(grown) == 4 and all(g > 0 for g in grown)  # every step down really added blocks
    assert live_at_release[0] > 0  # layer 0's segments (allocated right after the base pool) were in use
    assert engine.scheduler.num_preemptions == 0
    for layer in resizer.releasing_layers():  # drained segments are empty once their requests finished
        assert resizer.try_finish_release(layer)
    assert resizer.blocks_of(0) == resizer.blocks_of(2) == 0 and resizer.blocks_of(1) > 0
    assert engine.block_manager.num_used == 0
    restored = [s for s in schedule if s[2] == P.FP16]
    if policy is ReleasePolicy.MIGRATE:  # migration restores the layers at once, while requests still run
        assert [s[0] for s in restored] == [20, 20] and steps > 30

    # the same precision schedule on a pool that is never resized
    ref_engine, ref_swapper, _ = _engine(wide, 200)
    by_step: dict[int, list] = {}
    for step, layer, dst in schedule:
        by_step.setdefault(step, []).append((layer, dst))

    def replay(step):
        for layer, dst in by_step.get(step, []):
            _swap(ref_swapper, layer, dst)

    ref_outs, ref_steps = _run(ref_engine, replay)
    assert ref_steps == steps and ref_engine.scheduler.num_preemptions == 0
    assert outs == ref_outs


def test_regions_follow_the_ladder(wide):
    engine, swapper, resizer = _engine(wide, 40)
    arena = engine.model.arena
    _swap(swapper, 1, P.W8)
    b8 = resizer.grow(1)
    _swap(swapper, 1, P.W4)
    b4 = resizer.grow(1)
    r0, r1 = sorted(resizer.regions_of(1), key=lambda r: r.index)  # rung 0, rung 1
    assert (r0.index, r1.index) == (3, 4) and b8 > 0 and b4 > 0
    assert r1.end <= r0.start and r1.start >= arena.layout(1).nbytes and r0.end <= arena.slot_bytes
    assert resizer.grow(1) == 0  # nothing left to carve
    # stepping back to W8 needs only the second region; back to FP16 needs both
    assert [r.index for r in resizer.blocking_regions(1, P.W8)] == [4]
    assert sorted(r.index for r in resizer.blocking_regions(1, P.FP16)) == [3, 4]
    assert engine.block_manager.num_total_blocks == 40 + b8 + b4


def test_migration_moves_data_and_rewrites_tables(tiny_mha):
    engine, swapper, resizer = _engine(tiny_mha, 30)
    _swap(swapper, 0, P.W4)
    added = resizer.grow(0)
    hog = engine.block_manager.allocate(engine.block_manager.num_free_blocks - added)  # base pool full
    engine.add_request(PARITY_PROMPTS[2], PARAMS)
    engine.step()
    req = engine.scheduler.running[0]
    mask = (1 << engine.pool.shift) - 1
    in_ext = [b for b in req.block_table if b >> engine.pool.shift == 1]
    assert in_ext, "the request's blocks should live in the extension segment"
    snapshot = {b: engine.pool.segments[1].tensor[b & mask].clone() for b in in_ext}
    old_table = list(req.block_table)
    engine.block_manager.free_blocks(hog)
    resizer.begin_release(0, P.FP16)
    assert resizer.try_finish_release(0) and resizer.ready_to_grow(0, P.FP16)
    assert all(b >> engine.pool.shift == 0 for b in req.block_table)
    for old, new in zip(old_table, req.block_table):
        if old in snapshot:
            assert torch.equal(engine.pool.segments[0].tensor[new & mask], snapshot[old])
    assert sorted(engine.pool.segments) == [0]  # the extension segment is detached


def test_release_with_no_room_waits(tiny_mha):
    engine, swapper, resizer = _engine(tiny_mha, 30)
    _swap(swapper, 0, P.W4)
    added = resizer.grow(0)
    hog = engine.block_manager.allocate(engine.block_manager.num_free_blocks)  # everything, extension included
    resizer.begin_release(0, P.FP16)
    assert not resizer.ready_to_grow(0, P.FP16)
    ext = [b for b in hog if b >> engine.pool.shift == 1]
    assert len(ext) == added
    assert not resizer.try_finish_release(0)  # live blocks and no free block to migrate them to
    engine.block_manager.free_blocks(ext)  # the requests holding them finished
    assert resizer.try_finish_release(0)
