#!/usr/bin/env python3
"""Do deferred split-K sums pay?  Decode steps with the reduce kernels and with the consumers adding (GPU only).

:data:`morphserve.kernels.gemv.DEFER_SPLITK_SUMS` off: every split-K GEMV launches a kernel that adds its float32
partial sums; on: the Triton kernel set hands the partial sums to the consuming kernel (RoPE + KV store,
add-RMSNorm, SiLU-and-multiply, the next layer's add-RMSNorm), which adds them as it loads
(:mod:`morphserve.kernels.split_sums`; same bits).  For each model one engine with synthetic weights
(:func:`bench_fastpath.probe_engine`) times graph-captured decode steps (:func:`bench_fastpath.decode_sweep`,
context 512) alternately, recapturing the graphs at each switch, and profiles one batch-1 step of each setting.

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_deferred_sums.py --out deferred.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.bench_fastpath as B  # noqa: E402
from morphserve.kernels import gemv as G  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_deferred_sums needs a CUDA GPU")
    dev = torch.device("cuda")
    res = B.probe_start(a, dev)
    bw = res["copy"]["tb_per_s"] * 1e12
    batches = [int(b) for b in a.batches.split(",")]
    shipped = G.DEFER_SPLITK_SUMS
    try:
        for model in a.models.split(","):
            eng = B.probe_engine(model, dev)
            rng = np.random.default_rng(0)
            runs = res.setdefault(model, [])
            for i, defer in enumerate([False, True] * a.rounds):
                G.DEFER_SPLITK_SUMS = defer
                eng.runner.graphs.clear()  # the setting changes which kernels a step launches: recapture
                entry = {"defer": defer, "rows": B.decode_sweep(eng, batches, 512, a.reps, 3, bw, rng)}
                print(model, "defer" if defer else "reduce",
                      [(r["batch"], round(r["step_gpu_s"] * 1e3, 3), round(r["gpu_over_floor"], 3))
                       for r in entry["rows"]], flush=True)
                if i < 2:
                    prof = entry["profile_b1"] = B.profile_decode(eng, 1, 512, rng)
                    print("   ", {r["kernel"][:24]: (r["calls_per_step"], round(r["us_per_step"]))
                                  for r in prof["top"][:7]}, flush=True)
                runs.append(entry)
                a.out.write_text(json.dumps(res, indent=1, default=str))
            del eng
            torch.cuda.empty_cache()
    finally:
        G.DEFER_SPLITK_SUMS = shipped
    return res


if __name__ == "__main__":
    main()
