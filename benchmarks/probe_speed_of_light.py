#!/usr/bin/env python3
"""The speed of light for issue #3's small-M targets: how fast *any* W4 or W8 linear could be on this GPU.

At small M every W4 kernel must read the codes, scales and zeros of its weight from DRAM at least once (W8: codes and
scales); everything else it does can at best hide under that read.  This probe times a pure streaming read of exactly
those bytes (an XOR of every word, the best of a sweep of tilings) next to cuBLAS FP16 on a weight of the same shape
and next to the dispatcher's chosen W4/W8 kernel, in one process, under two timers:

* ``flush``: the dispatcher's :class:`~morphserve.quant.dispatch.Timer` (L2 flushed by a read, one launch between
  two CUDA events, median), which every table of BENCHMARKS.md's issue #3 section uses;
* ``graph``: a CUDA graph of ``R`` back-to-back calls, each on its own copy of the weight (``R`` copies of the
  quantized bytes are at least three times the L2 size, so each call reads DRAM), timed as whole replays after an L2
  flush: per call = median replay time / ``R``.  This is the engine's setting (decode steps replay graphs) and
  removes the per-launch cost from both sides.

``fp16 / read`` is an upper bound on the speedup of any kernel of that precision over cuBLAS at that shape and timer:
a kernel that reads the same bytes cannot take less time than the best pure read of them.  Where the bound is below
the issue's target (W4 >= 3x at M <= 16, >= 2x at M = 32; W8 >= 1.8x at M <= 16), the target cannot be met at that
shape on this device, whatever the kernel.

    python3 benchmarks/probe_speed_of_light.py --out speed_of_light.json

Needs a CUDA GPU.  Writes JSON with provenance and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.language as tl
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_quant_linear import min_bytes  # noqa: E402
from probe_w4_gemv import GROUP, SHAPES, _empty, copy_bandwidth  # noqa: E402

import morphserve.quant  # noqa: E402,F401  (registers the layouts and the dispatch)
from morphserve.memory.weight_arena import Precision  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402
from morphserve.quant import dispatch  # noqa: E402
from morphserve.quant.dispatch import Timer  # noqa: E402

TARGETS = {("w4", 1): 3.0, ("w4", 16): 3.0, ("w4", 32): 2.0, ("w8", 1): 1.8, ("w8", 16): 1.8}
READ_SPACE = list(itertools.product((512, 1024, 2048), (2, 4, 8, 16), (4, 8)))  # words per load, loads, warps


@triton.jit
def _stream_read(src, out, n_words, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Each program reads ``UNROLL`` independent blocks of ``BLOCK`` consecutive int32 words (all loads issued before
    any result is needed) and stores their XOR: a read of ``src`` and nothing else."""
    offs = tl.program_id(0) * (BLOCK * UNROLL) + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(UNROLL):
        o = offs + i * BLOCK
        acc ^= tl.load(src + o, mask=o < n_words, other=0)
    tl.store(out + tl.program_id(0), tl.xor_sum(acc, 0))


def quantized_bytes(precision: str, n: int, k: int) -> int:
    """Bytes a kernel must read for the weight alone: W4 codes + float16 scales and zeros per group; W8 codes +
    scales (:func:`bench_quant_linear.min_bytes` without activations)."""
    return min_bytes(precision, n, k, GROUP, 0)


def read_call(buf: torch.Tensor, out: torch.Tensor, cfg: tuple[int, int, int]) -> Callable[[], None]:
    block, unroll, warps = cfg
    grid = (math.ceil(buf.numel() / (block * unroll)),)
    return lambda: _stream_read[grid](buf, out, buf.numel(), BLOCK=block, UNROLL=unroll, num_warps=warps)


