#!/usr/bin/env python3
"""Does the dispatch entry point cost more than the kernel it runs?  (issue #3, a check of single cells)

``bench_quant_linear.py`` reports both the tuner's median of the chosen kernel and the median of the end-to-end
``quant_matmul`` call.  When the two disagree for a cell, this probe re-measures that cell alone: it tunes the
weight's M bucket, then times ``run_path`` (the chosen kernel) and ``quant_matmul`` (lookup + the same kernel) with
the same timer, and prints a profiler trace of five end-to-end calls (which kernels ran, and how long).

    python3 benchmarks/probe_end_to_end.py --precision w8 --n 28672 --k 4096 --m 4 8 16

Needs a CUDA GPU.  Prints one line and one trace per M.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.quant import dispatch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", choices=["w4", "w8"], default="w8")
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128, help="W4 only")
    ap.add_argument("--m", type=int, nargs="+", default=[4, 8, 16], help="rows of x (dispatch buckets)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_end_to_end.py needs a CUDA GPU")
    bad = [m for m in args.m if m not in dispatch.M_BUCKETS]
    if bad:
        sys.exit(f"--m values must be dispatch buckets {dispatch.M_BUCKETS}, got {bad}")
    dev = torch.device("cuda")
    prec = Precision.W8 if args.precision == "w8" else Precision.W4
    w = dispatch.random_weight(prec, args.n, args.k, 0 if prec is Precision.W8 else args.group_size, torch.half, dev,
                               seed=1)
    timer = dispatch.Timer(dev)
    for m in args.m:
        x = torch.randn(m, args.k, device=dev).half()
        choice = dispatch.autotune(w, torch.half, m, timer)
        path = dispatch.chosen_path(w, torch.half, m)
        t_run = timer.median_us(lambda: dispatch.run_path(path, x, w))
        t_auto = timer.median_us(lambda: dispatch.quant_matmul(x, w))
        print(f"M={m}: {choice.path}: tuner {choice.us:.1f} us, run_path {t_run:.1f} us, quant_matmul {t_auto:.1f} us",
              flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                dispatch.quant_matmul(x, w)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=4), flush=True)


if __name__ == "__main__":
    main()
