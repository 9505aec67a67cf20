#!/usr/bin/env python3
"""Is this tree's GEMV kernel as fast as an older revision's?  Batch-1 decode steps with each, alternately (GPU).

Loads ``morphserve/kernels/gemv.py`` of ``--old`` (through ``git show``, or from ``--old-file``) as a separate
module and puts its ``_gemv_kernel`` into this tree's GEMV alternately with the current one; everything else
(tuning table, launch code, the rest of the step) is this tree's.  The old kernel must take the same arguments,
except ``ATOMIC`` (accumulated split-K sums, newer than most old kernels): the A/B runs with
:data:`morphserve.kernels.gemv.ACCUMULATE_SPLITK` off, and an old kernel without that parameter is called without it.
For each model one engine with synthetic weights (:func:`bench_fastpath.probe_engine`) times graph-captured
batch-1 steps (context 512), recapturing the graphs at each switch.

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/ab_gemv_kernel.py --old afdea52 --out ab.json
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.bench_fastpath as B  # noqa: E402
from morphserve.kernels import gemv as G  # noqa: E402
from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.model.linear import register_linear  # noqa: E402


def old_kernel(source: str):
    """The ``_gemv_kernel`` of another gemv.py (its module re-registers the FP16 linear: registered back here)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    atexit.register(Path(f.name).unlink)  # kept until exit: Triton may read the source again when it compiles
    spec = importlib.util.spec_from_file_location("gemv_old", f.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gemv_old"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    register_linear(Precision.FP16, G.linear_fp16)
    return mod._gemv_kernel


class _WithoutAtomic:
    """An old ``_gemv_kernel`` without the ``ATOMIC`` parameter, launched as this tree's launch code calls it."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, ATOMIC=False, **kwargs):
            if ATOMIC:
                raise ValueError("the old GEMV kernel cannot accumulate split-K sums: run with ACCUMULATE_SPLITK off")
            return launch(*args, **kwargs)
        return call


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default=None, help="git revision whose gemv.py is the other kernel")
    ap.add_argument("--old-file", type=Path, default=None, help="or that gemv.py itself (no git checkout needed)")
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if (a.old is None) == (a.old_file is None):
        sys.exit("give exactly one of --old REV and --old-file PATH")
    if not torch.cuda.is_available():
        sys.exit("ab_gemv_kernel needs a CUDA GPU")
    source = (a.old_file.read_text() if a.old_file else
              subprocess.run(["git", "show", f"{a.old}:morphserve/kernels/gemv.py"], check=True, text=True,
                             capture_output=True).stdout)
    old_name = a.old or str(a.old_file)
    old = old_kernel(source)
    kernels = {"this tree": G._gemv_kernel, old_name: old if "ATOMIC" in old.arg_names else _WithoutAtomic(old)}
    dev = torch.device("cuda")
    res = B.probe_start(a, dev)
    accumulate, G.ACCUMULATE_SPLITK = G.ACCUMULATE_SPLITK, False
    try:
        B.alternate_b1(res, a.models.split(","), {name: lambda k=k: setattr(G, "_gemv_kernel", k)
                                                   for name, k in kernels.items()},
                       a.rounds, a.reps, a.out, dev, key="kernel")
    finally:
        G._gemv_kernel = kernels["this tree"]
        G.ACCUMULATE_SPLITK = accumulate
    return res


if __name__ == "__main__":
    main()
