#!/usr/bin/env python3
"""Does a decode graph cost more GPU time on its first launch after a different graph ran?  (issue #5, on a GPU)

``bench_morph.py`` (run 18, ``BENCHMARKS.md``) found the worst step of a staged swap at batch 1 to be the first
step at the new map: 0.15-0.2 ms more device time than the steps before it, when that step replays a whole-step
graph, and less when it replays composite segments that share most of their graphs with the map before.  This probe
takes one decode batch (synthetic weights, every layer FP16, the inputs of one real step) and replays, with the
same inputs and CUDA-event timing of each launch (each one synchronised, as engine steps are):

* ``A``, ``B``: two captures of the same map's whole-step graph (identical kernels and arguments);
* ``C``: the same map's composite segments (one launch per segment), chained child graphs;
* ``F``: the same segments flat (the layer graphs' kernels copied in, programmatic edges across layers);
* ``G``: one flat composite of every layer;
* sequences that switch between them (``A`` x n, ``B`` x n, ...; alternating; the same with ``cudaGraphUpload``
  of the next graph before the switch), ``A`` after an idle gap, and
  ``A`` right after a device-to-device copy the size of a W8 layer on a side stream (what a landing enqueues), and
  the same copy followed by a read-only sweep over twice the L2 (a test of whether the copy's dirty L2 lines slow
  the next step), and the sweep alone (its control).

Reports the device time of every launch in each sequence.  Writes JSON with provenance.

    MORPHSERVE_DATA_MIRROR=... python3 benchmarks/probe_graph_switch.py --model llama2-7b --batch 1 --out probe.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_fastpath import inject_decoding  # noqa: E402
from morphserve.engine.config import EngineConfig  # noqa: E402
from morphserve.engine.engine import LLMEngine  # noqa: E402
from morphserve.engine.graph_composite import CompositeGraph, check, cudart  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--n", type=int, default=6, help="launches per block")
    ap.add_argument("--gap-ms", type=float, default=0.3, help="host pause between launches (an engine step's host)")
    ap.add_argument("--source-commit", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, device="cuda", dtype="float16", num_kv_blocks=3072,
                                    max_num_seqs=max(args.batch, 8)))
    inject_decoding(engine, args.batch, args.context, np.random.default_rng(0))
    engine.step()  # the static inputs now hold a real decode step's metadata
    graphs = engine.runner.graphs
    b = graphs.bucket_for(args.batch)
    key = graphs.precision_key()
    graphs.graphs.get(key, {}).pop(b, None)
    a = graphs.capture(b)
    graphs.graphs[key].pop(b)
    bb = graphs.capture(b)
    for i in range(engine.model.cfg.num_layers):
        graphs.capture_layer(i, key[i], b)
    graphs.flat_composites = False
    comps = graphs.prepare(key, b)  # C: chained child graphs
    children = [graphs.layer_graphs[(i, key[i], b)].graph.raw_cuda_graph() for i in range(len(key))]
    flat_segments = [CompositeGraph(children[lo:hi], flat=True) for lo, hi in graphs.segments()]  # F
    flat_whole = [CompositeGraph(children, flat=True)]  # G: one flat composite of every layer
    side = torch.cuda.Stream()
    w8 = engine.model.arena.slot_bytes // 2
    engine.warmed_up()  # freeze the warm heap, as a serving engine does
    src = torch.empty(w8, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    # twice the L2 in float32, only read: a pass that replaces the copy's dirty L2 lines with clean ones
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sweep = torch.zeros(max(1, 2 * l2 // 4), dtype=torch.float32, device="cuda")

    def launch(which: str) -> float:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        if which == "A":
            a.graph.replay()
        elif which == "B":
            bb.graph.replay()
        else:
            for c in {"C": comps, "F": flat_segments, "G": flat_whole}[which]:
                c.launch()
        e.record()
        e.synchronize()
        time.sleep(args.gap_ms / 1e3)
        return s.elapsed_time(e)

    def sequence(pattern: list[str], before: dict[int, str] | None = None) -> list[dict]:
        out = []
        for k, w in enumerate(pattern):
            what = (before or {}).get(k)
            if what == "idle":
                time.sleep(0.02)
            elif what == "upload":  # cudaGraphUpload of this graph first (on a side stream, waited for)
                exe = (a if w == "A" else bb).graph.raw_cuda_graph_exec()
                check(cudart().cudaGraphUpload(ctypes.c_void_p(exe), ctypes.c_void_p(side.cuda_stream)),
                      "cudaGraphUpload")
                side.synchronize()
            elif what in ("copy", "copy+sweep", "sweep"):
                with torch.cuda.stream(side):
                    if what != "sweep":
                        dst.copy_(src, non_blocking=True)
                    if what != "copy":
                        sweep.amax()
                torch.cuda.current_stream().wait_stream(side)
            out.append({"graph": w, "before": what, "ms": launch(w)})
        return out

    n = args.n
    for _ in range(3):
        for w in "ABCFG":
            launch(w)
    last = graphs.layer_graphs[(len(key) - 1, key[-1], b)].logits
    a.graph.replay()
    want = a.logits.clone()
    for w in "CFG":  # every composite computes the whole-step graph's logits bit for bit
        launch(w)
        if not torch.equal(last, want):
            raise RuntimeError(f"composite {w} does not reproduce the whole-step graph's logits")
    runs = {
        "A_then_B_then_A": sequence(["A"] * n + ["B"] * n + ["A"] * n),
        "alternating": sequence(["A", "B"] * n),
        "A_then_C_then_A": sequence(["A"] * n + ["C"] * n + ["A"] * n),
        "A_then_F_then_A": sequence(["A"] * n + ["F"] * n + ["A"] * n),
        "A_then_G_then_A": sequence(["A"] * n + ["G"] * n + ["A"] * n),
        "C_F_G_A_alternating": sequence(["C", "F", "G", "A"] * n),
        **({"A_then_uploaded_B_then_A": sequence(["A"] * n + ["B"] * n + ["A"] * n,
                                                 before={n: "upload", 2 * n: "upload"})}
           if hasattr(a.graph, "raw_cuda_graph_exec") else {}),  # (torch >= 2.8)
        "A_idle_A": sequence(["A"] * 2 * n, before={n: "idle"}),
        "A_copy_A": sequence(["A"] * 2 * n, before={n: "copy"}),
        # is the first step after a copy slower because the copy left dirty L2 lines to write back?
        "A_copy_sweep_A": sequence(["A"] * 2 * n, before={n: "copy+sweep"}),
        "A_sweep_A": sequence(["A"] * 2 * n, before={n: "sweep"}),  # the sweep alone (control)
    }
    res = {"provenance": provenance({k: str(v) for k, v in vars(args).items()}, torch.device("cuda"), 0, True),
           "model": args.model, "batch": args.batch, "context": args.context, "copy_bytes": w8, "runs": runs}
    if args.source_commit:
        res["provenance"]["source_commit"] = args.source_commit
    steady = statistics.median(x["ms"] for x in runs["A_then_B_then_A"][1:n])
    res["steady_A_ms"] = steady
    for name, seq in runs.items():
        print(f"{name}: " + " ".join(f"{x['graph']}{'*' if x['before'] else ''}{x['ms'] / steady:.3f}" for x in seq),
              flush=True)
    print(f"(ratios to A's steady {steady:.3f} ms; * = after an idle gap, an upload or a copy)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
