#!/usr/bin/env python3
"""Does the FP16 GEMV's weight prefetch pay?  Decode steps with ``gemv.PREFETCH_FIRST_CHUNK`` off and on (GPU only).

With programmatic dependent launch a GEMV program can start while the previous kernel finishes; with the prefetch
it loads its first weight chunk before ``pdl_wait`` (see the docstring of :mod:`morphserve.kernels.gemv`).  For each
model this probe builds one engine with synthetic weights, then times whole-step graph decode steps
(:func:`bench_fastpath.decode_sweep`, context 512) in the order off, on, off, on, recapturing the graphs at each
switch, and profiles one batch-1 step with each setting (GEMV kernel time per step).

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_gemv_prefetch.py --out prefetch.json
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
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_gemv_prefetch needs a CUDA GPU")
    dev = torch.device("cuda")
    res = B.probe_start(a, dev)
    bw = res["copy"]["tb_per_s"] * 1e12
    batches = [int(b) for b in a.batches.split(",")]
    for model in a.models.split(","):
        eng = B.probe_engine(model, dev)
        rng = np.random.default_rng(0)
        out = res[model] = {}
        for name, on in [("off", False), ("on", True), ("off2", False), ("on2", True)]:
            G.PREFETCH_FIRST_CHUNK = on
            eng.runner.graphs.clear()  # the flag is a compile-time constant of the captured kernels
            rows = B.decode_sweep(eng, batches, 512, a.reps, 3, bw, rng)
            out[name] = {"rows": rows}
            print(model, name, [(r["batch"], round(r["step_gpu_s"] * 1e3, 3)) for r in rows], flush=True)
            if name in ("off", "on"):
                prof = out[name]["profile_b1"] = B.profile_decode(eng, 1, 512, rng)
                gemv_us = sum(r["us_per_step"] for r in prof["top"] if "gemv" in r["kernel"])
                print(f"   GEMV {gemv_us:.0f} us/step of {prof['kernel_us_per_step']:.0f} us kernel time", flush=True)
            a.out.write_text(json.dumps(res, indent=1, default=str))
        del eng
        torch.cuda.empty_cache()
    G.PREFETCH_FIRST_CHUNK = True
    return res


if __name__ == "__main__":
    main()
