#!/usr/bin/env python3
"""The GPU timeline of one staged swap's steps, kernel by kernel (issue #5, on a GPU).

``bench_morph.py`` (sixth campaign, ``BENCHMARKS.md``) left the worst step of a staged swap at batch 1 at 1.04-1.07x
of the no-swap step (median), with the excess in the steps' *device* time, not in host time: the step that requests
a swap and the first step at the new map ran about 0.15-0.2 ms longer on the GPU than the steps between them, whose
copy was also in flight.  This probe replays that sequence (synthetic weights, one batch injected at ``--context``,
staged swaps as the morpher runs them: :func:`~morphserve.engine.morpher.land_staged` right after each launch)
under ``torch.profiler`` and splits every step's GPU time:

* the step's window: from its metadata upload kernel (each decode step starts with one) to the next step's;
* kernel time by family (GEMV/GEMM, attention, norms and the rest), the sum of gaps between kernels inside the
  forward, and the upload kernel's own time (it reads pinned host memory over the bus, which a swap's copy shares);
* copies (host-to-device on the swap's stream, the landing's device-to-device gather) overlapping the window;
* the forward's CUDA-event time (``StepTiming.device_forward``) and the wall time, as ``bench_morph`` reports them;
  the host time of the after-launch hook and of the landing (``LayerSwapper.land``) within it.

For every transition FP16 <-> W4/W8 of ``--layer``: ``--before`` no-swap steps at the source map, the swap's steps
(request .. landed, plus the first step at the new map), ``--after`` no-swap steps at the destination map.  Writes
JSON with provenance and prints one line per step.

    MORPHSERVE_DATA_MIRROR=... python3 benchmarks/probe_swap_timeline.py --model llama2-7b --batch 1 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
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
from morphserve.engine.model_runner import StepTiming  # noqa: E402
from morphserve.engine.morpher import advance_swaps  # noqa: E402
from morphserve.memory.layer_swapper import LayerSwapper, ScratchBlocks  # noqa: E402
from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402

P = Precision
FAMILIES = (("upload", "_upload_kernel"), ("gemv/gemm", "gemv"), ("gemv/gemm", "gemm"), ("gemv/gemm", "nvjet"),
            ("gemv/gemm", "splitk"), ("attention", "decode"), ("norm", "rms"), ("rope/kv", "rope"),
            ("silu", "silu"))


def family(name: str) -> str:
    low = name.lower()
    if low.startswith("memcpy") or low.startswith("memset"):
        return name.split(" (")[0]
    for fam, key in FAMILIES:
        if key in low:
            return fam
    return "other"


def union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -1e300
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def split_steps(trace: dict, labels: list[str]) -> list[dict]:
    """Per step of the trace (one upload kernel each, in order): GPU time by family, gaps, copies."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in
          ("kernel", "gpu_memcpy", "gpu_memset")]
    ev.sort(key=lambda e: e["ts"])
    starts = [e["ts"] for e in ev if e["cat"] == "kernel" and "_upload_kernel" in e["name"]]
    if len(starts) != len(labels):
        raise RuntimeError(f"{len(starts)} upload kernels in the trace for {len(labels)} steps: the step windows "
                           f"cannot be told apart")
    rows = []
    for k, (t0, label) in enumerate(zip(starts, labels)):
        t1 = starts[k + 1] if k + 1 < len(starts) else float("inf")
        inside = [e for e in ev if t0 <= e["ts"] < t1]
        # copies on other streams that overlap the window (a swap's host-to-device pieces)
        over = [e for e in ev if e["cat"] != "kernel" and e["ts"] < t1 and e["ts"] + e["dur"] > t0
                and e not in inside]
        kern = [e for e in inside if e["cat"] == "kernel"]
        by: dict[str, float] = {}
        for e in inside:
            by[family(e["name"])] = by.get(family(e["name"]), 0.0) + e["dur"]
        last = max(e["ts"] + e["dur"] for e in kern)
        span = last - t0
        busy = union_us([(e["ts"], e["ts"] + e["dur"]) for e in kern])
        copies = {}
        for e in inside + over:
            if e["cat"] == "kernel":
                continue
            c = copies.setdefault(family(e["name"]), {"n": 0, "us": 0.0, "bytes": 0, "us_in_window": 0.0})
            c["n"] += 1
            c["us"] += e["dur"]
            c["bytes"] += int(e.get("args", {}).get("bytes", 0))
            c["us_in_window"] += max(0.0, min(e["ts"] + e["dur"], last) - max(e["ts"], t0))
        rows.append({"label": label, "kernel_span_us": span, "kernels_busy_us": busy, "gaps_us": span - busy,
                     "kernels": len(kern), "by_family_us": by, "copies": copies,
                     "upload_us": sum(e["dur"] for e in kern if "_upload_kernel" in e["name"])})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--layer", type=int, default=16)
    ap.add_argument("--before", type=int, default=3)
    ap.add_argument("--after", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="swaps per transition")
    ap.add_argument("--segment-layers", type=int, default=8)
    ap.add_argument("--copy-budget-mib", type=int, default=0, help="paced staged copies, MiB per step (0: unpaced)")
    ap.add_argument("--whole-graphs", action="store_true",
                    help="each map's whole-step graph where captured (as in bench_morph: a source map's before its "
                         "steps; a destination map's from the repetition before); default: composite segments only")
    ap.add_argument("--source-commit", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    engine = LLMEngine(EngineConfig(model=args.model, device="cuda", dtype="float16", num_kv_blocks=3072,
                                    max_num_seqs=max(args.batch, 8)))
    staged = stage_layers(engine, [args.layer])
    sw = LayerSwapper(engine.model.arena, staged, engine.device,
                      scratch=ScratchBlocks(engine.pool, engine.block_manager),
                      copy_budget=args.copy_budget_mib << 20 if args.copy_budget_mib else None)
    runner = engine.runner
    graphs = runner.graphs
    graphs.set_segment_layers(args.segment_layers)
    rng = np.random.default_rng(0)
    inject_decoding(engine, args.batch, args.context, rng)
    engine.step()
    b = graphs.bucket_for(args.batch)
    for i in range(engine.model.cfg.num_layers):
        graphs.capture_layer(i, P.FP16, b)
    for p in (P.W4, P.W8):
        graphs.capture_layer(args.layer, p, b)
    runner.hooks = sw

    hook_ms: list[float] = []
    land_ms: list[float] = []
    land = sw.land

    def timed_land(*a, **k):
        t = time.perf_counter()
        try:
            return land(*a, **k)
        finally:
            land_ms[-1] += 1e3 * (time.perf_counter() - t)

    sw.land = timed_land

    def hook():
        t = time.perf_counter()
        land_ms.append(0.0)
        advance_swaps(sw, graphs)
        hook_ms.append(1e3 * (time.perf_counter() - t))

    runner.after_launch = hook
    engine.warmed_up()  # freeze the warm heap, as a serving engine does
    graphs.full_capture_after = 10**9  # no whole-step capture inside the profiled steps
    if not args.whole_graphs:
        graphs.graphs.clear()  # every map runs its composite segments
    res = {"provenance": provenance({k: str(v) for k, v in vars(args).items()}, torch.device("cuda"), 0, True),
           "model": args.model, "batch": args.batch, "context": args.context, "layer": args.layer, "swaps": []}
    if args.source_commit:
        res["provenance"]["source_commit"] = args.source_commit
    for src, dst in ((P.FP16, P.W4), (P.W4, P.FP16), (P.FP16, P.W8), (P.W8, P.FP16)) * args.reps:
        if sw.precision(args.layer) != src:
            sw.request(args.layer, src)
            while sw.busy(args.layer):
                engine.step()
        for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            engine.abort(r.request_id)
        inject_decoding(engine, args.batch, args.context, rng)
        if args.whole_graphs:
            graphs.capture(b)
        elif not graphs.ready(graphs.precision_key(), b):
            graphs.prepare(graphs.precision_key(), b)
        for _ in range(3):  # three steps to settle
            engine.step()
        labels, walls = [], []
        hook_ms.clear()
        land_ms.clear()
        runner.timing = StepTiming()
        torch.cuda.synchronize()

        def step(label):
            t = time.perf_counter()
            engine.step()
            walls.append(1e3 * (time.perf_counter() - t))
            labels.append(label)

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.before):
                step("src")
            sw.request(args.layer, dst)
            k = 0
            while sw.busy(args.layer):
                step("request" if k == 0 else "in flight")
                k += 1
            step("first at dst")
            for _ in range(args.after):
                step("dst")
            torch.cuda.synchronize()
        dev = [1e3 * x for x in runner.timing.device_forward]
        runner.timing = None
        if args.whole_graphs:
            graphs.capture(b)  # the destination map's whole graph, for the next swap back to it (outside the trace)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            prof.export_chrome_trace(path)
            trace = json.loads(Path(path).read_text())
        rows = split_steps(trace, labels)
        for r, w, x, h, ld in zip(rows, walls, dev, hook_ms, land_ms):
            r["wall_ms"], r["device_ms"], r["hook_ms"], r["land_ms"] = w, x, h, ld
        base = statistics.median(r["kernel_span_us"] for r in rows if r["label"] in ("src", "dst"))
        print(f"{src.value}->{dst.value} layer {args.layer} (no-swap median span {base:.0f} us):", flush=True)
        for r in rows:
            fam = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["by_family_us"].items(), key=lambda kv: -kv[1])
                            if v >= 5)
            cp = ", ".join(f"{k} {v['n']}x {v['us_in_window']:.0f} us" for k, v in r["copies"].items())
            print(f"  {r['label']:>12}: wall {r['wall_ms']:.2f} device {r['device_ms']:.2f} hook {r['hook_ms']:.2f} "
                  f"land {r['land_ms']:.2f} ms | span "
                  f"{r['kernel_span_us']:.0f} us ({r['kernel_span_us'] / base:.3f}x) gaps {r['gaps_us']:.0f} "
                  f"upload {r['upload_us']:.1f} | {fam} | copies: {cp}", flush=True)
        res["swaps"].append({"transition": f"{src.value}->{dst.value}", "no_swap_span_us": base, "steps": rows})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
