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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import morphserve.quant  # noqa: E402,F401  (registers W8/W4)
from morphserve.engine.config import ACTIVATION_RESERVE_BYTES, EngineConfig  # noqa: E402
from morphserve.engine.engine import LLMEngine  # noqa: E402
from morphserve.engine.sampling_params import SamplingParams  # noqa: E402
from morphserve.memory.kv_pool import KVPool  # noqa: E402
from morphserve.memory.kv_resizer import KVResizer  # noqa: E402
from morphserve.memory.layer_swapper import LayerSwapper  # noqa: E402
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
    sw.issue()
    sw.synchronize()
    sw.before_layer(layer)
    sw.poll()
    return s


def decode_during_swaps(engine, staged, layers, batch: int, context: int, steps: int = 24) -> dict:
    """Steady decode of ``batch`` requests; per-step wall time (synchronised) without swaps (graphs when the engine
    has them, and eager), and with one FP16<->W4 swap of a staged layer issued every step (such steps run eagerly
    with the per-layer hooks)."""
    sw = LayerSwapper(engine.model.arena, staged, engine.device)
    params = SamplingParams(max_tokens=4 * steps + 8, ignore_eos=True)
    prompt = list(range(100, 100 + context))
    for _ in range(batch):
        engine.add_request(prompt, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    engine.step()

    def timed(n, before=None) -> list[float]:
        out = []
        for k in range(n):
            if before:
                before(k)
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
        return out

    base_graph = timed(steps)
    graphs, engine.runner.graphs = engine.runner.graphs, None
    base_eager = timed(steps)
    engine.runner.graphs = graphs
    engine.morpher = None
    engine.runner.hooks = sw
    engine.runner.after_launch = sw.issue
    cycle = [(layers[k % len(layers)], P.W4 if (k // len(layers)) % 2 == 0 else P.FP16) for k in range(steps)]

    def swap_each_step(k):
        sw.poll()
        layer, dst = cycle[k]
        if sw.precision(layer) != dst and not sw.busy(layer):
            sw.request(layer, dst)

    swapping = timed(steps, swap_each_step)
    sw.synchronize()
    engine.runner.hooks = engine.runner.after_launch = None
    for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(r.request_id)
    return {"batch": batch, "context": context, "steps": steps,
            "no_swap_graph_ms": 1e3 * statistics.median(base_graph),
            "no_swap_eager_ms": 1e3 * statistics.median(base_eager),
            "swapping_ms": 1e3 * statistics.median(swapping),
            "ratio_vs_graph": statistics.median(swapping) / statistics.median(base_graph),
            "ratio_vs_eager": statistics.median(swapping) / statistics.median(base_eager),
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
    t = time.perf_counter()
    moved = rs.migrate(rs.regions_of(layer)[0])
    torch.cuda.synchronize()
    migrate_s = time.perf_counter() - t
    t = time.perf_counter()
    detached = rs.try_finish_release(layer)
    detach_ms = 1e3 * (time.perf_counter() - t)
    bm.free_blocks(tables[0])
    _land(sw, layer, P.FP16)
    return {"layer": layer, "blocks_attached": added, "attach_ms": attach_ms, "detach_ms": detach_ms,
            "detached": detached, "migrated_blocks": moved, "block_bytes": engine.pool.block_bytes,
            "migration_ms_per_block": 1e3 * migrate_s / max(moved, 1)}


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
                                    max_num_seqs=max(args.batch, 8)))
    layers = [0, engine.model.cfg.num_layers // 2, engine.model.cfg.num_layers - 1]
    staged = stage_layers(engine, layers)
    out = {"model": name, "synthetic_weights": engine.synthetic_weights,
           "slot_bytes": engine.model.arena.slot_bytes,
           "swaps": swap_times(engine, staged, layers, h2d)}
    out["decode_during_swaps"] = [decode_during_swaps(engine, staged, layers, b, args.context) for b in args.batch_sizes]
    out["segment"] = segment_ops(engine, staged, layers[1])
    out["kv_capacity_24GB"] = kv_capacity(name)
    del engine, staged
    torch.cuda.empty_cache()
    return out


def markdown(res: dict) -> str:
    lines = [f"Pinned host-to-device bandwidth (1 GiB copy, median of 10): **{res['pinned_h2d_gbps']:.1f} GB/s**", ""]
    for m in res["models"]:
        lines += [f"### {m['model']} (synthetic weights: {m['synthetic_weights']})", "",
                  "| transition | bytes | median ms | GB/s | of pinned H2D |", "|---|---|---|---|---|"]
        for r in m["swaps"]:
            lines.append(f"| {r['transition']} | {r['bytes'] / 1e6:.1f} MB | {r['median_ms']:.2f} | {r['gbps']:.1f} | "
                         f"{r['fraction_of_pinned_h2d']:.0%} |")
        lines += ["", "| batch | context | no swap, graph (ms) | no swap, eager (ms) | swap in flight (ms) | "
                      "vs graph | vs eager |", "|---|---|---|---|---|---|---|"]
        for d in m["decode_during_swaps"]:
            lines.append(f"| {d['batch']} | {d['context']} | {d['no_swap_graph_ms']:.2f} | {d['no_swap_eager_ms']:.2f} | "
                         f"{d['swapping_ms']:.2f} | {d['ratio_vs_graph']:.2f}x | {d['ratio_vs_eager']:.2f}x |")
        s = m["segment"]
        lines += ["", f"Segment of layer {s['layer']}: {s['blocks_attached']} blocks; attach {s['attach_ms']:.3f} ms, "
                      f"detach {s['detach_ms']:.3f} ms (host time); migration {s['migration_ms_per_block']:.3f} ms per "
                      f"{s['block_bytes'] / 2**20:.0f} MiB block ({s['migrated_blocks']} blocks)", ""]
        caps = m["kv_capacity_24GB"]
        pick = [c for c in caps if c["w4_layers"] in (0, 4, 8, 16, 24, len(caps) - 1)]
        lines += ["KV capacity under a 24 GB budget (computed from the layouts): " +
                  ", ".join(f"{c['w4_layers']} W4 layers: {c['blocks']} blocks ({c['vs_fp16']:.2f}x)" for c in pick), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama2-7b", "llama3-8b"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--kv-blocks", type=int, default=2048)
    ap.add_argument("--out", default="benchmarks/results/morph.json")
    args = ap.parse_args()
    args.batch = max(args.batch_sizes)
    h2d = pinned_h2d_gbps()
    res = {"pinned_h2d_gbps": h2d, "models": [run_model(m, h2d, args) for m in args.models],
           "reserve_bytes": ACTIVATION_RESERVE_BYTES,
           "provenance": provenance(vars(args), "cuda", None, True)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(markdown(res))


if __name__ == "__main__":
    main()
