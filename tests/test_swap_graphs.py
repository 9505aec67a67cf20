"""CUDA: decode steps with layer swaps in flight replay per-layer graphs (issue #5's overlap target), and give the
same tokens as eager execution of the same per-step precision schedule.  Skipped without a GPU."""

import random

import pytest
import torch

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and linear kernels)
from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.engine.model_runner import HostBatch
from morphserve.engine.morpher import Morpher
from morphserve.engine.sampling_params import SamplingParams
from morphserve.engine.scheduler import ScheduledChunk
from morphserve.memory.kv_resizer import KVResizer
from morphserve.memory.layer_swapper import LayerSwapper, ScratchBlocks
from morphserve.memory.weight_arena import Precision
from morphserve.parity import PARITY_PROMPTS
from morphserve.quant.staging import StagedVariants

P = Precision
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = [gpu, pytest.mark.gpu]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide-gqa"), "gqa", intermediate_size=512,
                                num_hidden_layers=4)


def _engine(path, blocks, graphs: bool, extension_first=False, staged_swaps=False, copy_budget=None,
            async_steps=False):
    engine = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="float16", num_kv_blocks=blocks,
                                    max_num_batched_tokens=64, async_steps=async_steps), cuda_graphs=graphs)
    engine.block_manager.extension_first = extension_first
    scratch = ScratchBlocks(engine.pool, engine.block_manager) if staged_swaps else None
    swapper = LayerSwapper(engine.model.arena, StagedVariants.build(engine.model), engine.device, scratch=scratch,
                           copy_budget=copy_budget)
    resizer = KVResizer(engine.pool, engine.block_manager, engine.model.arena,
                        lambda: [r.block_table for r in engine.scheduler.running])
    return engine, swapper, resizer


def _decode_chunks(engine):
    bs = engine.config.block_size
    for r in engine.scheduler.running:  # the block for the next position, as the scheduler would allocate it
        r.block_table += engine.block_manager.allocate(-(-(r.num_computed_tokens + 1) // bs) - len(r.block_table))
    return HostBatch.from_chunks([ScheduledChunk(r, 1) for r in engine.scheduler.running], bs)


def test_layerwise_graphs_equal_the_whole_step_graph(wide):
    engine, swapper, _ = _engine(wide, 64, graphs=True)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for p in PARITY_PROMPTS[:3]:
        engine.add_request(p, params)
    for _ in range(6):
        engine.step()
    g = engine.runner.graphs
    hb = _decode_chunks(engine)
    whole = g.run(hb).clone()
    layered = g.run_layerwise(hb).clone()
    assert g.num_layer_captures == engine.model_config.num_layers
    torch.testing.assert_close(layered, whole, rtol=0, atol=0)
    # a layer at W4 (a swap landed synchronously): the per-layer graphs equal eager execution of the new map
    swapper.request(2, P.W4)
    swapper.synchronize()
    swapper.issue()
    swapper.synchronize()
    swapper.before_layer(2)
    swapper.poll()
    runner = engine.runner
    eager = runner.model.forward(runner.upload(hb), runner.pool, runner.kernels)
    torch.testing.assert_close(g.run_layerwise(hb), eager, rtol=0, atol=0)
    assert g.num_layer_captures == engine.model_config.num_layers + 1


def _serve(engine, morpher, swapper, prompts, params, shake):
    """Serve with the swapper's hooks in the step (as the engine installs them), recording each step's precisions."""
    engine.runner.hooks = swapper
    ids = [engine.add_request(p, params) for p in prompts]
    outs, maps, step = {}, [], 0
    while engine.has_unfinished():
        shake(step)
        morpher.before_step()
        maps.append([swapper.step_precision(i) for i in range(engine.model_config.num_layers)])
        for o in engine.step():
            outs[o.request_id] = o
        morpher.after_step()
        step += 1
    swapper.synchronize()
    return [outs[i] for i in ids], maps


@pytest.mark.parametrize("staged_swaps,paced,async_steps", [(False, False, False), (True, False, False),
                                                             (True, True, False), (True, True, True),
                                                             (False, False, True)],
                         ids=["in-place", "staged", "staged-paced", "staged-paced-async", "in-place-async"])
def test_swapping_every_step_with_graphs_equals_eager(wide, staged_swaps, paced, async_steps, monkeypatch):
    """Random targets every step, migrations included (extension-first allocation): the graph run gives the tokens
    of an eager engine that lands the same per-step precision schedule synchronously and never resizes.  In place:
    per-layer graphs while swaps are in flight.  Staged: whole-step or composite graphs only (the swaps land between
    steps), composites prepared after each launch and re-targeted in place where the structures match.  Paced: the
    staged copies go out 32 KiB per step (pieces of 16 KiB), so a swap spans several steps.  Async: each step is
    launched before the previous one's tokens are read back (its inputs read them on the device), so swaps, landings
    and migrations are issued while a step is in flight."""
    n = 4
    if paced:
        import morphserve.memory.layer_swapper as ls

        monkeypatch.setattr(ls, "COPY_CHUNK_BYTES", 16 << 10)
    engine, swapper, resizer = _engine(wide, 300, graphs=True, extension_first=True, staged_swaps=staged_swaps,
                                       copy_budget=32 << 10 if paced else None, async_steps=async_steps)
    morpher = Morpher(engine, swapper, resizer, static_map=[P.FP16] * n)
    rng = random.Random(3)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)

    def shake(step):
        morpher.static_map = [rng.choice([P.FP16, P.W8, P.W4]) for _ in range(n)]

    out, maps = _serve(engine, morpher, swapper, PARITY_PROMPTS[:8], params, shake)
    assert all(len(o.output_token_ids) == 30 for o in out)
    assert len({tuple(m) for m in maps}) > 8 and resizer.migrated_total > 0
    g = engine.runner.graphs
    if staged_swaps:
        assert sum(s.is_staged for s in swapper.completed) > (5 if paced else 10)
        assert g.num_composite_steps > 5 and g.num_composite_builds > 0, "no step replayed a composite graph"
        assert g.num_layerwise_steps == 0  # staged swaps need no per-layer hooks
        if paced:  # the larger variants' copies went out over several steps
            assert max(s.copy_steps for s in swapper.completed) >= 3
    else:
        assert g.num_layerwise_steps > 10, "swap steps did not replay per-layer graphs"

    ref, ref_swapper, _ = _engine(wide, 300, graphs=False)
    steps = iter(maps)

    def land(step):
        for layer, p in enumerate(next(steps)):
            if ref_swapper.precision(layer) != p:
                ref_swapper.request(layer, p)
                ref_swapper.synchronize()
                ref_swapper.issue()
                ref_swapper.synchronize()
                ref_swapper.before_layer(layer)
                ref_swapper.poll()

    ref_out = []
    ids = [ref.add_request(p, params) for p in PARITY_PROMPTS[:8]]
    done, step = {}, 0
    while ref.has_unfinished():
        land(step)
        for o in ref.step():
            done[o.request_id] = o
        step += 1
    ref_out = [done[i] for i in ids]
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in ref_out]


