#!/usr/bin/env python3
"""Do fewer launches per decode step pay?  Decode steps with three launch-saving knobs off and on (GPU only).

``splitk`` (:data:`morphserve.kernels.gemv.SPLITK_IN_PLACE`): off, every split-K GEMV launches a second kernel
that adds the partial sums; on, each output tile's last program adds them.  ``silu``
(:data:`morphserve.kernels.gemv.FUSE_SILU_MUL`): off, the MLP runs the SiLU-and-mul kernel before the down
projection; on, the down projection's GEMV computes it as it loads its input.  ``merge``
(:data:`morphserve.kernels.attention.DECODE_MERGE_IN_PLACE`): off, split decode attention launches a merge
kernel; on, the last split of each (sequence, KV head) merges.  Each gives the same bits either way.  For each model one engine with
synthetic weights (:func:`bench_fastpath.probe_engine`) times graph-captured decode steps
(:func:`bench_fastpath.decode_sweep`, context 512) for the variants in the order given, recapturing the graphs at
each switch, and profiles one batch-1 step of the first occurrence of each variant.

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_fewer_launches.py --out fewer_launches.json
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
from morphserve.kernels import attention as A  # noqa: E402
from morphserve.kernels import gemv as G  # noqa: E402

VARIANTS = {"off": (False, False, False), "splitk": (True, False, False), "silu": (False, True, False),
            "merge": (False, False, True), "all": (True, True, True)}


def knobs() -> tuple[bool, bool, bool]:
    return G.SPLITK_IN_PLACE, G.FUSE_SILU_MUL, A.DECODE_MERGE_IN_PLACE


def apply(values: tuple[bool, bool, bool]) -> None:
    G.SPLITK_IN_PLACE, G.FUSE_SILU_MUL, A.DECODE_MERGE_IN_PLACE = values


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--order", default="off,all,splitk,silu,merge,off,all")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    order = a.order.split(",")
    bad = [v for v in order if v not in VARIANTS]
    if bad:
        sys.exit(f"unknown variants {bad}; known: {sorted(VARIANTS)}")
    if not torch.cuda.is_available():
        sys.exit("probe_fewer_launches needs a CUDA GPU")
    dev = torch.device("cuda")
    res = B.probe_start(a, dev)
    bw = res["copy"]["tb_per_s"] * 1e12
    batches = [int(b) for b in a.batches.split(",")]
    shipped = knobs()
    try:
        for model in a.models.split(","):
            eng = B.probe_engine(model, dev)
            rng = np.random.default_rng(0)
            runs = res.setdefault(model, [])
            profiled: set[str] = set()
            for v in order:
                apply(VARIANTS[v])
                eng.runner.graphs.clear()  # the knobs change which kernels a step launches: recapture
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
        apply(shipped)
    return res


if __name__ == "__main__":
    main()
