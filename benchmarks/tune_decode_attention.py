#!/usr/bin/env python3
"""Sweep of the paged decode-attention kernel's launch parameters on the GPU at hand (issue #4).

For each model shape (Llama-2-7B: MHA, 32 heads; Llama-3-8B: GQA, 8 KV heads; head dim 128; float16; blocks of 16
tokens in the engine's pool layout) and each (batch, context), every candidate
:class:`~morphserve.kernels.attention.DecodeTuning` (keys per iteration, warps, pipeline stages, address prefetch)
and split count is checked against the default launch (same output within float16 tolerance), then timed: one CUDA
graph replays the decode attention of all 32 layers (each layer reads its own K/V, as in a decode step, so nothing
stays in L2 between calls), CUDA events, the median of ``--reps`` replays after warm-up.  Achieved bandwidth = K/V
bytes read over time, against the device-to-device copy bandwidth measured in the same run.  Sequences get random
block tables over a pool of random K/V.

Writes JSON (every candidate's time, the best per setting, the best single tuning over all settings by geometric
mean of time relative to each setting's best, provenance) and prints a table.

    python3 benchmarks/tune_decode_attention.py --out decode_tuning.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_fastpath import copy_bandwidth as fastpath_copy_bandwidth  # noqa: E402
from morphserve.kernels.attention import (DecodeTuning, PagedAttentionMetadata, decode_splits,  # noqa: E402
                                          decode_tuning, paged_attention_decode)
from morphserve.kernels.kv_store import KVAddress  # noqa: E402
from morphserve.memory.kv_pool import KVPool  # noqa: E402
from morphserve.model.config import architecture  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402

BLOCK = 16


def copy_bandwidth(nbytes: int = 1 << 31) -> float:
    """Device-to-device copy rate in bytes/s, read plus write (:func:`benchmarks.bench_fastpath.copy_bandwidth`)."""
    return 2 * nbytes / fastpath_copy_bandwidth(torch.device("cuda"), nbytes, 6)["median_s"]


def graph_time(fn, reps: int) -> float:
    """Median seconds of one replay of a CUDA graph of ``fn``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del g
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--settings", default="1x521,8x521,32x521,64x521,128x521,8x2048",
                    help="batch x context pairs")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--splits", default="1,2,4,8,16")
    ap.add_argument("--mha-dot", default="0",
                    help="comma list of 0/1: MHA's query row on the CUDA cores (0) or padded to 16 rows on tensor "
                         "cores (1); GQA models ignore it")
    ap.add_argument("--max-programs-per-sm", type=int, default=16, help="skip split counts beyond this")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layouts", default="pool",
                    help="'pool': the engine's pool (every layer of a block together, so one layer's K/V lies in "
                         "pieces a whole block apart); 'layer-major': one pool per layer (each layer's blocks "
                         "contiguous), the same kernel and block tables: tests whether address spread (TLB reach) "
                         "limits decode attention")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = copy_bandwidth()
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    tunings = [DecodeTuning(block_n=bn, num_warps=w, num_stages=st, prefetch=pf, mha_dot=md)
               for bn, w, st, pf, md in itertools.product([int(x) for x in args.block_n.split(",")],
                                                          [int(x) for x in args.warps.split(",")],
                                                          [int(x) for x in args.stages.split(",")], [False, True],
                                                          [bool(int(x)) for x in args.mha_dot.split(",")])]
    split_set = [int(x) for x in args.splits.split(",")]
    res: dict = {"provenance": provenance(vars(args) | {"out": str(args.out)}, dev, 0, True),
                 "copy_tb_per_s": bw / 1e12, "num_sms": sms, "settings": []}
    for name, layout in itertools.product(args.models.split(","), args.layouts.split(",")):
        if layout not in ("pool", "layer-major"):
            raise SystemExit(f"--layouts: unknown layout {layout!r} (pool, layer-major)")
        cfg = architecture(name)
        max_blocks = max(b * -(-c // BLOCK) for b, c in settings)
        if layout == "pool":
            pools = [KVPool(cfg, max_blocks + 1, BLOCK, torch.float16, dev)]
        else:
            pools = [KVPool(cfg.replace(num_layers=1), max_blocks + 1, BLOCK, torch.float16, dev)
                     for _ in range(cfg.num_layers)]
        for pool in pools:
            for seg in pool.segments.values():
                seg.tensor.view(torch.float16).uniform_(-1, 1)
        addrs = [KVAddress.of(p) for p in pools]
        addr = addrs[0]
        # (address, layer index within that address) of each model layer
        where = [(addr, layer) for layer in range(cfg.num_layers)] if layout == "pool" else \
            [(a, 0) for a in addrs]
        kv_layer_token = 2 * cfg.num_kv_heads * cfg.head_dim * 2
        group = cfg.num_heads // cfg.num_kv_heads
        shipped = decode_tuning(group)
        mine = [t for t in tunings if group == 1 or not t.mha_dot]  # GQA ignores mha_dot: no duplicates
        mine += [shipped] if shipped not in mine else []  # the shipped default is always timed
        for batch, ctx in settings:
            perm = torch.randperm(max_blocks, device="cpu").tolist()
            per = -(-ctx // BLOCK)
            tables = [perm[i * per:(i + 1) * per] for i in range(batch)]
            qs = list(range(batch + 1))
            q = torch.randn(cfg.num_layers, batch, cfg.num_heads, cfg.head_dim, device=dev, dtype=torch.float16)
            scale = cfg.head_dim ** -0.5
            nbytes = cfg.num_layers * batch * ctx * kv_layer_token
            default_splits = decode_splits(batch, cfg.num_kv_heads, sms, group=group)
            meta0 = PagedAttentionMetadata.from_lists(qs, [ctx] * batch, tables, dev, num_splits=default_splits)
            want = paged_attention_decode(q[0], addr, 0, meta0, scale).float()
            rows = []
            for splits in sorted(set(split_set) | {default_splits}):
                if batch * cfg.num_kv_heads * splits > args.max_programs_per_sm * sms and splits > 1:
                    continue
                meta = PagedAttentionMetadata.from_lists(qs, [ctx] * batch, tables, dev, num_splits=splits)
                for t in mine:
                    got = paged_attention_decode(q[0], addr, 0, meta, scale, t).float()
                    err = (got - want).abs().max().item()
                    if not err <= 2e-2 * max(1.0, want.abs().max().item()):
                        rows.append({"tuning": t.__dict__, "splits": splits, "error": err, "s": None})
                        continue

                    def step(meta=meta, t=t):
                        for layer, (a, li) in enumerate(where):
                            paged_attention_decode(q[layer], a, li, meta, scale, t)
                    sec = graph_time(step, args.reps)
                    rows.append({"tuning": t.__dict__, "splits": splits, "s": sec, "tb_per_s": nbytes / sec / 1e12,
                                 "fraction_of_copy": nbytes / sec / bw})
            ok = [r for r in rows if r["s"] is not None]
            best = min(ok, key=lambda r: r["s"])
            default = next(r for r in ok if r["splits"] == default_splits and r["tuning"] == shipped.__dict__)
            entry = {"model": name, "layout": layout, "batch": batch, "context": ctx, "kv_bytes": nbytes,
                     "default_splits": default_splits, "default": default, "best": best,
                     "failed": [r for r in rows if r["s"] is None], "candidates": rows}
            res["settings"].append(entry)
            print(f"{name} {layout} b{batch} ctx{ctx}: default {default['s'] * 1e6:.0f} us ({default['fraction_of_copy']:.2f}"
                  f" of copy), best {best['s'] * 1e6:.0f} us ({best['fraction_of_copy']:.2f}) splits {best['splits']} "
                  f"{best['tuning']}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1))  # partial results survive a time limit
        del pools, pool, addrs, addr, where
        torch.cuda.empty_cache()
    # the best single tuning (split count chosen per setting) by geometric mean of time / setting's best
    keys = {json.dumps(r["tuning"], sort_keys=True) for e in res["settings"] for r in e["candidates"] if r["s"]}
    score = {}
    for k in keys:
        logs = []
        for e in res["settings"]:
            mine = [r["s"] for r in e["candidates"] if r["s"] and json.dumps(r["tuning"], sort_keys=True) == k]
            if not mine:
                break
            logs.append(math.log(min(mine) / e["best"]["s"]))
        else:
            score[k] = math.exp(sum(logs) / len(logs))
    top = sorted(score.items(), key=lambda kv: kv[1])[:10]
    res["single_tuning_ranking"] = [{"tuning": json.loads(k), "geomean_vs_best": v} for k, v in top]
    for k, v in top[:5]:
        print(f"  {v:.3f}  {k}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
