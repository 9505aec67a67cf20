#!/usr/bin/env python3
"""Where a decode step replayed layer by layer loses time against the whole-step graph (issue #5, on a GPU).

Steps with a layer swap queued or in flight replay one CUDA graph per decoder layer, with the swapper's hooks
between the replays (:mod:`morphserve.engine.cuda_graphs`); on an H200 they measured 1.01-1.11x the whole-step
graph without any swap.  This probe takes the same decode batch (sequences injected as prefilled to
``--context``, all layers FP16) and times, in one process:

* ``whole``: the map's whole-step graph (upload + one replay);
* ``layerwise``: the per-layer graphs (upload + one replay per layer), as a swap step runs them;
* ``composite``: one graph whose nodes are the per-layer graphs as child graphs, chained
  (``cudaGraphAddChildGraphNode`` through the CUDA runtime, on graphs captured with ``keep_graph``): the same
  kernels as ``layerwise``, launched once;
* ``composite_events``: the same plus an external event-wait node before and an event-record node after every
  layer (what a whole-step graph needs to take the swapper's per-layer wait and fence).

* ``copy_before``: ``whole`` with a bare ``--copy-mib`` host-to-device copy (pinned source) enqueued on a side
  stream just before the step, so it is in flight while the step's metadata upload (a kernel reading pinned host
  memory over the bus) and the whole step run;
* ``copy_after_upload``: the same copy, ordered after the step's upload kernel (an event between the upload and
  the replay): it overlaps the step's kernels but not its upload.

For each: GPU time (CUDA events around the launch, median of ``--reps``; every stream synchronised before each
repetition), host time of the launch call, and (torch.profiler over ``--profile-steps`` launches) the kernel time
per step, the kernel count and the upload kernel's time.  Also the time
to capture a whole-step graph for a new map (Python capture, warm-up included) and to build and instantiate a
composite.  Writes JSON with provenance.

    MORPHSERVE_DATA_MIRROR=... python3 benchmarks/probe_swap_step.py --models llama3-8b llama2-7b --batches 8 32 --out probe.json
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
from morphserve.engine.graph_composite import chain, check, cudart  # noqa: E402
from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.model.config import architecture  # noqa: E402
from morphserve.model.weight_source import SyntheticSource  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402


class Composite:
    """One executable graph chaining child graphs, optionally with an event wait before and a record after each
    (:func:`morphserve.engine.graph_composite.chain`); ``instantiate=False`` keeps only the ``cudaGraph_t``."""

    def __init__(self, rt: ctypes.CDLL, children: list[int], waits=None, records=None, instantiate: bool = True):
        self.rt = rt
        self.graph = ctypes.c_void_p(chain(children, [w.cuda_event_ptr for w in waits] if waits else None,
                                           [r.cuda_event_ptr for r in records] if records else None))
        self.exec = ctypes.c_void_p()
        if instantiate:
            check(rt.cudaGraphInstantiate(ctypes.byref(self.exec), self.graph, ctypes.c_ulonglong(0)),
                  "cudaGraphInstantiate")

    def launch(self) -> None:
        check(self.rt.cudaGraphLaunch(self.exec, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)),
              "cudaGraphLaunch")

    def close(self) -> None:
        if self.exec:
            self.rt.cudaGraphExecDestroy(self.exec)
        self.rt.cudaGraphDestroy(self.graph)


class RawEvent:
    """A plain CUDA event from the runtime (its handle is what a graph's event node takes)."""

    def __init__(self, rt: ctypes.CDLL):
        self.rt = rt
        h = ctypes.c_void_p()
        check(rt.cudaEventCreateWithFlags(ctypes.byref(h), ctypes.c_uint(2)), "cudaEventCreate")  # disable timing
        self.cuda_event_ptr = h.value
        check(rt.cudaEventRecord(h, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "cudaEventRecord")


def decode_batch(engine, batch: int, context: int, rng) -> tuple:
    """A fresh decode batch of ``batch`` sequences injected at ``context`` (any running ones aborted), one engine step
    run on it; returns that step's host batch and its graph bucket (to replay the same step in other ways)."""
    for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(r.request_id)
    inject_decoding(engine, batch, context, rng)
    runner, seen = engine.runner, []
    forward = runner.forward
    runner.forward = lambda hb: seen.append(hb) or forward(hb)
    try:
        engine.step()
    finally:
        runner.forward = forward
    return seen[0], runner.graphs.bucket_for(batch)


def keep_graphs() -> None:
    """Make every ``torch.cuda.CUDAGraph`` created from now on keep its ``cudaGraph_t`` (the per-layer graphs are
    the children of a composite)."""
    plain = torch.cuda.CUDAGraph

    class KeptGraph(plain):  # the C++ object takes keep_graph in __init__ (pybind), the wrapper in __new__
        def __new__(cls, keep_graph: bool = True):
            return super().__new__(cls, keep_graph=True)

        def __init__(self, keep_graph: bool = True):
            super().__init__(True)

    torch.cuda.CUDAGraph = KeptGraph


def timed(fn, reps: int) -> dict:
    gpu, host = [], []
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    for _ in range(reps):
        torch.cuda.synchronize()  # no copy of an earlier repetition still in flight
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
        b.record()
        b.synchronize()
        gpu.append(a.elapsed_time(b) / 1e3)
    return {"gpu_ms": 1e3 * statistics.median(gpu), "host_ms": 1e3 * statistics.median(host),
            "gpu_ms_all": [1e3 * x for x in gpu]}


def profiled(fn, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
            torch.cuda.synchronize()
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith("Memcpy HtoD")]  # the bare copies of the interference modes
    by_name: dict[str, float] = {}
    for e in kern:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    upload = [e.device_time for e in kern if "_upload_kernel" in e.name]
    return {"kernel_us_per_step": sum(e.device_time for e in kern) / steps, "kernels_per_step": len(kern) / steps,
            "upload_kernel_us": upload,
            "top": [{"name": k[:90], "us_per_step": v / steps} for k, v in top]}


def probe(name: str, batch: int, context: int, reps: int, profile_steps: int, rt: ctypes.CDLL,
          copy_mib: int) -> dict:
    cfg = architecture(name)
    engine = LLMEngine(EngineConfig(model=name, device="cuda", dtype="float16", max_num_seqs=max(batch, 8),
                                    num_kv_blocks=batch * (-(-(context + 64) // 16)) + 16, seed=0),
                       source=SyntheticSource(name, seed=0, config=cfg))
    try:
        graphs = engine.runner.graphs
        hb, b = decode_batch(engine, batch, context, np.random.default_rng(0))
        out: dict = {"model": name, "batch": batch, "bucket": b, "context": context, "layers": cfg.num_layers}
        graphs.graphs.clear()
        t = time.perf_counter()
        whole = graphs.capture(b)
        whole.graph.instantiate()
        torch.cuda.synchronize()
        out["whole_capture_ms"] = 1e3 * (time.perf_counter() - t)
        layer_graphs = [graphs.capture_layer(i, Precision.FP16, b) for i in range(cfg.num_layers)]

        def run_whole():
            graphs._upload(hb, b)
            whole.graph.replay()

        def run_layerwise():
            graphs.run_layerwise(hb)

        t = time.perf_counter()
        comp = Composite(rt, [g.graph.raw_cuda_graph() for g in layer_graphs])
        out["composite_build_ms"] = 1e3 * (time.perf_counter() - t)
        waits = [RawEvent(rt) for _ in range(cfg.num_layers)]
        records = [RawEvent(rt) for _ in range(cfg.num_layers)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        comp_ev = Composite(rt, [g.graph.raw_cuda_graph() for g in layer_graphs], waits, records)
        out["composite_events_build_ms"] = 1e3 * (time.perf_counter() - t)

        def run_composite(c=comp):
            graphs._upload(hb, b)
            c.launch()

        # the composite writes the logits of the last layer graph: check it against the whole-step graph
        run_whole()
        ref = whole.logits[:batch].clone()
        run_composite()
        torch.cuda.synchronize()
        got = layer_graphs[-1].logits[:batch]
        out["composite_max_abs_diff_vs_whole"] = (got - ref).abs().max().item()
        scratch = torch.empty(copy_mib << 20, dtype=torch.uint8, device="cuda")
        host = torch.empty(copy_mib << 20, dtype=torch.uint8, pin_memory=True)
        side = torch.cuda.Stream()

        def run_copy_before():
            with torch.cuda.stream(side):
                scratch.copy_(host, non_blocking=True)
            run_whole()

        def run_copy_after_upload():
            graphs._upload(hb, b)
            uploaded = torch.cuda.Event()
            uploaded.record()
            side.wait_event(uploaded)
            with torch.cuda.stream(side):
                scratch.copy_(host, non_blocking=True)
            whole.graph.replay()

        modes = {"whole": run_whole, "layerwise": run_layerwise, "composite": run_composite,
                 "composite_events": lambda: run_composite(comp_ev), "copy_before": run_copy_before,
                 "copy_after_upload": run_copy_after_upload}
        for mode, fn in modes.items():
            out[mode] = timed(fn, reps) | profiled(fn, profile_steps)
        base = out["whole"]["gpu_ms"]
        for mode in modes:
            out[mode]["gpu_vs_whole"] = out[mode]["gpu_ms"] / base
        print(f"{name} b{batch}: " + ", ".join(
            f"{m} {out[m]['gpu_ms']:.3f} ms ({out[m]['gpu_vs_whole']:.3f}x, kernels {out[m]['kernel_us_per_step']:.0f} us"
            f" x{out[m]['kernels_per_step']:.0f})" for m in modes)
            + f"; capture {out['whole_capture_ms']:.1f} ms, composite build {out['composite_build_ms']:.1f} ms"
            + "; upload kernel us: " + ", ".join(f"{m} {statistics.median(out[m]['upload_kernel_us'] or [0]):.1f}"
                                                 for m in modes), flush=True)
        comp.close()
        comp_ev.close()
        return out
    finally:
        engine.close()
        del engine
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama3-8b", "llama2-7b"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--copy-mib", type=int, default=256, help="size of the bare copy of the interference modes")
    ap.add_argument("--source-commit", default=None, help="the commit of the tree (the box's git metadata is stale)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    keep_graphs()
    rt = cudart()
    res = {"provenance": provenance({k: str(v) for k, v in vars(args).items()}, torch.device("cuda"), 0, True),
           "runs": []}
    if args.source_commit:
        res["provenance"]["source_commit"] = args.source_commit
    for name in args.models:
        for batch in args.batches:
            res["runs"].append(probe(name, batch, args.context, args.reps, args.profile_steps, rt,
                                     args.copy_mib))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
