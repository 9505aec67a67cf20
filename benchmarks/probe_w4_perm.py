#!/usr/bin/env python3
"""Would a position-major W4 layout make the tensor-core W4 GEMM fast?  (issue #3, a prototype measurement)

The engine packs the codes of ``k = 8r + j`` into nibble ``j`` of word row ``r`` (natural order).  The
weight-stationary GEMM (``_w4_gemm_t_kernel``) multiplies nibble ``j`` of a group's words with the columns
``x[:, 8r + j]``; those are strided, so the kernel loads the group's activations into registers, splits them into the
eight positions and stores each, transposed, into shared memory right before its ``wgmma``.  In the compiled sm_90
code every one of the eight products per group then waits for the previous one (``WARPGROUP.DEPBAR`` + a fence
after each ``HGMMA``).

This probe packs the same codes *position-major within each group* (nibble ``j`` of word row ``r`` of group ``g``
holds ``k = g G + j (G / 8) + r``), so the activations each product needs are a contiguous slice of ``x`` that the
compiler can stream into shared memory with asynchronous copies, and times a prototype kernel on it against cuBLAS
FP16 and against the dispatcher's choice on the engine's current layout, in the same run, on the Llama-2-7B /
Llama-3-8B projection shapes.  ``exact`` kernels round ``(q - z) s`` to float16 like the reference; the others
multiply the raw codes (``1024 + q`` as float16) and apply zero point and scale per group.

    python3 benchmarks/probe_w4_perm.py --out w4_perm.json

Needs a CUDA GPU.  Writes JSON with provenance and prints one line per shape and M.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from morphserve.kernels.pdl import pdl_trigger, pdl_wait  # noqa: E402
from morphserve.kernels.triton_support import interpreting, launch_options  # noqa: E402
from morphserve.kernels.w4a16 import gemm_tile, splitk_workspace, store_tile_t  # noqa: E402
from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402
from morphserve.quant.dispatch import QuantWeight, Timer, autotune  # noqa: E402
from morphserve.quant.packing import pack_w4  # noqa: E402
from probe_w4_gemv import SHAPES, copy_bandwidth  # noqa: E402

GROUP = 128


def pack_position_major(codes: torch.Tensor, group: int) -> torch.Tensor:
    """uint8 codes ``[N, K]`` -> int32 ``[K // 8, N]``, nibble ``j`` of row ``g (G/8) + r`` = code of
    ``k = g G + j (G/8) + r``."""
    n, k = codes.shape
    rows = group // 8
    c = codes.t().to(torch.int64).reshape(k // group, 8, rows, n).permute(0, 2, 1, 3).reshape(k // 8, 8, n)
    words = (c << (4 * torch.arange(8, device=c.device)).view(1, 8, 1)).sum(dim=1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement into int32


@triton.jit(do_not_specialize=["M", "num_groups", "groups_per_split", "split_k"])
def _gemm_t_perm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
                        M, N, stride_xm, num_groups, groups_per_split, split_k,
                        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXACT: tl.constexpr,
                        FENCE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    ROWS: tl.constexpr = GROUP // 8
    pid_m, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    offs_g = tl.arange(0, GROUP)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(0, groups_per_split):
        g = pid_k * groups_per_split + i
        g_in = tl.minimum(g, num_groups - 1)
        w = tl.load(qw_ptr + (g_in * ROWS + offs_r)[None, :] * N + offs_n[:, None], mask=n_mask[:, None], other=0)
        s = tl.load(s_ptr + g_in * N + offs_n, mask=n_mask & (g < num_groups), other=0.0)
        z = tl.load(z_ptr + g_in * N + offs_n, mask=n_mask, other=0.0)
        if EXACT:
            zz = (z + 1024.0)[:, None]
            for j in tl.static_range(8):
                xj = tl.load(x_rows + (g_in * GROUP + j * ROWS + offs_r)[None, :], mask=m_mask[:, None], other=0.0)
                a = ((((w >> (4 * j)) & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zz) * s[:, None]
                acc = tl.dot(a, tl.trans(xj), acc)
        else:
            xsum = tl.sum(tl.load(x_rows + (g_in * GROUP + offs_g)[None, :], mask=m_mask[:, None],
                                  other=0.0).to(tl.float32), axis=1)
            d = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_rows + (g_in * GROUP + j * ROWS + offs_r)[None, :], mask=m_mask[:, None], other=0.0)
                a = (((w >> (4 * j)) & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                d = tl.dot(a, tl.trans(xj), d)
            acc += s.to(tl.float32)[:, None] * (d - (z.to(tl.float32) + 1024.0)[:, None] * xsum[None, :])
    tile_id = pid_m * tl.num_programs(1) + pid_n
    pdl_trigger(USE_PDL)
    store_tile_t(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE)


def run_perm(x, qw, s, z, y, cfg):
    bm, bn, warps, stages, split, exact = cfg
    m, k = x.shape
    n = qw.shape[1]
    num_groups = k // GROUP
    per = triton.cdiv(num_groups, max(1, min(split, num_groups)))
    split = triton.cdiv(num_groups, per)
    ws = splitk_workspace(x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _gemm_t_perm_kernel[grid](x, qw, s, z, y, ws.partials, ws.counters, m, n, x.stride(0), num_groups, per, split,
                              GROUP=GROUP, BLOCK_M=bm, BLOCK_N=bn, EXACT=exact, FENCE=not interpreting(), num_warps=warps,
                              num_stages=stages, **launch_options(x.device))
    return y


def space(m: int, n: int, num_sms: int) -> list[tuple]:
    out = []
    for bm in (16, 32, 64, 128):
        if bm < m or bm > max(16, 2 * m):
            continue
        for (bn, warps), stages, exact in itertools.product(((64, 4), (128, 4), (256, 4), (256, 8)), (2, 4), (0, 1)):
            tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            for waves in (1, 2, 4, 8):
                split = min(max(1, -(-waves * num_sms // tiles)), 32)
                cfg = (bm, bn, warps, stages, split, exact)
                if cfg not in out:
                    out.append(cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_w4_perm.py needs a CUDA GPU")
    torch.manual_seed(0)
    timer = Timer(torch.device("cuda"), reps=args.reps, warmup=2)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    t0 = time.time()
    bw = copy_bandwidth(timer)
    rows = []
    for n, k in tqdm(SHAPES, desc="shapes"):
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        s = (torch.rand(k // GROUP, n, device="cuda") * 0.01 + 0.001).half()
        z = torch.randint(0, 16, (k // GROUP, n), device="cuda").half()
        w16 = ((codes.float() - z.float().repeat_interleave(GROUP, 0).t()) * s.float().repeat_interleave(GROUP, 0).t()).half()
        qw_nat = pack_w4(codes)
        qw_perm = pack_position_major(codes, GROUP)
        for m in args.m:
            x = torch.randn(m, k, device="cuda").half()
            y = torch.empty(m, n, dtype=torch.half, device="cuda")
            ref = F.linear(x.float(), w16.float())
            fp16 = min(timer.median_us(lambda: torch.mm(x, w16.t())) for _ in range(2))
            chosen = autotune(QuantWeight(Precision.W4, qw_nat, s, z, GROUP), torch.half, m, timer)
            nbytes = n * k // 2 + 4 * (k // GROUP) * n + 2 * m * (k + n)
            times, failed = {}, {}
            for cfg in space(m, n, num_sms):
                name = "perm[m{},n{},w{},s{},sk{},{}]".format(*cfg[:5], "exact" if cfg[5] else "offset")
                try:
                    err = float((run_perm(x, qw_perm, s, z, y, cfg).float() - ref).norm() / ref.norm())
                    if err > 1e-2:
                        failed[name] = f"relative error {err:.3g}"
                        continue
                    times[name] = timer.median_us(lambda: run_perm(x, qw_perm, s, z, y, cfg))
                except Exception as exc:  # a configuration the compiler rejects is recorded, not hidden
                    failed[name] = repr(exc)[:300]
            best = sorted((v, c) for c, v in times.items())
            rows.append({"n": n, "k": k, "m": m, "fp16_us": fp16, "bytes": nbytes, "dispatcher": chosen.path,
                         "dispatcher_us": chosen.us, "best": best[:8], "times": times, "failed": failed})
            b = best[0] if best else (float("nan"), "none")
            tqdm.write(f"{n}x{k} m={m}: fp16 {fp16:.1f}; dispatcher {chosen.path} {chosen.us:.1f} us "
                       f"({fp16 / chosen.us:.2f}x); perm best {b[1]} {b[0]:.1f} us ({fp16 / b[0]:.2f}x, "
                       f"{nbytes / (b[0] * 1e-6) / bw:.2f} of copy BW); {len(failed)} failed")
            res = {"copy_bw": bw, "rows": rows, "wall_s": time.time() - t0,  # rewritten after every row
                   "provenance": provenance(vars(args) | {"out": str(args.out)}, "cuda", 0, True)}
            args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
