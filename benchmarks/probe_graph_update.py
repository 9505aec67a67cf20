#!/usr/bin/env python3
"""Can one executable graph per batch bucket be re-targeted to another precision map by ``cudaGraphExecUpdate``?

Background (issue #5): a decode step with a layer swap in flight replays one CUDA graph per layer, and each graph
boundary costs the GPU 10-17 us (``probe_swap_step.py``: the same kernels chained as child graphs of one
executable graph run at the whole graph's speed, but building that composite costs 3-5 ms of
``cudaGraphInstantiate`` per precision map).  ``cudaGraphExecUpdate`` rewrites an instantiated graph's node
parameters in place when the new graph has the same topology, which is far cheaper than instantiating.  It works
here only if a layer's graph has the same node structure at FP16, W8 and W4 for a batch bucket.  This probe
measures, on synthetic weights with W8/W4 staged for three layers:

* each per-layer graph's node count and node types at every precision (does the structure match?);
* ``cudaGraphExecUpdate`` of the all-FP16 composite to the map with one layer at W8 or W4: the result code and
  host time, against a fresh ``cudaGraphInstantiate``;
* where the update succeeds: the logits of the updated composite against the per-layer replay of the same map
  (the layer's real W8/W4 bytes copied into its slot first), and its GPU time against the map's whole-step graph.

With ``--map-steps``, also the decode step of the all-W4 map (every layer swapped to W4), whole-step graph, with
and without programmatic dependent launch (PDL) in the W4/W8 kernels (every other kernel keeps its PDL): what PDL
in the quantized kernels saves per step.

    MORPHSERVE_DATA_MIRROR=... python3 benchmarks/probe_graph_update.py --models llama2-7b --batches 1 8 32 --out probe.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import morphserve.quant  # noqa: E402,F401  (registers W8/W4)
from benchmarks.bench_morph import _land, stage_layers  # noqa: E402
from benchmarks.probe_swap_step import Composite, cudart, decode_batch, keep_graphs, timed  # noqa: E402
from morphserve.engine.config import EngineConfig  # noqa: E402
from morphserve.engine.engine import LLMEngine  # noqa: E402
from morphserve.engine.graph_composite import UpdateResultInfo, structure  # noqa: E402
from morphserve.memory.layer_swapper import LayerSwapper  # noqa: E402
from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402

P = Precision
# cudaGraphExecUpdateResult
UPDATE_RESULTS = {0: "success", 1: "error", 2: "topology changed", 3: "node type changed", 4: "function changed",
                  5: "parameters changed", 6: "not supported", 7: "unsupported function change",
                  8: "attributes changed"}
def probe(name: str, batches: list[int], context: int, reps: int, rt: ctypes.CDLL) -> dict:
    engine = LLMEngine(EngineConfig(model=name, device="cuda", dtype="float16", num_kv_blocks=3072,
                                    max_num_seqs=max(batches + [8])))
    nl = engine.model.cfg.num_layers
    layers = [0, nl // 2, nl - 1]
    staged = stage_layers(engine, layers)
    sw = LayerSwapper(engine.model.arena, staged, engine.device)
    graphs = engine.runner.graphs
    rng = np.random.default_rng(0)
    out = {"model": name, "layers": layers, "buckets": []}
    for batch in batches:
        hb, b = decode_batch(engine, batch, context, rng)
        lg = {(i, P.FP16): graphs.capture_layer(i, P.FP16, b) for i in range(nl)}
        for i in layers:
            for p in (P.W8, P.W4):
                lg[(i, p)] = graphs.capture_layer(i, p, b)
        row: dict = {"batch": batch, "bucket": b, "structure": [], "updates": []}
        for i in layers:
            st = {p.value: structure(lg[(i, p)].graph.raw_cuda_graph()) for p in (P.FP16, P.W8, P.W4)}
            row["structure"].append({"layer": i, **{f"{k}_nodes": len(v[0]) for k, v in st.items()},
                                     **{f"{k}_types": v[0] for k, v in st.items()},
                                     **{f"{k}_edges": v[1] for k, v in st.items()},
                                     "same_types_w8": st["w8"][0] == st["fp16"][0],
                                     "same_types_w4": st["w4"][0] == st["fp16"][0],
                                     "same_edges_w8": st["w8"][1] == st["fp16"][1],
                                     "same_edges_w4": st["w4"][1] == st["fp16"][1]})
        fp16_children = [lg[(i, P.FP16)].graph.raw_cuda_graph() for i in range(nl)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        base = Composite(rt, fp16_children)
        row["instantiate_fp16_ms"] = 1e3 * (time.perf_counter() - t)
        for i in layers:
            for p in (P.W8, P.W4):
                children = list(fp16_children)
                children[i] = lg[(i, p)].graph.raw_cuda_graph()
                t = time.perf_counter()
                target = Composite(rt, children, instantiate=False)
                build_ms = 1e3 * (time.perf_counter() - t)
                info = UpdateResultInfo()
                t = time.perf_counter()
                rc = rt.cudaGraphExecUpdate(base.exec, target.graph, ctypes.byref(info))
                update_ms = 1e3 * (time.perf_counter() - t)
                u = {"layer": i, "precision": p.value, "graph_build_ms": build_ms, "update_ms": update_ms,
                     "rc": rc, "result": UPDATE_RESULTS.get(info.result, str(info.result))}
                if rc == 0:
                    _land(sw, i, p)  # the layer's real bytes at p
                    ref = graphs.run_layerwise(hb).clone()
                    graphs._upload(hb, b)
                    base.launch()
                    torch.cuda.synchronize()
                    got = lg[(nl - 1, p if i == nl - 1 else P.FP16)].logits[:batch]
                    u["max_abs_diff_vs_layerwise"] = (got.float() - ref.float()).abs().max().item()
                    u["finite"] = bool(torch.isfinite(ref).all().item())
                    whole = graphs.capture(b)

                    def run_whole():
                        graphs._upload(hb, b)
                        whole.graph.replay()

                    def run_updated():
                        graphs._upload(hb, b)
                        base.launch()

                    u["whole_gpu_ms"] = timed(run_whole, reps)["gpu_ms"]
                    u["updated_gpu_ms"] = timed(run_updated, reps)["gpu_ms"]
                    u["updated_vs_whole"] = u["updated_gpu_ms"] / u["whole_gpu_ms"]
                    _land(sw, i, P.FP16)
                    graphs.graphs.clear()
                    back = Composite(rt, fp16_children, instantiate=False)
                    info2 = UpdateResultInfo()
                    t = time.perf_counter()
                    rc2 = rt.cudaGraphExecUpdate(base.exec, back.graph, ctypes.byref(info2))
                    u["update_back_ms"] = 1e3 * (time.perf_counter() - t)
                    u["update_back_rc"] = rc2
                    back.close()
                    if rc2 != 0:
                        rt.cudaGetLastError()
                        base.close()
                        base = Composite(rt, fp16_children)
                else:  # the exec is unusable after a failed update: instantiate it again
                    rt.cudaGetLastError()  # the failure is also the runtime's last error, which torch would raise
                    base.close()
                    base = Composite(rt, fp16_children)
                t = time.perf_counter()
                fresh = Composite(rt, children)
                u["instantiate_ms"] = 1e3 * (time.perf_counter() - t)
                fresh.close()
                target.close()
                row["updates"].append(u)
                print(f"{name} b{batch} layer {i} {p.value}: update rc {rc} ({u['result']}) {update_ms:.2f} ms, "
                      f"instantiate {u['instantiate_ms']:.2f} ms"
                      + (f", diff {u['max_abs_diff_vs_layerwise']:.3g}, updated/whole {u['updated_vs_whole']:.3f}"
                         if rc == 0 else ""), flush=True)
        for s in row["structure"]:
            print(f"  layer {s['layer']}: nodes fp16 {s['fp16_nodes']} w8 {s['w8_nodes']} w4 {s['w4_nodes']}, "
                  f"same types w8 {s['same_types_w8']} w4 {s['same_types_w4']}, same edges w8 {s['same_edges_w8']} "
                  f"w4 {s['same_edges_w4']}; fp16 {s['fp16_types']} {s['fp16_edges']}; w4 {s['w4_types']} "
                  f"{s['w4_edges']}", flush=True)
        base.close()
        out["buckets"].append(row)
    engine.close()
    return out


def map_steps(name: str, batches: list[int], context: int, reps: int) -> dict:
    """Whole-step decode graph of the all-W4 map, with and without PDL in the quantized kernels."""
    from morphserve.kernels import w4a16, w8a16
    from morphserve.quant.staging import StagedVariants
    from morphserve.quant.variants import VariantBuilder

    engine = LLMEngine(EngineConfig(model=name, device="cuda", dtype="float16", num_kv_blocks=3072,
                                    max_num_seqs=max(batches + [8])))
    nl = engine.model.cfg.num_layers
    staged = StagedVariants(engine.model.cfg, engine.model.dtype)
    builder = VariantBuilder(engine.model, "rtn")
    for i in range(nl):
        staged.add(i, P.W4, builder.layer(i, P.W4))
    sw = LayerSwapper(engine.model.arena, staged, engine.device)
    for i in range(nl):
        _land(sw, i, P.W4)
    graphs = engine.runner.graphs
    rng = np.random.default_rng(0)
    plain = w4a16.launch_options
    out = {"model": name, "map": "all layers w4", "rows": []}
    try:
        for batch in batches:
            hb, b = decode_batch(engine, batch, context, rng)
            row = {"batch": batch, "bucket": b}
            for mode in ("quant_pdl", "quant_no_pdl", "quant_pdl_again"):
                opts = plain if mode != "quant_no_pdl" else (lambda device: {"USE_PDL": False})
                w4a16.launch_options = w8a16.launch_options = opts
                graphs.graphs.clear()
                g = graphs.capture(b)

                def run(g=g):
                    graphs._upload(hb, b)
                    g.graph.replay()

                row[f"{mode}_gpu_ms"] = timed(run, reps)["gpu_ms"]
            row["no_pdl_vs_pdl"] = row["quant_no_pdl_gpu_ms"] / min(row["quant_pdl_gpu_ms"],
                                                                     row["quant_pdl_again_gpu_ms"])
            print(f"{name} all-W4 b{batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                          if isinstance(v, float)), flush=True)
            out["rows"].append(row)
    finally:
        w4a16.launch_options = w8a16.launch_options = plain
        engine.close()
    return out


def launch_costs(name: str, batches: list[int], context: int) -> dict:
    """Host time of a composite's launches: the first ones after ``CompositeGraph`` (instantiate + upload) and
    after ``update`` (+ upload), against later ones (the GPU idle before each launch)."""
    from morphserve.engine.graph_composite import CompositeGraph

    engine = LLMEngine(EngineConfig(model=name, device="cuda", dtype="float16", num_kv_blocks=3072,
                                    max_num_seqs=max(batches + [8])))
    nl = engine.model.cfg.num_layers
    staged = stage_layers(engine, [nl // 2])
    graphs = engine.runner.graphs
    rng = np.random.default_rng(0)
    out = {"model": name, "rows": []}
    for batch in batches:
        hb, b = decode_batch(engine, batch, context, rng)
        a = [graphs.capture_layer(i, P.FP16, b).graph.raw_cuda_graph() for i in range(nl)]
        bb = list(a)
        bb[nl // 2] = graphs.capture_layer(nl // 2, P.W8, b).graph.raw_cuda_graph()
        row: dict = {"batch": batch}

        def launches(c, tag):
            for k in range(3):
                graphs._upload(hb, b)
                torch.cuda.synchronize()
                t = time.perf_counter()
                c.launch()
                row[f"{tag}_launch{k}_host_ms"] = 1e3 * (time.perf_counter() - t)
                torch.cuda.synchronize()

        torch.cuda.synchronize()
        t = time.perf_counter()
        c = CompositeGraph(a)
        row["instantiate_upload_ms"] = 1e3 * (time.perf_counter() - t)
        torch.cuda.synchronize()
        launches(c, "new")
        t = time.perf_counter()
        ok = c.update(a)  # the same structure (FP16 to FP16): always updatable
        row["update_same_ms"] = 1e3 * (time.perf_counter() - t)
        torch.cuda.synchronize()
        launches(c, "updated")
        t = time.perf_counter()
        row["update_w8_ok"] = c.update(bb)
        row["update_w8_ms"] = 1e3 * (time.perf_counter() - t)
        if not row["update_w8_ok"]:
            c.close()
            t = time.perf_counter()
            c = CompositeGraph(bb)
            row["instantiate_w8_ms"] = 1e3 * (time.perf_counter() - t)
        torch.cuda.synchronize()
        launches(c, "w8")
        row["ok"] = ok
        c.close()
        print(f"{name} b{batch} launch costs: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in row.items()), flush=True)
        out["rows"].append(row)
    del staged
    engine.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama2-7b"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--map-steps", action="store_true", help="also time the all-W4 map with and without PDL")
    ap.add_argument("--skip-update", action="store_true", help="skip the structure and update part")
    ap.add_argument("--launch-costs", action="store_true", help="host time of composite launches")
    ap.add_argument("--source-commit", default=None, help="the commit of the tree (the box's git metadata is stale)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    keep_graphs()
    rt = cudart()
    from morphserve.kernels.triton_support import pdl_enabled

    args.pdl = pdl_enabled()
    res = {"provenance": provenance({k: str(v) for k, v in vars(args).items()}, torch.device("cuda"), 0, True),
           "runs": []}
    if args.source_commit:
        res["provenance"]["source_commit"] = args.source_commit
    res["map_steps"] = []
    for name in args.models:
        if not args.skip_update:
            res["runs"].append(probe(name, args.batches, args.context, args.reps, rt))
        if args.launch_costs:
            res.setdefault("launch_costs", []).append(launch_costs(name, args.batches, args.context))
        if args.map_steps:
            res["map_steps"].append(map_steps(name, args.batches, args.context, args.reps))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
