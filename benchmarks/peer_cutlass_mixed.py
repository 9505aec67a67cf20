#!/usr/bin/env python3
"""A peer for the W4 kernels (issue #3): CUTLASS's own Hopper mixed-input GEMM on the Llama-2-7B / Llama-3-8B shapes.

CUTLASS example 55 (``55_hopper_int4_bf16_gemm.cu``, shipped in the ``nvidia-cutlass`` wheel on PyPI under
``cutlass_library/source``) multiplies BF16 activations by INT4 weights with per-group scales and zero points
(``--mode=2``, group size 128), the weights offline-shuffled into the order its TMA + warp-specialized WGMMA main loop
reads (``--shuffle=true``), and checks the result against its own reference.  NVIDIA's README calls it tuned for
compute-bound problems.  It runs in CUTLASS's storage layout, not the engine's (``morphserve/quant/packing.py``), so
it cannot serve MorphServe's slots as they are; it measures what a fused kernel of that class reaches at each M on
this device, next to cuBLAS (BF16 and FP16 tensor cores have the same peak).

Its timer is the example's own: the mean of ``--iterations`` launches after ``--warmup``, a synchronize after each, L2
*not* flushed (weights of up to 60 MB can stay in L2 between runs, which flatters it on the small shapes).

    python3 benchmarks/peer_cutlass_mixed.py --cutlass SRC --out peer_cutlass.json [--binary BIN]

``SRC`` is the unpacked wheel's ``cutlass_library/source``; without ``--binary`` the example is built there with
``nvcc`` (sm_90a, about 2 minutes and 6 GB of memory).  Needs a Hopper GPU to run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from probe_w4_gemv import GROUP, SHAPES  # noqa: E402

from morphserve.provenance import provenance  # noqa: E402

EXAMPLE = "examples/55_hopper_mixed_dtype_gemm/55_hopper_int4_bf16_gemm.cu"


def build(src: Path, binary: Path) -> list[str]:
    cmd = ["nvcc", "-std=c++17", "-O3", "-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a",
           "--expt-relaxed-constexpr", f"-I{src / 'include'}", f"-I{src / 'tools/util/include'}",
           f"-I{src / 'examples/common'}", f"-I{(src / EXAMPLE).parent}", "-o", str(binary), str(src / EXAMPLE)]
    subprocess.run(cmd, check=True)
    return cmd


def run_one(binary: Path, m: int, n: int, k: int, iterations: int) -> dict:
    cmd = [str(binary), f"--m={m}", f"--n={n}", f"--k={k}", f"--g={GROUP}", "--mode=2", "--shuffle=true",
           f"--iterations={iterations}", "--warmup=10"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    text = p.stdout + p.stderr
    ms = re.search(r"Avg runtime:\s*([0-9.eE+-]+)\s*ms", text)
    passed = re.search(r"Disposition:\s*(\w+)", text)
    row = {"m": m, "n": n, "k": k, "rc": p.returncode, "us": float(ms.group(1)) * 1000 if ms else None,
           "disposition": passed.group(1) if passed else None}
    if row["us"] is None or row["disposition"] != "Passed":
        row["output_tail"] = text[-2000:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cutlass", type=Path, required=True, help="cutlass_library/source of the nvidia-cutlass wheel")
    ap.add_argument("--binary", type=Path, help="a built example (default: build it next to --out)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 32, 64, 128, 256, 1024])
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not (args.cutlass / EXAMPLE).is_file():
        sys.exit(f"--cutlass {args.cutlass}: no {EXAMPLE} there (expected the wheel's cutlass_library/source)")
    bad = [m for m in args.m if m < 1]
    if bad:
        sys.exit(f"--m must be >= 1, got {bad}")
    res: dict = {"example": EXAMPLE, "build": None, "rows": []}
    binary = args.binary
    if binary is None:
        binary = args.out.with_suffix(".bin")
        t0 = time.time()
        res["build"] = {"cmd": build(args.cutlass, binary), "s": time.time() - t0}
    for n, k in SHAPES:
        for m in args.m:
            row = run_one(binary, m, n, k, args.iterations)
            res["rows"].append(row)
            print(f"{n}x{k} M={m}: {row['us']} us {row['disposition']}", flush=True)
    res["provenance"] = provenance(vars(args) | {"out": str(args.out)}, "cuda", 0, True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    failed = [r for r in res["rows"] if r["disposition"] != "Passed"]
    if failed:
        sys.exit(f"{len(failed)} of {len(res['rows'])} CUTLASS runs did not pass their own check")


if __name__ == "__main__":
    main()
