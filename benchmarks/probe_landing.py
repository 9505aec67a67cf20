#!/usr/bin/env python3
"""Where the host time of a staged swap's steps goes (issue #5), on synthetic weights.

``bench_morph.py`` (run 13, composites then built on a builder thread) showed the steps of a staged swap at batch
8-32 exceeding the no-swap step by 0.5-2 ms of host time while their GPU time stayed at the no-swap level: the
step during which the composite was built, and the step whose hook landed the swap (2-3 ms of ``host_launch``).
This probe separates the candidates:

1. **Interference of a second thread** with the engine's thread: median wall time of whole-graph decode steps with
   the second thread idle, instantiating composites back to back (``cudaGraphInstantiate`` + upload + destroy:
   does the CUDA driver serialise it against the launching thread?), and running pure Python (the GIL alone).
2. **The landing hook, call by call**: single staged swaps (FP16 <-> W4/W8 of three layers) with the host time
   of every call the after-launch hook makes (issue, poll, composite request, readiness check, ``land`` and its
   parts) recorded per step, and a cProfile of all hooks.

    MORPHSERVE_DATA_MIRROR=... python3 benchmarks/probe_landing.py --model llama2-7b --batch 8 --out probe.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import morphserve.quant  # noqa: E402,F401  (registers W8/W4)
from benchmarks.bench_fastpath import inject_decoding  # noqa: E402
from benchmarks.bench_morph import stage_layers  # noqa: E402
from morphserve.engine.config import EngineConfig  # noqa: E402
from morphserve.engine.engine import LLMEngine  # noqa: E402
from morphserve.engine.graph_composite import CompositeGraph  # noqa: E402
from morphserve.engine.morpher import advance_swaps  # noqa: E402
from morphserve.memory import layer_swapper as ls  # noqa: E402
from morphserve.memory.layer_swapper import LayerSwapper, ScratchBlocks  # noqa: E402
from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402

P = Precision


def step_times(engine, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        engine.step()
        out.append(1e3 * (time.perf_counter() - t))
    return out


def interference(engine, children: list[int], n: int) -> dict:
    """Whole-graph decode steps with a second thread idle, instantiating composites, or running Python."""
    stop = threading.Event()
    counts = defaultdict(int)

    def instantiate():
        torch.cuda.set_device(engine.device.index or 0)
        stream = torch.cuda.Stream()
        while not stop.is_set():
            with torch.cuda.stream(stream):
                c = CompositeGraph(children)
            stream.synchronize()
            c.close()
            counts["instantiate"] += 1

    def python():
        x = 0
        while not stop.is_set():
            for k in range(1000):
                x += k
            counts["python"] += 1

    out = {}
    for name, fn in (("idle", None), ("instantiate", instantiate), ("python", python), ("idle_again", None)):
        step_times(engine, 3)
        th = None
        if fn is not None:
            stop.clear()
            th = threading.Thread(target=fn, daemon=True)
            th.start()
            time.sleep(0.05)
        t = time.perf_counter()
        ms = step_times(engine, n)
        elapsed = time.perf_counter() - t
        if th is not None:
            stop.set()
            th.join()
        out[name] = {"median_ms": statistics.median(ms), "max_ms": max(ms), "steps_ms": ms,
                     "thread_iterations_per_s": counts[name] / elapsed if fn is not None else None}
        print(f"  steps with the second thread {name}: median {out[name]['median_ms']:.3f} ms, max "
              f"{out[name]['max_ms']:.3f} ms" + (f", {out[name]['thread_iterations_per_s']:.0f} iterations/s"
                                                 if fn is not None else ""), flush=True)
    return out


class CallTimes:
    """Wraps methods of objects to record the host time of every call, per step."""

    def __init__(self):
        self.step: dict[str, float] = defaultdict(float)

    def wrap(self, obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.step[label] += 1e3 * (time.perf_counter() - t)

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        out, self.step = dict(self.step), defaultdict(float)
        return out


def landing_calls(engine, staged, layers: list[int]) -> dict:
    sw = LayerSwapper(engine.model.arena, staged, engine.device, scratch=ScratchBlocks(engine.pool,
                                                                                        engine.block_manager))
    runner, graphs = engine.runner, engine.runner.graphs
    calls = CallTimes()
    for name in ("issue", "poll", "landable", "land", "map_after"):
        calls.wrap(sw, name, f"swapper.{name}")
    for name in ("prepare", "ready"):
        calls.wrap(graphs, name, f"graphs.{name}")
    calls.wrap(sw.arena, "set_precision", "arena.set_precision")
    calls.wrap(sw.scratch, "runs", "scratch.runs")
    calls.wrap(sw.scratch, "give_back", "scratch.give_back")
    gather = ls.gather_copy

    def gather_timed(*a):
        t = time.perf_counter()
        gather(*a)
        calls.step["gather_copy"] += 1e3 * (time.perf_counter() - t)

    ls.gather_copy = gather_timed
    prof = cProfile.Profile()

    def hook():
        t = time.perf_counter()
        prof.enable()
        advance_swaps(sw, graphs)
        prof.disable()
        calls.step["hook"] += 1e3 * (time.perf_counter() - t)

    runner.after_launch = hook
    b = graphs.last_bucket
    for i in layers:  # the layer graphs exist before timing, as in bench_morph
        for p in P:
            graphs.capture_layer(i, p, b)
    rows = []
    for src, dst in ((P.FP16, P.W4), (P.W4, P.FP16), (P.FP16, P.W8), (P.W8, P.FP16)):
        for layer in layers:
            if sw.precision(layer) != src:
                sw.request(layer, src)
                while sw.busy(layer):
                    engine.step()
            engine.step()
            calls.take()
            sw.request(layer, dst)
            steps = []
            landed_at = None
            for k in range(8):
                t = time.perf_counter()
                engine.step()
                wall = 1e3 * (time.perf_counter() - t)
                steps.append({"wall_ms": wall, **calls.take()})
                if not sw.busy(layer):
                    if landed_at is None:
                        landed_at = k
                    elif k >= landed_at + 1:
                        break
            rows.append({"transition": f"{src.value}->{dst.value}", "layer": layer, "landed_at_step": landed_at,
                         "steps": steps})
            print(f"  {src.value}->{dst.value} layer {layer}: " + "; ".join(
                f"{s['wall_ms']:.2f} ms (hook {s.get('hook', 0):.2f}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in s.items() if k not in ("wall_ms", "hook") and v >= 0.05) + ")"
                for s in steps), flush=True)
    ls.gather_copy = gather
    runner.after_launch = None
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(35)
    print(s.getvalue()[:6000], flush=True)
    return {"swaps": rows, "cprofile_cumulative": s.getvalue()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--source-commit", default=None)
    ap.add_argument("--out", default="probe_landing.json")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, device="cuda", dtype="float16", num_kv_blocks=2048,
                                    max_num_seqs=max(args.batch, 8)))
    nl = engine.model.cfg.num_layers
    layers = [0, nl // 2, nl - 1]
    staged = stage_layers(engine, layers)
    inject_decoding(engine, args.batch, args.context, np.random.default_rng(0))
    for _ in range(3):
        engine.step()
    graphs = engine.runner.graphs
    b = graphs.last_bucket
    graphs.full_capture_after = 10**9  # no whole-step capture of the swaps' transient maps
    children = [graphs.capture_layer(i, P.FP16, b).graph.raw_cuda_graph() for i in range(nl)]
    print(f"{args.model} batch {args.batch} (bucket {b}):", flush=True)
    out = {"model": args.model, "batch": args.batch, "context": args.context,
           "interference": interference(engine, children, args.steps),
           "landing": landing_calls(engine, staged, layers),
           "provenance": provenance(vars(args), "cuda", 0, True)}
    if args.source_commit:
        out["provenance"]["source_commit"] = args.source_commit
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    engine.close()


if __name__ == "__main__":
    main()
