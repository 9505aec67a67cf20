#!/usr/bin/env python3
"""Where the W4A16 GEMV's time goes at decode (issue #3): a configuration sweep and a memory-pattern probe.

``sweep``: every configuration of both W4 GEMV kernels (:func:`morphserve.kernels.w4a16.w4a16_gemv`: the
register-prefetch kernel and, with ``stages``, the compiler-pipelined one) on the Llama-2-7B / Llama-3-8B projection
shapes at ``--m`` rows, each checked against the float32 reference (relative error < 1e-2) and timed like the
dispatcher (:class:`morphserve.quant.dispatch.Timer`: L2 flushed by reading, CUDA events, median), next to cuBLAS
FP16 on a weight of the same shape, in the same run.  This is the evidence behind the dispatcher's candidate list
(``_GEMV_SHAPES`` in :mod:`morphserve.quant.dispatch`).

``pattern``: what reading ``qweight`` alone costs in the GEMV's tiling (column blocks x word rows x split-K, an XOR
per word and nothing else), against the same bytes in a tile-contiguous ("blocked") layout, and the time of an empty
kernel under the same timer (the fixed cost every measurement here includes).  Ceiling for the GEMV: if the read
alone is far faster than the GEMV, the arithmetic and the loop structure cost the difference, not the layout.

    python3 benchmarks/probe_w4_gemv.py sweep --out w4_gemv_sweep.json
    python3 benchmarks/probe_w4_gemv.py pattern --out w4_gemv_pattern.json

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
import triton
import triton.language as tl
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from morphserve.kernels.w4a16 import GemvConfig, w4a16_gemv, w4a16_matmul_ref  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402
from morphserve.quant.dispatch import Timer  # noqa: E402

# (N, K) of the fused projections: Llama-2-7B qkv, o, gate_up, down; Llama-3-8B qkv, gate_up, down (o = 4096^2).
SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (6144, 4096), (28672, 4096), (4096, 14336)]
GROUP = 128


def _valid(cfg: GemvConfig) -> bool:
    per_thread = cfg.block_n // (32 * cfg.num_warps)  # output columns per thread
    return 1 <= per_thread <= 8


def late_space() -> list[GemvConfig]:
    """The pipelined kernel with one accumulator per word row (``late``: no cross-thread reduction in the loop), at
    most 32 words per thread and step (more spills on sm_90), next to the dispatcher's current W4 GEMV candidates."""
    from morphserve.memory.weight_arena import Precision
    from morphserve.quant.dispatch import _GEMV_SHAPES

    splits = (1, 2, 4, 8, 16, 32)
    space = [GemvConfig(bn, w, sk, *rest) for bn, w, *rest in _GEMV_SHAPES[Precision.W4] for sk in splits]
    space += [GemvConfig(bn, w, sk, st, rs, late=True) for bn, w, st, rs, sk in itertools.product(
        (128, 256, 512), (1, 2, 4), (1, 2, 3, 4), (4, 8, 16), splits) if rs * bn // (32 * w) <= 32]
    return [c for c in space if _valid(c)]


def sweep_space() -> list[GemvConfig]:
    space = [GemvConfig(bn, w, sk) for bn, w, sk in itertools.product((64, 128, 256, 512), (1, 2, 4),
                                                                     (1, 2, 4, 8, 16, 32))]
    space += [GemvConfig(bn, w, sk, st, rs) for bn, w, sk, st, rs in itertools.product(
        (128, 256, 512), (1, 2, 4), (2, 4, 8, 16, 32), (2, 3, 4), (4, 8, 16))]
    return [c for c in space if _valid(c)]


def copy_bandwidth(timer: Timer) -> float:
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (timer.median_us(lambda: dst.copy_(src)) * 1e-6)


def run_sweep(args: argparse.Namespace, timer: Timer) -> dict:
    bw = copy_bandwidth(timer)
    rows = []
    space = late_space() if args.space == "late" else sweep_space()
    for n, k in tqdm(SHAPES, desc="shapes"):
        qw = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
        s = (torch.rand(k // GROUP, n, device="cuda") * 0.01).half()
        z = torch.randint(0, 16, (k // GROUP, n), device="cuda").half()
        w16 = torch.randn(n, k, device="cuda").half()
        for m in args.m:
            x = torch.randn(m, k, device="cuda").half()
            ref = w4a16_matmul_ref(x.float(), qw, s.float(), z.float(), GROUP)
            fp16 = min(timer.median_us(lambda: torch.mm(x, w16.t())) for _ in range(2))
            nbytes = k * n // 2 + 2 * 2 * (k // GROUP) * n + 2 * m * (k + n)
            times: dict[str, float] = {}
            failed: dict[str, str] = {}
            for cfg in space:
                try:
                    y = w4a16_gemv(x, qw, s, z, GROUP, cfg)
                    err = float((y.float() - ref).norm() / ref.norm())
                    if err > 1e-2:
                        failed[cfg.name] = f"relative error {err:.3g}"
                        continue
                    times[cfg.name] = timer.median_us(lambda: w4a16_gemv(x, qw, s, z, GROUP, cfg))
                except Exception as exc:  # a configuration the compiler rejects is recorded, not hidden
                    failed[cfg.name] = repr(exc)[:300]
            best = sorted((v, c) for c, v in times.items())
            reg = [(v, c) for v, c in best if ",p" not in c]
            late = [(v, c) for v, c in best if ",late" in c]
            row = {"n": n, "k": k, "m": m, "fp16_us": fp16, "bytes": nbytes, "best": best[:8],
                   "best_register_prefetch": reg[:3], "best_late": late[:3],
                   "best_not_late": [(v, c) for v, c in best if ",late" not in c][:3], "times": times,
                   "failed": failed}
            rows.append(row)
            tqdm.write(f"{n}x{k} m={m}: fp16 {fp16:.1f} us; best {best[0][1]} {best[0][0]:.1f} us "
                       f"({fp16 / best[0][0]:.2f}x, {nbytes / (best[0][0] * 1e-6) / bw:.2f} of copy BW); "
                       f"register-prefetch best {reg[0][1]} {reg[0][0]:.1f} us; "
                       + (f"late best {late[0][1]} {late[0][0]:.1f} us; " if late else "")
                       + f"{len(failed)} failed")
    return {"copy_bw": bw, "rows": rows}


@triton.jit
def _read_tiles(qw, out, N, rows_per_split, BN: tl.constexpr, R: tl.constexpr, BLOCKED: tl.constexpr):
    """XOR of the words a GEMV program of ``BN`` columns and ``rows_per_split`` word rows reads, ``R`` rows per step
    (row-major ``[K // 8, N]``, or with ``BLOCKED`` each column block's ``[K // 8, BN]`` stored contiguously)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = tl.arange(0, BN)
    offs_r = tl.arange(0, R)
    acc = tl.zeros((R, BN), dtype=tl.int32)
    for i in range(0, rows_per_split, R):
        r = pid_k * rows_per_split + i + offs_r
        if BLOCKED:
            ptr = qw + pid_n * (tl.num_programs(1) * rows_per_split) * BN + r[:, None] * BN + offs_n[None, :]
        else:
            ptr = qw + r[:, None] * N + (pid_n * BN + offs_n)[None, :]
        acc ^= tl.load(ptr)
    tl.store(out + (pid_k * tl.num_programs(0) + pid_n) * BN + offs_n, tl.sum(acc, axis=0))


@triton.jit
def _empty(out):
    pass


def run_pattern(args: argparse.Namespace, timer: Timer) -> dict:
    bw = copy_bandwidth(timer)
    o = torch.zeros(1, device="cuda")
    res: dict = {"copy_bw": bw, "empty_kernel_us": timer.median_us(lambda: _empty[(1,)](o)),
                 "empty_kernel_1024_programs_us": timer.median_us(lambda: _empty[(1024,)](o)), "reads": []}
    for n, k in tqdm([(28672, 4096), (4096, 4096), (22016, 4096), (4096, 14336)], desc="shapes"):
        qw = torch.randint(0, 1000, (k // 8, n), dtype=torch.int32, device="cuda")
        nbytes = qw.numel() * 4
        for bn, warps, r, split in [(256, 2, 16, 16), (128, 1, 16, 32), (256, 4, 32, 8), (512, 4, 16, 8),
                                    (1024, 4, 8, 4), (256, 2, 16, 4), (128, 4, 64, 8)]:
            split = min(split, k // 8 // r)
            rps = k // 8 // split
            out = torch.empty(split * n, dtype=torch.int32, device="cuda")
            for blocked in (False, True):
                us = timer.median_us(lambda: _read_tiles[(n // bn, split)](qw, out, n, rps, BN=bn, R=r,
                                                                           BLOCKED=blocked, num_warps=warps))
                res["reads"].append({"n": n, "k": k, "block_n": bn, "warps": warps, "rows_step": r, "split": split,
                                     "layout": "blocked" if blocked else "row-major", "us": us,
                                     "frac_copy_bw": nbytes / (us * 1e-6) / bw})
        best = max((x for x in res["reads"] if x["n"] == n and x["k"] == k), key=lambda x: x["frac_copy_bw"])
        tqdm.write(f"{n}x{k}: best read {best['us']:.1f} us ({best['frac_copy_bw']:.2f} of copy BW, "
                   f"{best['layout']}, n{best['block_n']} w{best['warps']} r{best['rows_step']} sk{best['split']})")
    tqdm.write(f"empty kernel {res['empty_kernel_us']:.1f} us")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["sweep", "pattern"])
    ap.add_argument("--m", type=int, nargs="+", default=[1], help="rows of x (sweep)")
    ap.add_argument("--space", choices=["all", "late"], default="all",
                    help="sweep: every configuration (all) or the late-reduction kernel against the dispatcher's "
                         "current candidates (late)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_w4_gemv.py needs a CUDA GPU")
    for m in args.m:
        if m < 1:
            sys.exit(f"--m must be >= 1, got {m}")
    torch.manual_seed(0)
    timer = Timer(torch.device("cuda"), reps=args.reps, warmup=2)
    t0 = time.time()
    res = run_sweep(args, timer) if args.what == "sweep" else run_pattern(args, timer)
    res["wall_s"] = time.time() - t0
    res["provenance"] = provenance(vars(args) | {"out": str(args.out)}, "cuda", 0, True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
