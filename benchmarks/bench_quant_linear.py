"""W8A16 / W4A16 linear kernels against cuBLAS FP16 on the projection shapes of Llama-2-7B, Llama-3-8B and
CodeLlama-34B (GPU only).

For every distinct projection shape ``(N, K)`` and every M in ``--m`` the script times, in one process:

* FP16: ``torch.mm(x, W.T)`` (cuBLAS) on a random FP16 weight, twice (before and after the quantized runs; the
  difference shows the run-to-run noise);
* W8 and W4: every candidate path of :mod:`morphserve.quant.dispatch` (split-K GEMV, tensor-core GEMM tiles and
  split-K factors, dequantize + cuBLAS) through its autotuner, which also checks each against dequantize + cuBLAS;
  then the automatically chosen path through the dispatch entry point (``quant_matmul``), timed again.

Every time is the median of ``--reps`` runs, each after an L2 flush (a read of >= 256 MiB, leaving clean lines;
see :class:`morphserve.quant.dispatch.Timer`), measured with CUDA events after warm-up.  Achieved bandwidth counts
the bytes a run must move at least (weights, scales, zeros, activations in and out) and is compared with the
device-to-device copy bandwidth measured at the start of the same run (a copy of a 1 GiB tensor, bytes read +
written).

Writes ``<out-dir>/quant_linear_<device>.json`` (provenance, copy bandwidth, every row, the dispatch table) and
``<out-dir>/quant_linear_<device>.md`` (Markdown tables), and prints the summary tables.

    PYTHONPATH=. python3 benchmarks/bench_quant_linear.py                       # all models, all M
    PYTHONPATH=. python3 benchmarks/bench_quant_linear.py --models llama2-7b --m 1 16
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and the dispatch)
from benchmarks.bench_fastpath import copy_bandwidth as fastpath_copy_bandwidth
from morphserve.memory.weight_arena import Precision
from morphserve.model.config import architecture
from morphserve.provenance import provenance
from morphserve.quant import dispatch
from morphserve.quant.layouts import projection_shapes, w4_group_size

MODELS = ("llama2-7b", "llama3-8b", "codellama-34b")
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
RESULTS = Path(__file__).resolve().parent / "results"
# Targets of the issue ("Must show"), checked on the 7B/8B shapes.
TARGET_MODELS = ("llama2-7b", "llama3-8b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--m", nargs="+", type=int, default=list(M_VALUES), help="batch sizes (rows of x)")
    ap.add_argument("--reps", type=int, default=dispatch.TIMING_REPS, help="timed runs per measurement (median)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--source-commit", default=None,
                    help="commit of the source tree, when the run happens in a copy without git metadata")
    args = ap.parse_args(argv)
    bad = [m for m in args.m if m not in dispatch.M_BUCKETS]
    if bad:
        ap.error(f"--m values must be dispatch buckets {dispatch.M_BUCKETS}, got {bad}")
    return args


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> dict[str, float]:
    """Device-to-device copy of ``nbytes``: median bytes/s counting bytes read plus bytes written (the engine
    benchmark's ceiling, :func:`benchmarks.bench_fastpath.copy_bandwidth`, under this script's JSON keys)."""
    t = fastpath_copy_bandwidth(device, nbytes, reps)["median_s"]
    return {"bytes": nbytes, "median_s": t, "bytes_per_s": 2 * nbytes / t}


def min_bytes(precision: str, n: int, k: int, g: int, m: int) -> int:
    """Bytes one product must move at least: weights (+ scales, zeros), x read, y written (2-byte activations)."""
    act = 2 * m * k + 2 * m * n
    if precision == "fp16":
        return 2 * n * k + act
    if precision == "w8":
        return n * k + 2 * n + act
    return n * k // 2 + 2 * 2 * (k // g) * n + act


def family_best(times: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Fastest candidate of each path family (gemv, gemm, gemm_t, dequant_mm)."""
    out: dict[str, dict[str, Any]] = {}
    for name, us in times.items():
        fam = re.match(r"[a-z_]+", name).group(0)
        if fam not in out or us < out[fam]["us"]:
            out[fam] = {"path": name, "us": us}
    return out


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_quant_linear needs a CUDA GPU (the kernels' CPU mode is the Triton interpreter, "
                 "which measures nothing)")
    from tqdm import tqdm

    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    t0 = time.time()
    bw = copy_bandwidth(device)
    print(f"device-to-device copy: {bw['bytes_per_s'] / 1e12:.3f} TB/s (read + write)", flush=True)

    # distinct (N, K, G) shapes with the (model, projection) pairs that use them
    shapes: dict[tuple[int, int, int], list[tuple[str, str]]] = {}
    for model in args.models:
        cfg = architecture(model)
        g = w4_group_size(cfg)
        for proj, (n, k) in projection_shapes(cfg).items():
            shapes.setdefault((n, k, g), []).append((model, proj))

    timer = dispatch.Timer(device, reps=args.reps)
    rows: list[dict[str, Any]] = []
    name = device_slug(device)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def write(partial: bool) -> dict[str, Any]:
        result = _result(args, device, bw, rows, t0, partial)
        (args.out_dir / f"quant_linear_{name}.json").write_text(json.dumps(result, indent=1))
        md = markdown(result, torch.cuda.get_device_name(device))
        (args.out_dir / f"quant_linear_{name}.md").write_text(md)
        if not partial:
            print(md)
        return result

    bar = tqdm(total=len(shapes) * len(args.m), desc="shapes x M")
    for (n, k, g), users in shapes.items():
        w16 = (torch.randn(n, k, device=device, dtype=torch.float32) * 0.02).to(dtype)
        wq = {"w8": dispatch.random_weight(Precision.W8, n, k, 0, dtype, device, seed=1),
              "w4": dispatch.random_weight(Precision.W4, n, k, g, dtype, device, seed=2)}
        exact = {prec: w.dequantize().float() for prec, w in wq.items()}  # for the float32 correctness check
        for m in args.m:
            x = torch.randn(m, k, device=device, dtype=torch.float32).to(dtype)
            fp16_a = timer.median_us(lambda: torch.mm(x, w16.t()))
            row: dict[str, Any] = {"users": [f"{a}/{b}" for a, b in users], "n": n, "k": k, "group_size": g, "m": m}
            for prec, w in wq.items():
                choice = dispatch.autotune(w, dtype, m, timer)
                auto_us = timer.median_us(lambda: dispatch.quant_matmul(x, w))
                err = dispatch._rel_err(dispatch.quant_matmul(x, w), x.float() @ exact[prec].t())
                row[prec] = {"auto_us": auto_us, "chosen": choice.path, "chosen_tuned_us": choice.us,
                             "families": family_best(choice.candidates), "candidates": choice.candidates,
                             "failed": choice.failed, "rel_err_vs_fp32": err,
                             "bytes": min_bytes(prec, n, k, g, m)}
            fp16_b = timer.median_us(lambda: torch.mm(x, w16.t()))
            row["fp16"] = {"us": min(fp16_a, fp16_b), "us_runs": [fp16_a, fp16_b],
                           "bytes": min_bytes("fp16", n, k, g, m)}
            for prec in ("fp16", "w8", "w4"):
                us = row[prec]["us"] if prec == "fp16" else row[prec]["auto_us"]
                row[prec]["bytes_per_s"] = row[prec]["bytes"] / (us * 1e-6)
                row[prec]["frac_copy_bw"] = row[prec]["bytes_per_s"] / bw["bytes_per_s"]
            for prec in ("w8", "w4"):
                row[prec]["speedup_vs_fp16"] = row["fp16"]["us"] / row[prec]["auto_us"]
            rows.append(row)
            bar.update()
        del w16, wq, exact
        torch.cuda.empty_cache()
        write(partial=True)  # a run cut short still leaves every finished shape on disk
    bar.close()
    return write(partial=False)


