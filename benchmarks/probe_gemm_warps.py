#!/usr/bin/env python3
"""Tensor-core W4/W8 GEMM tiles on ``mma.sync`` (one or two warps) against the dispatcher's choice (issue #3).

Every tile the dispatcher tries (``_GEMM_TILES`` / ``_GEMM_T_TILES`` in :mod:`morphserve.quant.dispatch`) has four
or eight warps and a weight tile of at least 64 rows, so on Hopper Triton compiles the weight-stationary kernels
(``gemm_t``: the dequantized weight is the A operand, read from registers) to ``wgmma``, which waits for every
product before the registers of the next one may be rewritten.  Triton uses ``wgmma`` only when the number of warps
is a multiple of four and the output tile has a multiple of 64 rows; otherwise it falls back to Ampere's
``mma.sync``, which takes its A operand from registers synchronously.  This probe times ``gemm_t`` and ``gemm`` tiles
with one or two warps at small M next to the dispatcher's own choice, in the same process and with the dispatcher's
timer (L2 flushed by a read, CUDA events, median), each checked against the float32 reference first.

    python3 benchmarks/probe_gemm_warps.py --out gemm_warps.json [--m 2 4 8 16 32 64]

Needs a CUDA GPU.  Writes JSON with provenance and prints the best tile per cell.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from probe_w4_gemv import GROUP, SHAPES  # noqa: E402

import morphserve.quant  # noqa: E402,F401  (registers the layouts and the dispatch)
from morphserve.kernels.w4a16 import GemmConfig  # noqa: E402
from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402
from morphserve.quant import dispatch  # noqa: E402
from morphserve.quant.dispatch import Path as KernelPath  # noqa: E402
from morphserve.quant.dispatch import Timer  # noqa: E402

BLOCK_N = (32, 64, 128)
WARPS = (1, 2)
STAGES = (2, 3)
KINDS = ("gemm_t", "gemm")


def space(precision: Precision, m: int, n: int, k: int, num_sms: int) -> list[KernelPath]:
    block_m = 16 if m <= 16 else m
    block_k = 128 if precision is Precision.W8 else 0
    max_split = k // (GROUP if precision is Precision.W4 else block_k)
    out = []
    for kind, bn, warps, stages in itertools.product(KINDS, BLOCK_N, WARPS, STAGES):
        tiles = -(-m // block_m) * -(-n // bn)
        for s in dispatch._split_options("gemm", tiles, max_split, num_sms, m, n):
            out.append(KernelPath(kind, GemmConfig(block_m, bn, warps, stages, s, block_k, weight_a=kind == "gemm_t")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--precision", choices=["w4", "w8"], nargs="+", default=["w4", "w8"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_gemm_warps.py needs a CUDA GPU")
    bad = [m for m in args.m if m < 1 or m > 64]
    if bad:
        sys.exit(f"--m must be in 1..64, got {bad}")
    dev = torch.device("cuda")
    timer = Timer(dev, reps=args.reps, warmup=2)
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows, t0 = [], time.time()
    for prec, (n, k) in tqdm(list(itertools.product(args.precision, SHAPES)), desc="precision x shape"):
        precision = Precision.W4 if prec == "w4" else Precision.W8
        w = dispatch.random_weight(precision, n, k, GROUP, torch.float16, dev)
        w_ref = w.dequantize().float()
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ w_ref.t()
            choice = dispatch.autotune(w, torch.float16, dispatch.bucket_of(m), timer)
            cell = {"precision": prec, "n": n, "k": k, "m": m, "dispatcher_path": choice.path,
                    "dispatcher_us": choice.us, "fp16_cublas_us": choice.fp16_cublas_us, "tiles": {}, "failed": {}}
            for path in space(precision, m, n, k, num_sms):
                try:
                    y = dispatch.run_path(path, x, w)
                    err = float((y.float() - ref).norm() / ref.norm())
                    if not err < 1e-2:
                        cell["failed"][path.name] = f"relative error {err:.3g}"
                        continue
                    cell["tiles"][path.name] = timer.median_us(lambda p=path, w=w: dispatch.run_path(p, x, w))
                except Exception as e:  # noqa: BLE001  (a tile that does not compile or launch is a result)
                    cell["failed"][path.name] = f"{type(e).__name__}: {str(e)[:200]}"
            best = min(cell["tiles"].items(), key=lambda kv: kv[1], default=(None, float("nan")))
            cell["best_tile"], cell["best_us"] = best
            cell["gain_over_dispatcher"] = choice.us / best[1] if best[0] else None
            rows.append(cell)
            write(args, rows, t0)  # after every cell: a run cut short keeps what it measured
            tqdm.write(f"{prec} {n}x{k} M={m}: dispatcher {choice.us:.1f} us `{choice.path}`, best mma.sync tile "
                       f"{best[1]:.1f} us `{best[0]}` ({cell['gain_over_dispatcher'] or 0:.2f}x), fp16 "
                       f"{choice.fp16_cublas_us:.1f} us, {len(cell['failed'])} failed")
        del w, w_ref


def write(args: argparse.Namespace, rows: list[dict], t0: float) -> None:
    res = {"rows": rows, "wall_s": time.time() - t0,
           "provenance": provenance(vars(args) | {"out": str(args.out)}, "cuda", 0, True)}
    args.out.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