def graph_us(calls: list[Callable[[], object]], timer: Timer) -> float:
    """Per-call time of ``calls`` captured back to back in one CUDA graph (median replay / len(calls))."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    return timer.median_us(g.replay) / len(calls)


def run(args: argparse.Namespace) -> dict:
    dev = torch.device("cuda")
    timer = Timer(dev, reps=args.reps, warmup=2)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    o = torch.zeros(1, device=dev)
    res: dict = {"copy_bw": copy_bandwidth(timer), "l2_bytes": l2,
                 "empty_kernel_us": {"flush": timer.median_us(lambda: _empty[(1,)](o)),
                                     "graph": graph_us([lambda: _empty[(1,)](o)] * 32, timer)},
                 "rows": []}
    for n, k in tqdm(SHAPES, desc="shapes"):
        copies = min(64, max(8, math.ceil(3 * l2 / quantized_bytes("w4", n, k))))
        w16 = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _ in range(copies)]
        row: dict = {"n": n, "k": k, "copies": copies, "fp16_us": {}, "read": {}, "chosen": {}}
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            y = torch.empty(m, n, device=dev, dtype=torch.float16)
            calls = [lambda w=w: torch.mm(x, w.t(), out=y) for w in w16]
            row["fp16_us"][m] = {"flush": min(timer.median_us(calls[0]), timer.median_us(calls[1])),
                                 "graph": graph_us(calls, timer)}
        del w16
        for prec in ("w4", "w8"):
            nbytes = quantized_bytes(prec, n, k)
            bufs = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), device=dev, dtype=torch.int32)
                    for _ in range(copies)]
            out = torch.empty(bufs[0].numel(), dtype=torch.int32, device=dev)
            sweep = sorted((timer.median_us(read_call(bufs[0], out, cfg)), cfg) for cfg in READ_SPACE)
            graph = [(graph_us([read_call(b, out, cfg) for b in bufs], timer), cfg) for _, cfg in sweep[:4]]
            best_g = min(graph)
            row["read"][prec] = {"bytes": nbytes, "flush_us": sweep[0][0], "flush_cfg": sweep[0][1],
                                 "graph_us": best_g[0], "graph_cfg": best_g[1]}
            del bufs
            precision = Precision.W4 if prec == "w4" else Precision.W8
            ws = [dispatch.random_weight(precision, n, k, GROUP, torch.float16, dev, seed=i) for i in range(copies)]
            row["chosen"][prec] = {}
            for m in args.m:
                choice = dispatch.autotune(ws[0], torch.float16, dispatch.bucket_of(m), timer)
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                y = torch.empty(m, n, device=dev, dtype=torch.float16)
                row["chosen"][prec][m] = {
                    "path": choice.path, "tuned_us": choice.us,
                    "flush": timer.median_us(lambda w=ws[1]: dispatch.quant_matmul(x, w, y)),
                    "graph": graph_us([lambda w=w: dispatch.quant_matmul(x, w, y) for w in ws], timer)}
            del ws
        res["rows"].append(row)
        tqdm.write(summary_line(row))
    return res


def summary_line(row: dict) -> str:
    parts = [f"{row['n']}x{row['k']}"]
    for prec in ("w4", "w8"):
        r = row["read"][prec]
        for t in ("flush", "graph"):
            f16 = row["fp16_us"][min(row["fp16_us"])][t]
            parts.append(f"{prec} {t}: read {r[t + '_us']:.1f} us, bound {f16 / r[t + '_us']:.2f}x")
    return " | ".join(parts)


def bounds(res: dict) -> list[dict]:
    """Per (shape, precision, M, timer): the speed-of-light bound fp16 / read, the target, and the chosen kernel
    (under ``flush``, the tuner's median of the chosen kernel, as in BENCHMARKS.md's tables; the eager end-to-end
    call is kept in the rows as ``chosen.flush``)."""
    out = []
    for row in res["rows"]:
        fp16 = {int(m): v for m, v in row["fp16_us"].items()}  # int keys, or str after a JSON round trip
        for (prec, m), target in TARGETS.items():
            if m not in fp16:
                continue
            chosen = {int(mm): v for mm, v in row["chosen"][prec].items()}[m]
            for t in ("flush", "graph"):
                f16, read = fp16[m][t], row["read"][prec][t + "_us"]
                kernel_us = chosen["tuned_us"] if t == "flush" else chosen["graph"]
                out.append({"n": row["n"], "k": row["k"], "precision": prec, "m": m, "timer": t, "fp16_us": f16,
                            "read_us": read, "bound": f16 / read, "target": target, "feasible": f16 / read >= target,
                            "chosen_path": chosen["path"], "chosen_us": kernel_us, "chosen_speedup": f16 / kernel_us,
                            "chosen_frac_of_light": read / kernel_us})
    return out


def markdown(b: list[dict]) -> str:
    lines = ["| N x K | prec | M | timer | FP16 us | read us | bound | target | chosen us (x FP16, of light) |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in b:
        lines.append(f"| {r['n']} x {r['k']} | {r['precision']} | {r['m']} | {r['timer']} | {r['fp16_us']:.1f} | "
                     f"{r['read_us']:.1f} | {'**' if not r['feasible'] else ''}{r['bound']:.2f}"
                     f"{'**' if not r['feasible'] else ''} | {r['target']} | {r['chosen_us']:.1f} "
                     f"({r['chosen_speedup']:.2f}x, {r['chosen_frac_of_light']:.2f}) `{r['chosen_path']}` |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 32], help="rows of x")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rebuild", action="store_true",
                    help="recompute the bounds and the table of an existing --out JSON (no GPU needed)")
    args = ap.parse_args()
    if args.rebuild:
        res = json.loads(args.out.read_text())
    else:
        if not torch.cuda.is_available():
            sys.exit("probe_speed_of_light.py needs a CUDA GPU")
        bad = [m for m in args.m if m < 1]
        if bad:
            sys.exit(f"--m must be >= 1, got {bad}")
        torch.manual_seed(0)
        t0 = time.time()
        res = run(args)
        res["wall_s"] = time.time() - t0
        res["provenance"] = provenance(vars(args) | {"out": str(args.out)}, "cuda", 0, True)
    res["bounds"] = bounds(res)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res["bounds"])
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    infeasible = sorted({(r["n"], r["k"], r["precision"], r["m"]) for r in res["bounds"]
                         if not r["feasible"] and r["timer"] == "graph"})
    print(f"cells whose target exceeds the speed of light under the graph timer: {len(infeasible)}")
    print(f"empty kernel: {res['empty_kernel_us']}")


if __name__ == "__main__":
    main()