def _result(args: argparse.Namespace, device: torch.device, bw: dict[str, float], rows: list[dict[str, Any]],
            t0: float, partial: bool) -> dict[str, Any]:
    targets = evaluate_targets(rows)
    return {
        "provenance": provenance(config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                 device=device, seed=0, synthetic_weights=True),
        "source_commit": args.source_commit,
        "method": {"timing": f"median of {args.reps} CUDA-event-timed runs after {dispatch.TIMING_WARMUP} warm-ups, "
                             "L2 flushed before each run by reading (summing) a buffer of >= 256 MiB (clean lines)",
                   "fp16": "torch.mm(x, W.t()) (cuBLAS), timed twice; the smaller median is reported",
                   "auto": "morphserve.quant.dispatch.quant_matmul after autotune (its table is in 'dispatch_table')",
                   "bytes": "minimum bytes: weights (+ scales, zeros) + x + y"},
        "copy_bandwidth": bw,
        "rows": rows,
        "targets": targets,
        "dispatch_table": dispatch.chosen_table(),
        "wall_s": time.time() - t0,
        "complete": not partial,
    }


def evaluate_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets on the 7B/8B shapes, and 'never slower than FP16' on every shape."""
    out: dict[str, Any] = {"w4_3x_m_le_16": [], "w4_2x_m_32": [], "w8_1p8x_m_le_16": [], "slower_than_fp16": []}
    for r in rows:
        on_target = any(u.split("/")[0] in TARGET_MODELS for u in r["users"])
        for prec in ("w8", "w4"):
            if r[prec]["speedup_vs_fp16"] < 1.0:
                out["slower_than_fp16"].append({"shape": [r["n"], r["k"]], "m": r["m"], "precision": prec,
                                                "speedup": r[prec]["speedup_vs_fp16"]})
        if not on_target:
            continue
        for key, prec, ok_m, need in (("w4_3x_m_le_16", "w4", r["m"] <= 16, 3.0),
                                      ("w4_2x_m_32", "w4", r["m"] == 32, 2.0),
                                      ("w8_1p8x_m_le_16", "w8", r["m"] <= 16, 1.8)):
            if ok_m:
                out[key].append({"shape": [r["n"], r["k"]], "m": r["m"], "speedup": r[prec]["speedup_vs_fp16"],
                                 "met": r[prec]["speedup_vs_fp16"] >= need})
    for key in ("w4_3x_m_le_16", "w4_2x_m_32", "w8_1p8x_m_le_16"):
        out[key + "_all_met"] = all(e["met"] for e in out[key]) if out[key] else None
    return out


def markdown(result: dict[str, Any], device_name: str) -> str:
    rows = result["rows"]
    ms = sorted({r["m"] for r in rows})
    bw = result["copy_bandwidth"]["bytes_per_s"]
    lines = [f"Device: {device_name}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write); "
             f"medians of {result['provenance']['config']['reps']} runs, L2 flushed; "
             f"dtype {result['provenance']['config']['dtype']}.", ""]
    for prec, title in (("w4", "W4A16"), ("w8", "W8A16")):
        lines += [f"**{title} speedup over cuBLAS FP16 (auto-chosen path)**", "",
                  "| shape (N x K) | used by | " + " | ".join(f"M={m}" for m in ms) + " |",
                  "|---|---|" + "---:|" * len(ms)]
        for key in dict.fromkeys((r["n"], r["k"]) for r in rows):
            rs = {r["m"]: r for r in rows if (r["n"], r["k"]) == key}
            users = ", ".join(rs[ms[0]]["users"])
            lines.append(f"| {key[0]} x {key[1]} | {users} | "
                         + " | ".join(f"{rs[m][prec]['speedup_vs_fp16']:.2f}" if m in rs else "" for m in ms) + " |")
        lines.append("")
    lines += ["**Times (us, medians) and achieved bandwidth (fraction of the copy bandwidth)**", "",
              "| N x K | M | FP16 us | FP16 BW | W8 us | W8 path | W8 BW | W4 us | W4 path | W4 BW |",
              "|---|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} x {r['k']} | {r['m']} | {r['fp16']['us']:.1f} | {r['fp16']['frac_copy_bw']:.2f} | "
                     f"{r['w8']['auto_us']:.1f} | {r['w8']['chosen']} | {r['w8']['frac_copy_bw']:.2f} | "
                     f"{r['w4']['auto_us']:.1f} | {r['w4']['chosen']} | {r['w4']['frac_copy_bw']:.2f} |")
    lines.append("")
    families = ("gemv", "gemm", "gemm_t", "dequant_mm")
    lines += ["**Best time per path family (us): W4 " + " / ".join(families) + "; W8 the same**", "",
              "| N x K | M | " + " | ".join(f"{p} {f}" for p in ("W4", "W8") for f in families) + " |",
              "|---|---:|" + "---:|" * (2 * len(families))]
    for r in rows:
        cells = []
        for prec in ("w4", "w8"):
            fam = r[prec]["families"]
            cells += [f"{fam[f]['us']:.1f}" if f in fam else "-" for f in families]
        lines.append(f"| {r['n']} x {r['k']} | {r['m']} | " + " | ".join(cells) + " |")
    t = result["targets"]
    lines += ["", f"Targets on the 7B/8B shapes: W4 >= 3x at M <= 16: {t['w4_3x_m_le_16_all_met']}; "
                  f"W4 >= 2x at M = 32: {t['w4_2x_m_32_all_met']}; W8 >= 1.8x at M <= 16: "
                  f"{t['w8_1p8x_m_le_16_all_met']}; (shape, M, precision) slower than FP16: "
                  f"{len(t['slower_than_fp16'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