def test_composite_retargeted_in_place_equals_its_map(wide):
    """Composite graphs of the maps a run of swaps reaches, in segments of two layers: a swap builds only its
    layer's segment (the other is shared with the previous map), re-targeting an unused composite
    (``cudaGraphExecUpdate``) exactly when the layer structures match, and the composites give exactly the
    logits of the map's per-layer replay."""
    engine, swapper, _ = _engine(wide, 64, graphs=True, staged_swaps=True)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    engine.add_request(PARITY_PROMPTS[0], params)
    for _ in range(4):
        engine.step()
    g = engine.runner.graphs
    g.max_maps = 1  # room for one map's two segments: a new segment replaces an old one
    g.set_segment_layers(2)
    hb = _decode_chunks(engine)
    b = g.bucket_for(hb.num_seqs)
    prev = g.prepare(g.precision_key(), b)
    for layer, dst in ((1, P.W4), (3, P.W8), (1, P.FP16), (0, P.W4), (1, P.W4), (1, P.FP16)):
        seg = layer // 2
        old_sig = prev[seg].signature
        swapper.request(layer, dst)
        swapper.land(wait=True)
        key = g.precision_key()
        sig = tuple(g.layer_structure(i, key[i], b) for i in range(2 * seg, 2 * seg + 2))
        updates, builds = g.num_composite_updates, g.num_composite_builds
        comps = g.prepare(key, b)
        assert (g.num_composite_updates - updates, g.num_composite_builds - builds) == \
            ((1, 0) if old_sig == sig else (0, 1))
        assert comps[seg].signature == sig and comps[1 - seg] is prev[1 - seg]  # the other segment is shared
        assert g.ready(key, b) and len(g.composites[b]) == 2
        prev = comps
        g._upload(hb, b)
        for c in comps:
            c.launch()
        got = g.layer_graphs[(len(key) - 1, key[-1], b)].logits[:hb.num_seqs].clone()
        torch.testing.assert_close(got, g.run_layerwise(hb), rtol=0, atol=0)
        steps = g.num_composite_steps  # a decode step at this map replays the composites
        torch.testing.assert_close(g.run(hb), got, rtol=0, atol=0)
        assert g.num_composite_steps == steps + 1
    assert g.num_composite_update_failures == 0 and g.num_unflattened == 0 and all(c.flat for c in prev)


