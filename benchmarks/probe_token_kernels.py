#!/usr/bin/env python3
"""The step's token kernels (greedy argmax, token feed) and PDL on the feed, at batches 1 and 32 (GPU).

Decode steps of the given batches (context 512, graphs recaptured per setting) are timed with the settings in
turn in one engine (:func:`bench_fastpath.decode_sweep`).  A setting is one of:

* ``before``: PyTorch's argmax and feed (:meth:`KernelSet.greedy`, :meth:`KernelSet.feed_tokens`);
* ``argmax``: the Triton argmax only; ``feed``: the Triton feed only; ``tokens``: both;
* ``+pdl`` after ``feed`` or ``tokens``: the feed launched with programmatic dependent launch
  (:data:`morphserve.kernels.token_feed.PDL`; shipped off).

RoPE + KV store stays as shipped (:data:`morphserve.kernels.attention.FUSE_ROPE_DECODE`).  This script is the
procedure of the one-off scripts behind ``b32_ab2_h200.json`` and ``b32_ab3_h200.json`` (BENCHMARKS.md, fast path,
thirteenth campaign); in this form it has not run on a GPU yet.

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_token_kernels.py --out token_kernels.json
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
from morphserve.kernels import token_feed  # noqa: E402
from morphserve.model.kernel_set import KernelSet, TritonKernels  # noqa: E402

SHIPPED = (TritonKernels.greedy, TritonKernels.feed_tokens, token_feed.PDL)
KINDS = {"before": (False, False), "argmax": (True, False), "feed": (False, True), "tokens": (True, True)}


def restore() -> None:
    TritonKernels.greedy, TritonKernels.feed_tokens, token_feed.PDL = SHIPPED


def apply(name: str) -> None:
    kind, _, pdl = name.partition("+")
    if kind not in KINDS or pdl not in ("", "pdl") or (pdl and not KINDS[kind][1]):
        raise ValueError(f"setting {name!r}: one of {sorted(KINDS)}, with '+pdl' only after a Triton feed")
    argmax, feed = KINDS[kind]
    TritonKernels.greedy = SHIPPED[0] if argmax else KernelSet.greedy
    TritonKernels.feed_tokens = SHIPPED[1] if feed else KernelSet.feed_tokens
    token_feed.PDL = bool(pdl)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--settings", default="before,tokens,tokens+pdl,argmax,feed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    settings = a.settings.split(",")
    try:
        for name in settings:
            apply(name)
    except ValueError as e:
        sys.exit(str(e))
    finally:
        restore()
    if not torch.cuda.is_available():
        sys.exit("probe_token_kernels needs a CUDA GPU")
    dev = torch.device("cuda")
    res = B.probe_start(a, dev)
    bw = res["copy"]["tb_per_s"] * 1e12
    batches = [int(b) for b in a.batches.split(",")]
    eng = B.probe_engine(a.model, dev)
    rng = np.random.default_rng(0)
    try:
        for name in settings * a.rounds:
            apply(name)
            eng.runner.graphs.clear()
            rows = B.decode_sweep(eng, batches, 512, a.reps, 3, bw, rng)
            res.setdefault("rows", []).append({"setting": name, "rows": rows})
            print(name, [(r["batch"], round(r["step_gpu_s"] * 1e3, 3), round(r["step_wall_s"] * 1e3, 3))
                         for r in rows], flush=True)
            a.out.write_text(json.dumps(res, indent=1, default=str))
    finally:
        restore()
    return res


if __name__ == "__main__":
    main()
