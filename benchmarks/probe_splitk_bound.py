#!/usr/bin/env python3
"""How much could removing the split-K reductions save at most?  Batch-1 steps with them skipped (GPU only).

Times graph-captured batch-1 decode steps (context 512, one engine with synthetic weights,
:func:`bench_fastpath.probe_engine`) alternately with the split-K reduction launches of
:mod:`morphserve.kernels.gemv` made and skipped.  Skipped, the projections' outputs are never written (the
tokens are garbage; the kernels' timing does not depend on the values), so the difference is an upper bound on
what any way of adding the partial sums elsewhere could save.  Not a configuration to serve with.  It runs with
:data:`morphserve.kernels.gemv.ACCUMULATE_SPLITK` off (every split-K GEMV launches its reduction), the way the
bound was measured before the accumulated sums existed.

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_splitk_bound.py --out bound.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.bench_fastpath as B  # noqa: E402
from morphserve.kernels import gemv as G  # noqa: E402


class _Skip:
    """Stands in for the reduce kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_splitk_bound needs a CUDA GPU")
    dev = torch.device("cuda")
    res = B.probe_start(a, dev)
    real = G._splitk_reduce_kernel
    accumulate, G.ACCUMULATE_SPLITK = G.ACCUMULATE_SPLITK, False
    try:
        B.alternate_b1(res, a.models.split(","), {"real": lambda: setattr(G, "_splitk_reduce_kernel", real),
                                                   "skip": lambda: setattr(G, "_splitk_reduce_kernel", _Skip())},
                       a.rounds, a.reps, a.out, dev)
    finally:
        G._splitk_reduce_kernel = real
        G.ACCUMULATE_SPLITK = accumulate
    return res


if __name__ == "__main__":
    main()
