#!/usr/bin/env python3
"""The W8A16 GEMV's configuration space at decode (issue #3): rows per program, warps, words per step, split-K.

:func:`morphserve.kernels.w8a16.w8a16_gemv` stepped 64 int32 words (256 codes) per loop iteration and the
dispatcher tried three row/warp shapes (before 2026-12-03).  This probe runs the same kernel over a wider grid of
configurations, including other step widths (``GemvConfig.block_c``), on the Llama-2-7B / Llama-3-8B projection
shapes, checks each against the float32 reference and times it like the dispatcher
(:class:`morphserve.quant.dispatch.Timer`), next to cuBLAS FP16 on a weight of the same shape and the dispatcher's
own choice, in the same run.  (The measured version launched ``_w8_gemv_kernel`` directly with the same split
arithmetic as ``w8a16_gemv``; it now calls ``w8a16_gemv``, whose config gained ``block_c`` for this.)

    python3 benchmarks/probe_w8_gemv.py --out w8_gemv_sweep.json

Needs a CUDA GPU.  Writes JSON with provenance and prints one line per shape.
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

from morphserve.kernels.w4a16 import GemvConfig  # noqa: E402
from morphserve.kernels.w8a16 import w8a16_gemv, w8a16_matmul_ref  # noqa: E402
from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402
from morphserve.quant.dispatch import QuantWeight, Timer, autotune  # noqa: E402
from probe_w4_gemv import SHAPES, copy_bandwidth  # noqa: E402


def space() -> list[tuple[int, int, int, int]]:
    """(block_n rows, num_warps, block_c words per step, split_k), at most 64 words per thread and step."""
    out = []
    for bn, w, bc, sk in itertools.product((4, 8, 16, 32, 64), (2, 4, 8), (32, 64, 128, 256), (1, 2, 4, 8, 16)):
        if bn * bc // (32 * w) <= 64 and bn * bc >= 32 * w:
            out.append((bn, w, bc, sk))
    return out


def launch(x, qw, s, y, cfg):
    bn, warps, bc, split = cfg
    return w8a16_gemv(x, qw, s, GemvConfig(bn, warps, split, block_c=bc), out=y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_w8_gemv.py needs a CUDA GPU")
    torch.manual_seed(0)
    timer = Timer(torch.device("cuda"), reps=args.reps, warmup=2)
    t0 = time.time()
    bw = copy_bandwidth(timer)
    rows = []
    for n, k in tqdm(SHAPES, desc="shapes"):
        qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        s = (torch.rand(n, device="cuda") * 0.01 + 0.001).half()
        w16 = torch.randn(n, k, device="cuda").half()
        for m in args.m:
            x = torch.randn(m, k, device="cuda").half()
            y = torch.empty(m, n, dtype=torch.half, device="cuda")
            ref = w8a16_matmul_ref(x.float(), qw, s.float())
            fp16 = min(timer.median_us(lambda: torch.mm(x, w16.t())) for _ in range(2))
            chosen = autotune(QuantWeight(Precision.W8, qw, s), torch.half, m, timer)
            nbytes = n * k + 2 * n + 2 * m * (k + n)
            times, failed = {}, {}
            for cfg in space():
                name = "w8gemv[n{},w{},c{},sk{}]".format(*cfg)
                try:
                    err = float((launch(x, qw, s, y, cfg).float() - ref).norm() / ref.norm())
                    if err > 1e-2:
                        failed[name] = f"relative error {err:.3g}"
                        continue
                    times[name] = timer.median_us(lambda: launch(x, qw, s, y, cfg))
                except Exception as exc:  # a configuration the compiler rejects is recorded, not hidden
                    failed[name] = repr(exc)[:300]
            best = sorted((v, c) for c, v in times.items())
            rows.append({"n": n, "k": k, "m": m, "fp16_us": fp16, "bytes": nbytes, "dispatcher": chosen.path,
                         "dispatcher_us": chosen.us, "best": best[:8], "times": times, "failed": failed})
            tqdm.write(f"{n}x{k} m={m}: fp16 {fp16:.1f} us; dispatcher {chosen.path} {chosen.us:.1f} us "
                       f"({fp16 / chosen.us:.2f}x); best {best[0][1]} {best[0][0]:.1f} us ({fp16 / best[0][0]:.2f}x, "
                       f"{nbytes / (best[0][0] * 1e-6) / bw:.2f} of copy BW); {len(failed)} failed")
    res = {"copy_bw": bw, "rows": rows, "wall_s": time.time() - t0,
           "provenance": provenance(vars(args) | {"out": str(args.out)}, "cuda", 0, True)}
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
