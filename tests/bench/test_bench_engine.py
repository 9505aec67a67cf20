"""Regression benchmarks of the engine's hot paths on a tiny model: a decode step, the scheduler's step, a layer
swap (FP16 -> W4 -> FP16: the copy into the fixed slot and the view switch) and a KV resize (grow the pool from a
W4 layer's freed bytes, then release it and restore the layer).  CPU always; CUDA when available (``gpu``)."""

from __future__ import annotations

import pytest

from bench_fixtures import DEVICES, make_engine, wide_checkpoint  # noqa: F401  (fixture)
from morphserve.engine.request import Request
from morphserve.engine.sampling_params import SamplingParams
from morphserve.memory.kv_resizer import KVResizer, ReleasePolicy
from morphserve.memory.layer_swapper import LayerSwapper
from morphserve.memory.weight_arena import Precision
from morphserve.quant.staging import StagedVariants

P = Precision


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        import torch

        torch.cuda.synchronize(engine.device)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_step(benchmark, wide_checkpoint, device):
    """One decode step of 8 running requests (reference kernels on CPU, the default path on CUDA)."""
    engine = make_engine(wide_checkpoint, device)
    for i in range(8):
        engine.add_request(list(range(10, 42)), SamplingParams(max_tokens=900, ignore_eos=True))
    engine.step()  # the prefill of all 8

    def step():
        out = engine.step()
        _sync(engine)
        return out

    benchmark.pedantic(step, rounds=40, warmup_rounds=5, iterations=1)
    last = engine.step_stats[-1]
    assert last.num_seqs == 8 and last.num_tokens == 8  # every timed step was a pure decode step of 8 requests


def test_scheduler_step(benchmark, wide_checkpoint):
    """Scheduling 64 waiting requests of 100 prompt tokens into an empty engine (admission, block allocation,
    chunked prefill under a 2048-token budget)."""
    engine = make_engine(wide_checkpoint, "cpu", blocks=512)
    sched, bm = engine.scheduler, engine.block_manager
    params = SamplingParams(max_tokens=16, ignore_eos=True)

    def setup():
        for req in list(sched.running) + list(sched.waiting):
            sched.abort(req)
        for i in range(64):
            sched.add(Request(f"b{i}", list(range(10, 110)), params, 0.0))
        return (), {}

    out = benchmark.pedantic(sched.schedule, setup=setup, rounds=40, warmup_rounds=2, iterations=1)
    assert out.num_tokens == 2048 and bm.num_used > 0


@pytest.mark.parametrize("device", DEVICES)
def test_layer_swap(benchmark, wide_checkpoint, device):
    """Swap one layer FP16 -> W4 -> FP16 (both copies complete, views switched)."""
    engine = make_engine(wide_checkpoint, device, blocks=64)
    swapper = LayerSwapper(engine.model.arena, StagedVariants.build(engine.model), engine.device)

    def swap(dst):
        swapper.request(1, dst)
        swapper.issue()
        swapper.before_layer(1)
        swapper.synchronize()
        swapper.poll()

    def cycle():
        swap(P.W4)
        swap(P.FP16)

    benchmark.pedantic(cycle, rounds=40, warmup_rounds=3, iterations=1)
    assert swapper.precision(1) == P.FP16 and not swapper.swaps


def test_kv_resize(benchmark, wide_checkpoint):
    """Grow the KV pool from layer 1's slot at W4, then release the segment (empty, so at once) and restore FP16."""
    engine = make_engine(wide_checkpoint, "cpu", blocks=64)
    swapper = LayerSwapper(engine.model.arena, StagedVariants.build(engine.model), engine.device)
    resizer = KVResizer(engine.pool, engine.block_manager, engine.model.arena,
                        lambda: [r.block_table for r in engine.scheduler.running])
    grown = []

    def swap(dst):
        swapper.request(1, dst)
        swapper.issue()
        swapper.before_layer(1)
        swapper.poll()

    def cycle():
        swap(P.W4)
        grown.append(resizer.grow(1))
        resizer.begin_release(1, P.FP16, ReleasePolicy.MIGRATE)
        assert resizer.try_finish_release(1)
        swap(P.FP16)

    benchmark.pedantic(cycle, rounds=40, warmup_rounds=3, iterations=1)
    assert grown and all(g > 0 for g in grown)  # every cycle really added (and removed) blocks
    assert engine.block_manager.num_total_blocks == 64
