#!/usr/bin/env python3
"""Do the early loads pay?  Decode steps with the loads before the PDL wait off and on (GPU only).

Two knobs: ``decode`` (:data:`morphserve.kernels.attention.EARLY_DECODE`: the decode kernel loads its first tile
of keys, all but the newest, before its wait) and ``rope`` (:data:`morphserve.kernels.kv_store.EARLY_LOADS`:
``rope_and_store`` reads positions, slots, rotary tables and the KV address before its wait).  For each model one
engine with synthetic weights times whole-step graph decode steps (:func:`bench_fastpath.decode_sweep`, context
512) for the variants in the order given, recapturing the graphs at each switch, and profiles one batch-1 step of
the first occurrence of each variant.

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_early_loads.py --out early.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.bench_fastpath as B  # noqa: E402
from morphserve.kernels import attention as A  # noqa: E402
from morphserve.kernels import kv_store as KS  # noqa: E402
from morphserve.model.config import architecture  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402

VARIANTS = {"off": (False, False), "decode": (True, False), "rope": (False, True), "both": (True, True)}


def apply(variant: str) -> None:
    A.EARLY_DECODE, KS.EARLY_LOADS = VARIANTS[variant]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--batches", default="1,4,8,64")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--order", default="off,both,decode,rope,off,both")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    order = a.order.split(",")
    bad = [v for v in order if v not in VARIANTS]
    if bad:
        sys.exit(f"unknown variants {bad}; known: {sorted(VARIANTS)}")
    if not torch.cuda.is_available():
        sys.exit("probe_early_loads needs a CUDA GPU")
    dev = torch.device("cuda")
    engine_args = argparse.Namespace(prefill=[512], max_model_len=4096, kv_cache_bytes=8 << 30, async_steps="on")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                 "device": torch.cuda.get_device_name(),
                 "provenance": provenance(config=vars(a) | {"out": str(a.out)}, device=dev)}
    res["copy"] = B.copy_bandwidth(dev, 2 << 30, 10)
    bw = res["copy"]["tb_per_s"] * 1e12
    batches = [int(b) for b in a.batches.split(",")]
    shipped = A.EARLY_DECODE, KS.EARLY_LOADS
    try:
        for model in a.models.split(","):
            eng = B.build_engine(model, architecture(model), engine_args, dev)
            for seg in eng.pool.segments.values():
                seg.tensor.normal_()
            rng = np.random.default_rng(0)
            runs = res.setdefault(model, [])
            profiled: set[str] = set()
            for v in order:
                apply(v)
                eng.runner.graphs.clear()  # the knobs are compile-time constants of the captured kernels
                entry = {"variant": v, "rows": B.decode_sweep(eng, batches, 512, a.reps, 3, bw, rng)}
                print(model, v, [(r["batch"], round(r["step_gpu_s"] * 1e3, 3)) for r in entry["rows"]], flush=True)
                if v not in profiled:
                    profiled.add(v)
                    prof = entry["profile_b1"] = B.profile_decode(eng, 1, 512, rng)
                    print("   ", {r["kernel"][:24]: round(r["us_per_step"]) for r in prof["top"][:6]}, flush=True)
                runs.append(entry)
                a.out.write_text(json.dumps(res, indent=1, default=str))
            del eng
            torch.cuda.empty_cache()
    finally:
        A.EARLY_DECODE, KS.EARLY_LOADS = shipped
    return res


if __name__ == "__main__":
    main()
