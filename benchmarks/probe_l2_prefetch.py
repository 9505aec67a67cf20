#!/usr/bin/env python3
"""Does prefetching weights into L2 shorten a batch-1 decode step?  (GPU only; see
:mod:`morphserve.kernels.l2_prefetch`.)

Part 1, one output projection (4096 x 4096 float16, 33.5 MB) at M = 1: GEMV time with a cold L2, after a bulk
prefetch of its weights followed by an idle gap of a few microseconds, and right after a previous read of the same
weights.  Also checks that the GEMV gives bit-identical outputs with its own L2 prefetch on and off.

Part 2, whole decode steps of one engine with synthetic weights (:func:`bench_fastpath.decode_sweep`, context
512), the knobs interleaved in the order given and the CUDA graphs recaptured at each switch:

* ``o<N>``: ``rope_and_store`` prefetches the layer's output-projection weights (pieces of N bytes per thread);
* ``g<N>``: each M = 1 GEMV program prefetches the next N ``BLOCK_K`` chunks of its rows before its PDL wait;
* ``early``: the GEMV lets the next kernel launch right after its wait rather than after its loop.

Variants are ``+``-joined knobs (``base``: none).  One batch-1 step of the variants named in ``--profile`` is
profiled (GEMV kernel time per step).

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_l2_prefetch.py --out l2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.bench_fastpath as B  # noqa: E402
from morphserve.kernels import gemv as G  # noqa: E402
from morphserve.kernels import kv_store as KS  # noqa: E402
from morphserve.kernels.l2_prefetch import l2_prefetch_share, programs_for  # noqa: E402
from morphserve.model import llama  # noqa: E402
from morphserve.model.config import architecture  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402


@triton.jit
def _prefetch_kernel(ptr, n, parts, NT: tl.constexpr):
    l2_prefetch_share(ptr, n, tl.program_id(0), parts, NT, True)


def prefetch(t: torch.Tensor, piece: int) -> None:
    parts = programs_for(t.numel() * t.element_size(), piece)
    _prefetch_kernel[(parts,)](t.view(torch.uint8).view(-1), t.numel() * t.element_size(), parts, NT=128,
                               num_warps=4)


def knobs(variant: str) -> dict:
    k: dict = {}
    for part in variant.split("+"):
        if part == "base":
            continue
        if part == "early":
            k["early"] = True
        elif part[0] in "og" and part[1:].isdigit():
            k[part[0]] = int(part[1:])
        else:
            raise ValueError(f"unknown knob {part!r} in variant {variant!r}")
    return k


def apply(k: dict) -> None:
    llama.PREFETCH_OUTPUT_PROJECTION = "o" in k
    KS.PREFETCH_PIECE_BYTES = k.get("o", 16384)
    G.L2_PREFETCH_CHUNKS = k.get("g", 0)
    G.EARLY_TRIGGER = k.get("early", False)


def micro(dev: torch.device, reps: int) -> dict:
    w = torch.randn(4096, 4096, dtype=torch.float16, device=dev)
    x = torch.randn(1, 4096, dtype=torch.float16, device=dev)
    junk = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    cfg = G.gemv_config(1, 4096, 4096)
    out: dict = {"config": str(cfg)}
    # bit-identical with the GEMV's own prefetch on and off
    ref = G.gemv(x, w, cfg)
    G.L2_PREFETCH_CHUNKS = 8
    same = torch.equal(G.gemv(x, w, cfg), ref)
    G.L2_PREFETCH_CHUNKS = 0
    out["identical_with_gemv_l2_prefetch"] = same

    def timed(setup) -> float:
        ts = []
        for _ in range(reps):
            junk.zero_()  # evicts w from L2
            setup()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            G.gemv(x, w, cfg)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3)
        return float(np.median(ts))

    out["cold_us"] = timed(lambda: None)
    out["after_read_us"] = timed(lambda: G.gemv(x, w, cfg))
    for piece in (4096, 16384, 65536):
        for gap_cycles in (0, 4000, 10000, 20000, 40000):
            def setup(piece=piece, gap=gap_cycles):
                prefetch(w, piece)
                if gap:
                    torch.cuda._sleep(gap)
            out[f"prefetch{piece}_gap{gap_cycles}_us"] = timed(setup)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.cuda._sleep(20000)
    torch.cuda.synchronize()
    out["sleep20000_us_host"] = (time.perf_counter() - t0) / 10 * 1e6
    del junk
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--order", default="base,o16384,o4096,g2,g8,early,base,o16384+g2+early,o16384+g2,base")
    ap.add_argument("--profile", default="base,o16384+g2+early")
    ap.add_argument("--micro", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_l2_prefetch needs a CUDA GPU")
    dev = torch.device("cuda")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                 "device": torch.cuda.get_device_name(),
                 "provenance": provenance(config=vars(a) | {"out": str(a.out)}, device=dev)}
    res["copy"] = B.copy_bandwidth(dev, 2 << 30, 10)
    bw = res["copy"]["tb_per_s"] * 1e12
    if a.micro:
        res["micro"] = micro(dev, a.reps * 2)
        print(json.dumps(res["micro"], indent=1), flush=True)
        a.out.write_text(json.dumps(res, indent=1, default=str))
    order = a.order.split(",")
    for v in order:
        apply(knobs(v))  # every variant parses before any engine is built
    apply({})
    batches = [int(b) for b in a.batches.split(",")]
    profiled = set(a.profile.split(",")) if a.profile else set()
    engine_args = argparse.Namespace(prefill=[512], max_model_len=4096, kv_cache_bytes=8 << 30, async_steps="on")
    for model in a.models.split(","):
        eng = B.build_engine(model, architecture(model), engine_args, dev)
        for seg in eng.pool.segments.values():
            seg.tensor.normal_()
        rng = np.random.default_rng(0)
        runs = res.setdefault(model, [])
        for v in order:
            apply(knobs(v))
            eng.runner.graphs.clear()  # the knobs are compile-time constants / launch shapes of captured kernels
            rows = B.decode_sweep(eng, batches, 512, a.reps, 3, bw, rng)
            entry = {"variant": v, "rows": rows}
            print(model, v, [(r["batch"], round(r["step_gpu_s"] * 1e3, 3)) for r in rows], flush=True)
            if v in profiled:
                profiled.discard(v)
                prof = entry["profile_b1"] = B.profile_decode(eng, 1, 512, rng)
                gemv_us = sum(r["us_per_step"] for r in prof["top"] if "gemv" in r["kernel"])
                print(f"   GEMV {gemv_us:.0f} us/step of {prof['kernel_us_per_step']:.0f} us kernel time", flush=True)
            runs.append(entry)
            a.out.write_text(json.dumps(res, indent=1, default=str))
        del eng
        torch.cuda.empty_cache()
        profiled = set(a.profile.split(",")) if a.profile else set()
    apply({})
    return res


if __name__ == "__main__":
    main()
