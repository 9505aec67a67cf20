"""Issue #5 measurements: layer swaps, decode steps during swaps, KV segment attach/detach, block migration, and
KV capacity per number of W4 layers under an L4-sized (24 GB) memory budget.

Run on a GPU (synthetic weights; the tokenizers come from the data mirror):

    MORPHSERVE_DATA_MIRROR=... python3 benchmarks/bench_morph.py --models llama2-7b llama3-8b --out OUT.json

Writes JSON (with provenance) and prints a Markdown table.  Every number is measured in this run, except KV
capacities, which are computed from the engine's own layouts and sizing rule (and say so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import morphserve.quant  # noqa: E402,F401  (registers W8/W4)
from benchmarks.bench_fastpath import ASYNC_STEPS, inject_decoding  # noqa: E402
from morphserve.engine.config import ACTIVATION_RESERVE_BYTES, EngineConfig  # noqa: E402
from morphserve.engine.engine import LLMEngine  # noqa: E402
from morphserve.engine.morpher import advance_swaps  # noqa: E402
from morphserve.memory.kv_pool import KVPool  # noqa: E402
from morphserve.memory.kv_resizer import KVResizer  # noqa: E402
from morphserve.memory.layer_swapper import LayerSwapper, ScratchBlocks, chunked_copy  # noqa: E402
from morphserve.memory.weight_arena import Precision, layout_for  # noqa: E402
from morphserve.model.config import architecture  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402
from morphserve.quant.staging import StagedVariants  # noqa: E402
from morphserve.quant.variants import VariantBuilder  # noqa: E402

P = Precision
L4_BUDGET = 24 * 10**9
TRANSITIONS = [(P.FP16, P.W8), (P.W8, P.W4), (P.W4, P.W8), (P.W8, P.FP16), (P.FP16, P.W4), (P.W4, P.FP16)]



def pinned_h2d_gbps(nbytes: int = 1 << 30, reps: int = 10) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dev.copy_(host, non_blocking=True)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times[2:]) / 1e9


def stage_layers(engine: LLMEngine, layers: list[int]) -> StagedVariants:
    staged = StagedVariants(engine.model.cfg, engine.model.dtype)
    builder = VariantBuilder(engine.model, "rtn")
    for i in layers:
        staged.add_slot_bytes(i, engine.model.arena.slot(i))
        for p in (P.W8, P.W4):
            staged.add(i, p, builder.layer(i, p))
    return staged


def swap_times(engine, staged, layers, h2d_gbps, reps=3) -> list[dict]:
    sw = LayerSwapper(engine.model.arena, staged, engine.device, time_copies=True)
    rows = []
    for src, dst in TRANSITIONS:
        ms = []
        for layer in layers:
            for _ in range(reps):
                if sw.precision(layer) != src:
                    _land(sw, layer, src)
                s = _land(sw, layer, dst)
                ms.append(s.copy_ms)
        nbytes = layout_for(dst, engine.model.cfg, engine.model.dtype).nbytes
        med = statistics.median(ms)
        rows.append({"transition": f"{src.value}->{dst.value}", "bytes": nbytes, "median_ms": med,
                     "p90_ms": sorted(ms)[int(0.9 * (len(ms) - 1))], "samples": len(ms),
                     "gbps": nbytes / (med / 1e3) / 1e9, "fraction_of_pinned_h2d": nbytes / (med / 1e3) / 1e9 / h2d_gbps})
    for layer in layers:
        _land(sw, layer, P.FP16)
    return rows


def _land(sw: LayerSwapper, layer: int, dst: Precision):
    s = sw.request(layer, dst)
    sw.synchronize()  # an up-swap's tail part
    sw.issue()
    sw.synchronize()
    sw.before_layer(layer)
    sw.poll()
    sw.land(wait=True)  # a staged swap
    return s


class _LayerwiseNoSwap:
    """Hooks that are always active and do nothing: decode steps replay the per-layer graphs without a swap (the
    baseline that isolates the cost of the swap itself from the cost of replaying layer by layer)."""

    def __init__(self, arena):
        self.arena = arena

    def active(self) -> bool:
        return True

    def step_precision(self, layer: int):
        return self.arena.layers[layer].precision

    def before_forward(self) -> None: ...

    def before_layer(self, layer: int) -> None: ...

    def after_layer(self, layer: int) -> None: ...

    def after_step(self) -> None: ...


def decode_during_swaps(engine, staged, layers, batch: int, context: int, steps: int = 24,
                        bare_mib: tuple[int, ...] = (), staged_swaps: bool = False,
                        segment_layers: int | None = None, copy_budget_mib: int | None = None,
                        map_graphs: str = "whole") -> dict:
    """Steady decode of ``batch`` requests.  Per-step wall time: the host clock around ``engine.step()``, which
    returns once the step's sampled tokens are on the host (the copy stream is never synchronised, so a copy
    overlaps the steps as in serving).  Four settings on the same requests: no swap with the whole-step graph, no
    swap replaying the per-layer graphs, no swap eager, and one FP16<->W4 swap of a staged layer requested before
    every step (its copy overlaps that step and the next; such steps replay the per-layer graphs with the
    swapper's hooks between them).  The graphs the swaps need are captured before timing.  Every timed block
    starts on a fresh batch at ``context`` (see ``fresh``).

    ``staged_swaps``: the swaps are staged (bytes through scratch KV blocks, landing between steps): as the morpher
    does (:func:`~morphserve.engine.morpher.land_staged`), right after each launch the destination map's
    composite graphs are built and the swaps whose bytes are in scratch land (both inside the step's timed
    window).  ``segment_layers``: layers per composite segment (None: the decode graphs' default);
    ``copy_budget_mib``: staged swaps' copies enqueued per step (None: all at the request)."""
    scratch_blocks = ScratchBlocks(engine.pool, engine.block_manager) if staged_swaps else None
    if segment_layers is not None:
        engine.runner.graphs.set_segment_layers(segment_layers)
    sw = LayerSwapper(engine.model.arena, staged, engine.device, scratch=scratch_blocks,
                      copy_budget=copy_budget_mib << 20 if staged_swaps and copy_budget_mib else None)
    rng = np.random.default_rng(0)

    def fresh():
        """A new batch prefilled to ``context`` (injected: random K/V).  Attention's cost grows with the context,
        and a run of a few hundred steps on one batch compared blocks measured hundreds of tokens apart (the
        campaigns before the fourth, 2026-12-02, did, which inflated every ratio against the first block)."""
        for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            engine.abort(r.request_id)
        inject_decoding(engine, batch, context, rng)

    fresh()
    engine.step()
    graphs = engine.runner.graphs
    b = graphs.bucket_for(batch)
    for i in range(engine.model.cfg.num_layers):
        graphs.capture_layer(i, P.FP16, b)
    for i in layers:
        graphs.capture_layer(i, P.W4, b)
        graphs.capture_layer(i, P.W8, b)
    # warm-up over: freeze the heap as a serving engine does (LLMEngine.warmed_up), so that no full garbage
    # collection walks it inside a timed step (runs up to 18 did not freeze; one step of run 18 spent 1.85 ms
    # preparing its batch, cause not established).  close() first: freeze again with this setup's objects.
    engine.close()
    engine.warmed_up()

    def timed(n, before=None) -> list[float]:
        fresh()
        out = []
        for k in range(n + 2):  # two untimed steps first
            if before:
                before(k)
            t = time.perf_counter()
            engine.step()
            if k >= 2:
                out.append(time.perf_counter() - t)
        return out

    from morphserve.engine.model_runner import StepTiming

    runner = engine.runner
    runner.timing = StepTiming()
    base_graph = timed(steps)
    base_device = runner.timing.device_forward[2:]
    runner.timing = None
    runner.hooks = _LayerwiseNoSwap(engine.model.arena)
    base_layerwise = timed(steps)
    runner.hooks = None
    runner.graphs = None
    base_eager = timed(steps)
    runner.graphs = graphs
    engine.morpher = None
    runner.hooks = sw

    def issue_and_poll():
        advance_swaps(sw, graphs)

    runner.after_launch = issue_and_poll
    cycle = [(layers[k % len(layers)], P.W4 if (k // len(layers)) % 2 == 0 else P.FP16) for k in range(steps + 2)]
    layerwise0 = graphs.num_layerwise_steps

    def swap_each_step(k):
        layer, dst = cycle[k]
        if sw.precision(layer) != dst and not sw.busy(layer):
            sw.request(layer, dst)

    graphs.full_capture_after = 10**9  # no whole-step capture of the transient maps inside the timed steps
    runner.timing = StepTiming()
    swapping = timed(steps, swap_each_step)
    swap_device = runner.timing.device_forward[2:]
    runner.timing = None
    swap_layerwise = graphs.num_layerwise_steps - layerwise0
    while sw.swaps:  # let the last swaps land
        engine.step()
    # one swap at a time: every step from its request until it has landed (tail, head, switch), per transition.
    # Each is also compared with whole-graph steps at its source and at its destination map without any swap: a step
    # that runs the layer at W4/W8 costs what that precision's kernels cost (issue #3), swap or not.
    # The same steps also give a no-swap control: the worst of a few steps is above their median by noise alone,
    # and a swap's worst step is the worst of its 3-28 steps, so the destination map is timed for as many steps as
    # the swap took (the worst of more steps is higher by noise alone: a paced swap's 26 against 4 steps).
    def map_graph_ms(n: int = 4) -> tuple[float, float]:
        """This map's graph steps (whole-step graph, or its composite segments with ``map_graphs="composite"``):
        median and worst of ``n`` steps on a fresh batch, in ms."""
        if map_graphs == "whole":
            graphs.capture(b)  # (outside the timed steps)
        else:  # the map runs its composites: no whole-step graph (a swap then switches one segment, not the step)
            key = graphs.precision_key()
            graphs.graphs.pop(key, None)
            if not graphs.ready(key, b):
                graphs.prepare(key, b)
        ts = timed(n)
        return 1e3 * statistics.median(ts), 1e3 * max(ts)

    single = []
    for src, dst in ((P.FP16, P.W4), (P.W4, P.FP16), (P.FP16, P.W8), (P.W8, P.FP16)):
        for layer in layers:
            if sw.precision(layer) != src:
                _land(sw, layer, src)
            engine.step()
            src_ms, src_worst = map_graph_ms()
            fresh()
            engine.step()
            sw.request(layer, dst)
            during = []
            runner.timing = StepTiming()
            while sw.busy(layer):
                t = time.perf_counter()
                engine.step()
                during.append(time.perf_counter() - t)
            if staged_swaps:  # it landed after the last step's launch: the next step is the first at the new map
                t = time.perf_counter()
                engine.step()
                during.append(time.perf_counter() - t)
            dev = runner.timing.device_forward
            host = runner.timing
            runner.timing = None
            dst_ms, dst_worst = map_graph_ms(max(4, len(during)))
            single.append({"transition": f"{src.value}->{dst.value}", "layer": layer, "steps": len(during),
                           "max_ms": 1e3 * max(during), "mean_ms": 1e3 * statistics.fmean(during),
                           "max_vs_graph": max(during) / statistics.median(base_graph),
                           "src_map_graph_ms": src_ms, "dst_map_graph_ms": dst_ms,
                           "max_vs_maps": 1e3 * max(during) / max(src_ms, dst_ms),
                           # worst of 4 source-map steps, worst of max(4, steps) destination-map steps
                           "control_worst_vs_maps": [src_worst / max(src_ms, dst_ms),
                                                     dst_worst / max(src_ms, dst_ms)],
                           "control_steps": [4, max(4, len(during))],
                           "step_ms": [1e3 * x for x in during], "device_ms": [1e3 * x for x in dev],
                           "host_prepare_ms": [1e3 * x for x in host.host_prepare],
                           "host_launch_ms": [1e3 * x for x in host.host_launch],
                           "host_after_launch_ms": [1e3 * x for x in host.host_after_launch],
                           "run_wall_ms": [1e3 * x for x in host.wall]})
    # the same whole-graph steps with a bare host-to-device copy of a layer's size in flight on a side stream (no
    # swap logic at all): separates interference of the copy itself from the cost of the swap machinery
    scratch = torch.empty(engine.model.arena.slot_bytes, dtype=torch.uint8, device="cuda")
    host = staged.buffer(layers[0], P.FP16)
    side = torch.cuda.Stream()

    def bare_copy(k):
        with torch.cuda.stream(side):
            scratch[:host.numel()].copy_(host, non_blocking=True)

    def bare_chunked(k):
        with torch.cuda.stream(side):
            chunked_copy(scratch[:host.numel()], host)

    runner.hooks = runner.after_launch = None
    by_size = []
    for mib in bare_mib:  # smaller copies: does an effect scale with the bytes copied per step?
        nb = min(mib << 20, host.numel())

        def sized(k, nb=nb):
            with torch.cuda.stream(side):
                scratch[:nb].copy_(host[:nb], non_blocking=True)

        runner.timing = StepTiming()
        t_sized = timed(steps, sized)
        by_size.append({"mib": nb / 2**20, "ms": 1e3 * statistics.median(t_sized),
                        "device_ms": 1e3 * statistics.median(runner.timing.device_forward[2:]),
                        "vs_graph": statistics.median(t_sized) / statistics.median(base_graph)})
        side.synchronize()
    runner.timing = StepTiming()
    bare = timed(steps, bare_copy)
    bare_device = runner.timing.device_forward[2:]
    runner.timing = StepTiming()
    bare_c = timed(steps, bare_chunked)
    bare_c_device = runner.timing.device_forward[2:]
    runner.timing = None
    side.synchronize()
    del scratch
    for layer in layers:
        if sw.precision(layer) != P.FP16:
            _land(sw, layer, P.FP16)
    graphs.full_capture_after = 0
    if len(engine.scheduler.running) != batch:
        raise RuntimeError(f"the batch shrank to {len(engine.scheduler.running)} of {batch} running requests during "
                           f"the measurement (max_tokens too small?): its step times would not be comparable")
    for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(r.request_id)
    med = statistics.median
    # the composite counters are cumulative over this engine's runs (every batch size and path before this one)
    return {"batch": batch, "context": context, "steps": steps, "staged_swaps": staged_swaps,
            "copy_budget_mib": copy_budget_mib if staged_swaps else None, "map_graphs": map_graphs,
            "composite_builds": graphs.num_composite_builds, "composite_updates": graphs.num_composite_updates,
            "composite_steps": graphs.num_composite_steps, "segment_layers": graphs.segment_layers,
            "no_swap_graph_ms": 1e3 * med(base_graph),
            "no_swap_layerwise_ms": 1e3 * med(base_layerwise),
            "no_swap_eager_ms": 1e3 * med(base_eager),
            "swapping_ms": 1e3 * med(swapping),
            "swapping_mean_ms": 1e3 * statistics.fmean(swapping),
            "swapping_max_ms": 1e3 * max(swapping),
            "ratio_vs_graph": med(swapping) / med(base_graph),
            "ratio_mean_vs_graph": statistics.fmean(swapping) / statistics.fmean(base_graph),
            "ratio_vs_layerwise": med(swapping) / med(base_layerwise),
            "ratio_layerwise_vs_graph": med(base_layerwise) / med(base_graph),
            "ratio_vs_eager": med(swapping) / med(base_eager),
            "swap_steps_layerwise": swap_layerwise,
            "single_swaps": single,
            "swapping_device_ms": [1e3 * x for x in swap_device],
            "no_swap_graph_device_ms": 1e3 * med(base_device),
            "bare_copy_each_step_ms": 1e3 * med(bare),
            "bare_copy_device_ms": 1e3 * med(bare_device),
            "bare_copy_vs_graph": med(bare) / med(base_graph),
            "bare_copy_by_size": by_size,
            "bare_chunked_copy_each_step_ms": 1e3 * med(bare_c),
            "bare_chunked_copy_device_ms": 1e3 * med(bare_c_device),
            "bare_chunked_copy_vs_graph": med(bare_c) / med(base_graph),
            "single_swap_worst_vs_graph": max(x["max_vs_graph"] for x in single),
            "single_swap_worst_vs_maps": max(x["max_vs_maps"] for x in single),
            "swaps_issued": len(sw.completed) + len(sw.swaps)}


def segment_ops(engine, staged, layer: int) -> dict:
    sw = LayerSwapper(engine.model.arena, staged, engine.device)
    rs = KVResizer(engine.pool, engine.block_manager, engine.model.arena, lambda: tables)
    tables: list[list[int]] = []
    _land(sw, layer, P.W4)
    torch.cuda.synchronize()
    t = time.perf_counter()
    added = rs.grow(layer)
    attach_ms = 1e3 * (time.perf_counter() - t)
    # fill the segment with live blocks (extension-first allocation), then migrate them out (copy + table remap)
    bm = engine.block_manager
    bm.extension_first = True
    tables.append(bm.allocate(added))
    bm.extension_first = False
    assert all(b >> engine.pool.shift == 1 + 2 * layer for b in tables[0])
    rs.begin_release(layer, P.FP16)
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    ev0.record()
    moved = rs.migrate(rs.regions_of(layer)[0])
    ev1.record()
    torch.cuda.synchronize()
    migrate_s = time.perf_counter() - t
    migrate_device_ms = ev0.elapsed_time(ev1)
    t = time.perf_counter()
    detached = rs.try_finish_release(layer)
    detach_ms = 1e3 * (time.perf_counter() - t)
    bm.free_blocks(tables[0])
    _land(sw, layer, P.FP16)
    return {"layer": layer, "blocks_attached": added, "attach_ms": attach_ms, "detach_ms": detach_ms,
            "detached": detached, "migrated_blocks": moved, "block_bytes": engine.pool.block_bytes,
            "migration_ms_per_block": 1e3 * migrate_s / max(moved, 1),
            "migration_device_ms_per_block": migrate_device_ms / max(moved, 1)}


def kv_capacity(model: str) -> list[dict]:
    """Computed (not timed): base blocks the engine's sizing rule gives under the 24 GB budget, plus the extension
    blocks each W4 layer's freed slot tail holds."""
    cfg, dtype = architecture(model), torch.float16
    block = KVPool.block_nbytes(cfg, 16, dtype)
    weights = cfg.param_count() * 2
    base = EngineConfig(memory_budget_bytes=L4_BUDGET).kv_blocks(block, weights, torch.device("cuda"), 10**9)
    slot = layout_for(P.FP16, cfg, dtype).nbytes
    per_layer = (slot - layout_for(P.W4, cfg, dtype).nbytes - 256) // block
    return [{"w4_layers": k, "blocks": base + k * per_layer, "vs_fp16": (base + k * per_layer) / base}
            for k in range(cfg.num_layers + 1)]


def run_model(name: str, h2d: float, args) -> dict:
    engine = LLMEngine(EngineConfig(model=name, device="cuda", dtype="float16", num_kv_blocks=args.kv_blocks,
                                    max_num_seqs=max(args.batch, 8), async_steps=ASYNC_STEPS[args.async_steps]))
    layers = [0, engine.model.cfg.num_layers // 2, engine.model.cfg.num_layers - 1]
    staged = stage_layers(engine, layers)
    out = {"model": name, "synthetic_weights": engine.synthetic_weights,
           "slot_bytes": engine.model.arena.slot_bytes,
           "swaps": swap_times(engine, staged, layers, h2d)}
    runs = [(st, seg, mib) for st in args.swap_paths for seg in (args.segment_layers if st else [None])
            for mib in (args.copy_budget_mib if st else [0])]
    out["decode_during_swaps"] = [decode_during_swaps(engine, staged, layers, b, args.context,
                                                      bare_mib=tuple(args.bare_copy_mib), staged_swaps=st,
                                                      segment_layers=seg, copy_budget_mib=mib or None,
                                                      map_graphs=args.map_graphs)
                                  for st, seg, mib in runs for b in args.batch_sizes]
    out["segment"] = segment_ops(engine, staged, layers[1])
    out["kv_capacity_24GB"] = kv_capacity(name)
    engine.close()
    del engine, staged
    torch.cuda.empty_cache()
    return out


def _label(d: dict) -> str:
    """A decode-during-swaps row's batch and swap path."""
    if not d.get("staged_swaps"):
        return f"{d['batch']} (in-place)"
    paced = f", {d['copy_budget_mib']} MiB/step" if d.get("copy_budget_mib") else ""
    maps = ", maps on composites" if d.get("map_graphs") == "composite" else ""
    return f"{d['batch']} (staged, {d.get('segment_layers', 'all')}-layer segments{paced}{maps})"


def single_swap_rows(res: dict, limit: float = 1.05) -> list[str]:
    """The campaign tables' summary of the one-swap-at-a-time steps (BENCHMARKS.md, issue 5): per model and row,
    each swap's worst step against the slower of its two maps (range, median, how many within ``limit``), its mean
    step against the same (median and largest), the no-swap control (worst of as many destination-map steps as
    the swap took, against the map; median over the swaps, and how many are within ``limit``: the rate at which
    no-swap steps alone miss the bound), the swap's worst step against that control's worst (like against like:
    how many within ``limit``, largest), and its median step against the maps (largest)."""
    rows = ["| model | batch | copies | worst vs maps: range | median | within %.2fx | mean vs maps: median, max | "
            "control: median, within | worst vs control's worst: within, max | median step vs maps: max |" % limit,
            "|---|---|---|---|---|---|---|---|---|---|"]
    for m in res["models"]:
        for d in m["decode_during_swaps"]:
            xs = d["single_swaps"]
            maps = [max(x["src_map_graph_ms"], x["dst_map_graph_ms"]) for x in xs]
            worst = [x["max_vs_maps"] for x in xs]
            mean = [x["mean_ms"] / ms for x, ms in zip(xs, maps)]
            control = [x["control_worst_vs_maps"][-1] for x in xs]
            vs_control = [x["max_vs_maps"] / c for x, c in zip(xs, control)]
            median_step = [statistics.median(x["step_ms"]) / ms for x, ms in zip(xs, maps)]
            copies = f"{d['copy_budget_mib']} MiB/step" if d.get("copy_budget_mib") else "unpaced"
            rows.append(f"| {m['model']} | {d['batch']} | {copies} | {min(worst):.3f}-{max(worst):.3f}x | "
                        f"{statistics.median(worst):.3f}x | {sum(w <= limit for w in worst)} of {len(worst)} | "
                        f"{statistics.median(mean):.3f}x, {max(mean):.3f}x | "
                        f"{statistics.median(control):.3f}x, {sum(c <= limit for c in control)} of {len(xs)} | "
                        f"{sum(v <= limit for v in vs_control)} of {len(xs)}, {max(vs_control):.3f}x | "
                        f"{max(median_step):.3f}x |")
    return rows


def worst_step_rows(res: dict, limit: float = 1.05) -> list[str]:
    """Where the worst step of each swap beyond ``limit`` (worst step vs maps) spent its time, against the median
    of the same swap's steps (ms): the step, the GPU time (CUDA events around the forward), the batch preparation,
    the launch (enqueue until the end event, and the after-launch callback that issues copies and builds graphs;
    files from before 2026-12-02 23:00 UTC have only their sum)."""
    rows = ["| model | batch | transition | layer | worst step / of | step | GPU | prepare | enqueue | after launch |",
            "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(xs: list[float], i: int) -> str:  # (asynchronous steps: a swap's last GPU time may be missing)
        return f"{xs[i]:.2f} ({statistics.median(xs):.2f})" if i < len(xs) else "-"

    for m in res["models"]:
        for d in m["decode_during_swaps"]:
            for x in d["single_swaps"]:
                if x["max_vs_maps"] <= limit:
                    continue
                i = x["step_ms"].index(max(x["step_ms"]))
                after = x.get("host_after_launch_ms", [])
                enqueue = [a - b for a, b in zip(x["host_launch_ms"], after)] if after else x["host_launch_ms"]
                rows.append(f"| {m['model']} | {d['batch']} | {x['transition']} | {x['layer']} | {i + 1} / "
                            f"{x['steps']} | {cell(x['step_ms'], i)} | {cell(x['device_ms'], i)} | "
                            f"{cell(x['host_prepare_ms'], i)} | {cell(enqueue, i)} | {cell(after, i)} |")
    return rows


def markdown(res: dict) -> str:
    lines = [f"Pinned host-to-device bandwidth (1 GiB copy, median of 10): **{res['pinned_h2d_gbps']:.1f} GB/s**", ""]
    for m in res["models"]:
        lines += [f"### {m['model']} (synthetic weights: {m['synthetic_weights']})", "",
                  "| transition | bytes | median ms | GB/s | of pinned H2D |", "|---|---|---|---|---|"]
        for r in m["swaps"]:
            lines.append(f"| {r['transition']} | {r['bytes'] / 1e6:.1f} MB | {r['median_ms']:.2f} | {r['gbps']:.1f} | "
                         f"{r['fraction_of_pinned_h2d']:.0%} |")
        lines += ["", "| batch | context | no swap, graph (ms) | no swap, per-layer graphs (ms) | no swap, eager (ms) | "
                      "swap every step, median (mean, max) ms | vs graph (median, mean) | vs per-layer graphs | "
                      "per-layer vs whole graph |", "|---|---|---|---|---|---|---|---|---|"]
        for d in m["decode_during_swaps"]:
            lines.append(f"| {_label(d)} | {d['context']} | {d['no_swap_graph_ms']:.2f} | "
                         f"{d['no_swap_layerwise_ms']:.2f} | {d['no_swap_eager_ms']:.2f} | {d['swapping_ms']:.2f} "
                         f"({d['swapping_mean_ms']:.2f}, {d['swapping_max_ms']:.2f}) | {d['ratio_vs_graph']:.3f}x, "
                         f"{d['ratio_mean_vs_graph']:.3f}x | {d['ratio_vs_layerwise']:.3f}x | "
                         f"{d['ratio_layerwise_vs_graph']:.3f}x |")
        lines += ["", "| batch | no swap, graph: wall / device (ms) | bare layer-sized H2D copy in flight each step: "
                      "wall / device (ms) | ratio | the same copy in 16 MiB pieces: wall / device (ms) | ratio |",
                  "|---|---|---|---|---|---|"]
        for d in m["decode_during_swaps"]:
            lines.append(f"| {_label(d)} | {d['no_swap_graph_ms']:.2f} / {d['no_swap_graph_device_ms']:.2f} | "
                         f"{d['bare_copy_each_step_ms']:.2f} / {d['bare_copy_device_ms']:.2f} | "
                         f"{d['bare_copy_vs_graph']:.3f}x | {d['bare_chunked_copy_each_step_ms']:.2f} / "
                         f"{d['bare_chunked_copy_device_ms']:.2f} | {d['bare_chunked_copy_vs_graph']:.3f}x |")
        lines += ["", "Bare copies of other sizes before each step (MiB: wall ms, device ms, ratio): " + "; ".join(
            f"batch {_label(d)}: " + ", ".join(f"{x['mib']:.0f}: {x['ms']:.2f}, {x['device_ms']:.2f}, {x['vs_graph']:.3f}x"
                                               for x in d.get("bare_copy_by_size", []))
            for d in m["decode_during_swaps"])]
        lines += ["", "One swap at a time (every step from its request until it landed; worst step over the staged "
                      "layers, against the no-swap whole-graph step at FP16, and against the slower of the "
                      "whole-graph steps at the swap's source and destination maps without a swap):", "",
                  "| batch | transition | steps in flight | worst step (ms) | mean step (ms) | worst vs FP16 graph | "
                  "worst vs source/destination map | no-swap control: worst of as many destination-map steps, vs map, "
                  "median |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in m["decode_during_swaps"]:
            by = {}
            for x in d["single_swaps"]:
                by.setdefault(x["transition"], []).append(x)
            for tr, xs in by.items():
                w = max(xs, key=lambda x: x["max_ms"])
                lines.append(f"| {_label(d)} | {tr} | {'/'.join(str(x['steps']) for x in xs)} | {w['max_ms']:.2f} | "
                             f"{statistics.fmean(x['mean_ms'] for x in xs):.2f} | {w['max_vs_graph']:.3f}x | "
                             f"{max(x['max_vs_maps'] for x in xs):.3f}x | "
                             f"{statistics.median(x['control_worst_vs_maps'][-1] for x in xs):.3f}x |")
        s = m["segment"]
        lines += ["", f"Segment of layer {s['layer']}: {s['blocks_attached']} blocks; attach {s['attach_ms']:.3f} ms, "
                      f"detach {s['detach_ms']:.3f} ms (host time); migration {s['migration_ms_per_block']:.3f} ms "
                      f"(device time {s.get('migration_device_ms_per_block', float('nan')):.3f} ms) per "
                      f"{s['block_bytes'] / 2**20:.0f} MiB block ({s['migrated_blocks']} blocks)", ""]
        caps = m["kv_capacity_24GB"]
        pick = [c for c in caps if c["w4_layers"] in (0, 4, 8, 16, 24, len(caps) - 1)]
        lines += ["KV capacity under a 24 GB budget (computed from the layouts): " +
                  ", ".join(f"{c['w4_layers']} W4 layers: {c['blocks']} blocks ({c['vs_fp16']:.2f}x)" for c in pick), ""]
    return "\n".join(lines + single_swap_rows(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama2-7b", "llama3-8b"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--kv-blocks", type=int, default=3072,
                    help="KV pool blocks (batch 32 at context 512 with the run's 544 output tokens needs 2112 on the 7B)")
    ap.add_argument("--bare-copy-mib", type=int, nargs="*", default=[16, 128],
                    help="also time steps with a bare host-to-device copy of this many MiB issued before each")
    ap.add_argument("--swap-paths", default="in-place,staged",
                    help="swap paths to time: in-place (per-layer graphs with hooks), staged (scratch + composites)")
    ap.add_argument("--segment-layers", type=int, nargs="+", default=[8],
                    help="layers per composite segment for the staged path (each value is one staged run)")
    ap.add_argument("--map-graphs", choices=["whole", "composite"], default="whole",
                    help="single swaps: the maps around each swap replay whole-step graphs (captured before), or "
                         "composite segments only (a landing switches one segment)")
    ap.add_argument("--copy-budget-mib", type=int, nargs="+", default=[0],
                    help="staged swaps' copies enqueued per step, MiB (0: all at the request); one staged run each")
    ap.add_argument("--async-steps", choices=["on", "off", "default"], default="default",
                    help="asynchronous steps (EngineConfig.async_steps: each step is launched before the previous "
                         "step's tokens are read back; a step's wall is then the period between steps): on, off, or "
                         "the engine's default (on with CUDA graphs)")
    ap.add_argument("--source-commit", default=None, help="the commit of the tree (the box's git metadata is stale)")
    ap.add_argument("--out", default="benchmarks/results/morph.json")
    ap.add_argument("--summarise", type=Path, nargs="+", metavar="JSON",
                    help="print the one-swap summary table of earlier results files and exit (no GPU needed)")
    args = ap.parse_args()
    if args.summarise:
        results = [json.loads(f.read_text()) for f in args.summarise]
        rows = [single_swap_rows(r) for r in results]
        print("\n".join(rows[0] + [r for rs in rows[1:] for r in rs[2:]]))
        rows = [worst_step_rows(r) for r in results]
        print("\nWorst steps beyond 1.05x (this step, and the swap's median in brackets; ms)\n")
        print("\n".join(rows[0] + [r for rs in rows[1:] for r in rs[2:]]))
        return
    args.batch = max(args.batch_sizes)
    paths = {"in-place": False, "staged": True}
    try:
        args.swap_paths = [paths[p] for p in args.swap_paths.split(",")]
    except KeyError as e:
        raise SystemExit(f"--swap-paths: unknown path {e.args[0]!r} (known: {', '.join(paths)})") from None
    h2d = pinned_h2d_gbps()
    res = {"pinned_h2d_gbps": h2d, "models": [run_model(m, h2d, args) for m in args.models],
           "reserve_bytes": ACTIVATION_RESERVE_BYTES,
           "provenance": provenance(vars(args), "cuda", None, True)}
    if args.source_commit:
        res["provenance"]["source_commit"] = args.source_commit
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(markdown(res))


if __name__ == "__main__":
    main()