def test_flat_composite_has_the_whole_step_graphs_structure(wide):
    """A flat composite of every layer's graph has the node types and edges of a captured whole step, programmatic
    (PDL) edges across the layer boundaries included, and gives its logits bit for bit; the child-graph chain has
    one node per layer instead."""
    import ctypes

    from morphserve.engine.graph_composite import CompositeGraph, chain, cudart, flat_chain, structure

    engine, _, _ = _engine(wide, 64, graphs=True)
    engine.add_request(PARITY_PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for _ in range(4):
        engine.step()
    g = engine.runner.graphs
    hb = _decode_chunks(engine)
    b = g.bucket_for(hb.num_seqs)
    key = g.precision_key()
    children = [g.capture_layer(i, key[i], b).graph.raw_cuda_graph() for i in range(len(key))]
    g._pad_inputs(b)
    batch = g.static_batch(b)
    whole, _ = g._capture_fn(lambda: engine.model.forward(batch, g.pool, g.kernels), keep_graph=True)
    flat, chained = flat_chain(children), chain(children)
    try:
        got, want = structure(flat), structure(whole.raw_cuda_graph())
        assert structure(chained)[0] == ("graph",) * len(key)
    finally:
        cudart().cudaGraphDestroy(ctypes.c_void_p(flat))
        cudart().cudaGraphDestroy(ctypes.c_void_p(chained))
    assert got == want
    edges = got[1]
    assert sum(e[-1] == 1 for e in edges) >= len(key) - 1  # programmatic edges, the layer boundaries' among them
    ref = g.run_layerwise(hb).clone()
    for flat_graph in (True, False):
        c = CompositeGraph(children, flat=flat_graph)
        try:
            g._upload(hb, b)
            c.launch()
            out = g.layer_graphs[(len(key) - 1, key[-1], b)].logits[:hb.num_seqs]
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        finally:
            c.close()


def test_growing_swap_copies_tail_then_head(wide):
    """An up-swap lands byte-identical variant bytes (two-part copy) and restores the FP16 slot exactly."""
    engine, swapper, _ = _engine(wide, 32, graphs=False)
    original = engine.model.arena.slot(1).clone()
    for dst in (P.W4, P.W8, P.FP16, P.W4, P.FP16):
        swapper.request(1, dst)
        swapper.synchronize()  # an up-swap's tail copy lands first
        assert swapper.issue()
        swapper.synchronize()
        swapper.before_layer(1)
        swapper.poll()
        buf = swapper.staged.buffer(1, dst)
        assert torch.equal(engine.model.arena.slot(1)[:buf.numel()].cpu(), buf.cpu())
    assert torch.equal(engine.model.arena.slot(1), original)


def test_staged_landing_copy_is_ordered_between_the_steps_around_it(wide):
    """A staged swap's landing copy runs on the swapper's landing stream: it starts only after the work launched
    before the landing (which still reads the old bytes, here held back by a long sleep on the compute stream), and
    work after :meth:`LayerSwapper.join` sees the new bytes; the first forward after a landing joins by itself."""
    engine, swapper, _ = _engine(wide, 64, graphs=False, staged_swaps=True)
    slot = engine.model.arena.slot(1)
    for dst in (P.W4, P.W8, P.FP16):
        new = swapper.staged.buffer(1, dst).to("cuda")
        s = swapper.request(1, dst)
        swapper.synchronize()  # the bytes are in scratch
        assert swapper.landable() == [s]
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time before the old bytes are read
        old = slot[:new.numel()].clone()  # enqueued on the compute stream after the sleep
        expect_old = swapper.staged.buffer(1, swapper.precision(1)).to("cuda")
        assert swapper.land() == [s]
        swapper.join()
        got = slot[:new.numel()].clone()
        n = min(expect_old.numel(), new.numel())
        assert torch.equal(old[:n], expect_old[:n]), "the landing copy overwrote bytes a step launched before it reads"
        assert torch.equal(got, new), "work after join() does not see the landed bytes"
    # the runner's before_forward joins: a forward right after a landing reads the landed layer
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.runner.hooks = swapper
    engine.add_request(PARITY_PROMPTS[0], params)
    swapper.request(2, P.W4)
    swapper.synchronize()
    torch.cuda._sleep(50_000_000)
    swapper.land()
    assert swapper._landed is not None
    engine.step()
    assert swapper._landed is None
    assert torch.equal(engine.model.arena.slot(2)[:swapper.staged.buffer(2, P.W4).numel()].cpu(),
                       swapper.staged.buffer(2, P.W4))
