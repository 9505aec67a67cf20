#!/usr/bin/env python3
"""Does a host-to-device copy on a side stream slow a decode step?  (issue #5, on a GPU)

``bench_morph.py`` once measured on an H200 that a bare copy of only 16 MiB, issued on a side stream before each
decode step of Llama-2-7B (synthetic weights, context 512), stretched the step by 8% at batch 8 and 19% at batch
32: far more than the copy's own 0.3 ms.  This probe times and profiles steps (``engine.step()``, whole-step CUDA
graph) on one freshly injected batch, without a copy, with copies of ``--copy-mib`` before each step, and without
again, and reports the wall and device time per step and the device time per kernel name.  On an H200
(2026-12-02, ``BENCHMARKS.md``) the copies changed nothing measurable: the benchmark's figure came from the
context growing between its timed blocks, which ``bench_morph.py`` no longer lets happen.

    MORPHSERVE_DATA_MIRROR=... python3 benchmarks/probe_copy_interference.py --batch 32 --out probe.json
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_fastpath import inject_decoding  # noqa: E402
from morphserve.engine.config import EngineConfig  # noqa: E402
from morphserve.engine.engine import LLMEngine  # noqa: E402
from morphserve.engine.model_runner import StepTiming  # noqa: E402
from morphserve.model.config import architecture  # noqa: E402
from morphserve.model.weight_source import SyntheticSource  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402


def profile_steps(engine: LLMEngine, steps: int, before) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for k in range(3):
        before(k)
        engine.step()
    torch.cuda.synchronize()
    engine.runner.timing = StepTiming()
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(steps):
            before(k)
            t = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t)
    dev = engine.runner.timing.device_forward
    engine.runner.timing = None
    torch.cuda.synchronize()
    by: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by.setdefault(e.name[:100], []).append(e.device_time)
    rows = sorted(((k, sum(v) / steps, len(v) / steps) for k, v in by.items()), key=lambda r: -r[1])
    copies = {k: v for k, v in by.items() if k.startswith("Memcpy") or k.startswith("Memset")}
    return {"wall_ms": 1e3 * statistics.median(walls), "device_ms": 1e3 * statistics.median(dev),
            "kernel_us_per_step": sum(r[1] for r in rows if not r[0].startswith("Memcpy HtoD (Pinned")),
            "per_name": [{"name": k, "us_per_step": us, "count_per_step": c} for k, us, c in rows[:40]],
            "copies": {k: {"n": len(v), "median_us": statistics.median(v), "max_us": max(v)} for k, v in copies.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--copy-mib", type=int, nargs="+", default=[16])
    ap.add_argument("--source-commit", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfg = architecture(args.model)
    engine = LLMEngine(EngineConfig(model=args.model, device="cuda", dtype="float16", max_num_seqs=max(args.batch, 8),
                                    num_kv_blocks=args.batch * (-(-(args.context + 256) // 16)) + 16, seed=0),
                       source=SyntheticSource(args.model, seed=0, config=cfg))
    inject_decoding(engine, args.batch, args.context, np.random.default_rng(0))
    side = torch.cuda.Stream()
    host = torch.empty(max(args.copy_mib) << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(host, device="cuda")
    res = {"provenance": provenance({k: str(v) for k, v in vars(args).items()}, torch.device("cuda"), 0, True),
           "model": args.model, "batch": args.batch, "context": args.context, "runs": {}}
    if args.source_commit:
        res["provenance"]["source_commit"] = args.source_commit
    res["runs"]["none"] = profile_steps(engine, args.steps, lambda k: None)
    for mib in args.copy_mib:
        def copy(k, n=mib << 20):
            with torch.cuda.stream(side):
                dst[:n].copy_(host[:n], non_blocking=True)
        res["runs"][f"copy_{mib}mib"] = profile_steps(engine, args.steps, copy)
    res["runs"]["none_again"] = profile_steps(engine, args.steps, lambda k: None)
    for name, r in res["runs"].items():
        print(f"{name}: wall {r['wall_ms']:.2f} ms, device {r['device_ms']:.2f} ms, kernels {r['kernel_us_per_step']:.0f} us")
        for x in r["per_name"][:8]:
            print(f"    {x['us_per_step']:8.1f} us x{x['count_per_step']:.0f}  {x['name'][:80]}")
        print("    copies:", {k: (v['n'], round(v['median_us'], 1)) for k, v in r["copies"].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
