#!/usr/bin/env python3
"""Where a batch-1 decode step's time goes, kernel by kernel, on the critical path (GPU).

Under programmatic dependent launch a kernel starts before the one in front of it finishes and waits inside, so
profiled kernel durations overlap and do not add up to the step.  In one stream, though, kernel ``i`` cannot finish
before kernel ``i - 1``: the step is exactly the sum of the *end-to-end gaps* ``end[i] - end[i-1]`` (plus the first
kernel's duration).  This probe records the kernels of graph-replayed batch-1 steps with torch.profiler (chrome
trace), cuts them into steps, and charges each gap to the kernel that ends it, grouped by its slot in the layer
(``_gemv_kernel[0..3]`` = qkv, o, gate_up, down).  For each GEMV slot it also gives the rate its gap implies
(weight bytes over gap) against the copy bandwidth measured in the same run.

The batch-1 step time is first measured with RoPE + KV store fused into the decode launch and not
(:data:`morphserve.kernels.attention.FUSE_ROPE_DECODE`), and with the Triton set's greedy argmax and token feed
or PyTorch's (:meth:`KernelSet.greedy`, :meth:`KernelSet.feed_tokens`), alternated ``--rounds`` times in one
engine, and each setting is profiled.  Two ceilings are measured beside it, in the same run:

* **read rate**: the FP16 M = 1 GEMV (several configurations) and cuBLAS on a 2 GiB weight, L2-cold by size:
  how fast a GEMV can stream weights on this device at all, against the copy bandwidth the floor uses;
* **GEMV chain**: the step's GEMVs alone (every projection of every layer and the LM head, same weights and
  configurations, accumulated sums as in the step) captured in one graph: how long the step would take if the
  small kernels between them cost nothing.

    MORPHSERVE_DATA_MIRROR=... PYTHONPATH=. python3 benchmarks/probe_critical_path.py --out critical_path.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.bench_fastpath as B  # noqa: E402
import benchmarks.probe_token_kernels as token_probe  # noqa: E402
from morphserve.kernels import attention  # noqa: E402
from morphserve.kernels import gemv as G  # noqa: E402
from morphserve.kernels import split_accum  # noqa: E402

READ_CONFIGS = [G.GemvConfig(1, 4, 1024, 4, 1, 2), G.GemvConfig(1, 4, 1024, 4, 1, 1),
                G.GemvConfig(1, 8, 1024, 4, 1, 1), G.GemvConfig(1, 4, 2048, 8, 1, 1),
                G.GemvConfig(1, 8, 512, 4, 1, 1), G.GemvConfig(1, 2, 1024, 4, 1, 4)]


def kernel_events(trace: Path) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every GPU kernel in a chrome trace, in start order."""
    evs = json.loads(trace.read_text())["traceEvents"]
    out = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in evs if e.get("cat") == "kernel" and "dur" in e]
    return sorted(out)


def split_steps(kernels: list[tuple[float, float, str]], steps: int) -> list[list[tuple[float, float, str]]]:
    """The kernels cut into ``steps`` equal steps (graph replays of one step launch the same kernels)."""
    per, rem = divmod(len(kernels), steps)
    if rem:
        raise RuntimeError(f"{len(kernels)} kernels do not split into {steps} equal steps")
    chunks = [kernels[i * per:(i + 1) * per] for i in range(steps)]
    names = [k[2] for k in chunks[0]]
    for c in chunks[1:]:
        if [k[2] for k in c] != names:
            raise RuntimeError("the profiled steps launched different kernels")
    return chunks


def slot_labels(names: list[str], num_layers: int) -> list[str]:
    """A label per kernel of a step: short name + its index among the same kernel's launches in one layer (for a
    kernel launched a multiple of ``num_layers`` times), else + its index in the step."""
    counts = {n: names.count(n) for n in set(names)}
    seen: dict[str, int] = {}
    labels = []
    for n in names:
        i = seen.get(n, 0)
        seen[n] = i + 1
        short = n.split("(")[0][:40]
        per_layer = counts[n] // num_layers if counts[n] >= num_layers else 0
        labels.append(f"{short}[{i % per_layer}]" if per_layer and i < per_layer * num_layers else f"{short}#{i}")
    return labels


def critical_path(chunks: list[list[tuple[float, float, str]]], num_layers: int) -> dict[str, Any]:
    """Per label: summed end-to-end gaps (the critical-path time charged to it), its kernels' own summed durations
    and how early they start (negative: before the previous kernel ended), medians over the steps."""
    labels = slot_labels([k[2] for k in chunks[0]], num_layers)
    per_step: list[dict[str, list[float]]] = []
    spans = []
    for c in chunks:
        acc: dict[str, list[float]] = {}
        for i, (s, e, _) in enumerate(c):
            gap = e - (c[i - 1][1] if i else s)
            lead = s - c[i - 1][1] if i else 0.0
            a = acc.setdefault(labels[i], [0.0, 0.0, 0.0, 0])
            a[0] += gap
            a[1] += e - s
            a[2] += lead
            a[3] += 1
        per_step.append(acc)
        spans.append(c[-1][1] - c[0][0])
    rows = []
    for lab in dict.fromkeys(labels):
        rows.append({"slot": lab, "launches": per_step[0][lab][3],
                     "critical_us": float(np.median([p[lab][0] for p in per_step])),
                     "kernel_us": float(np.median([p[lab][1] for p in per_step])),
                     "start_lead_us": float(np.median([p[lab][2] for p in per_step]))})
    rows.sort(key=lambda r: -r["critical_us"])
    return {"step_span_us": float(np.median(spans)), "launches": len(chunks[0]), "slots": rows}


def profile_steps(eng, steps: int, rng: np.random.Generator) -> list[tuple[float, float, str]]:
    ids = B.inject_decoding(eng, 1, 512, rng)
    for _ in range(5):
        eng.step()
    B.sync(eng.device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        B.sync(eng.device)
    for rid in ids:
        eng.abort(rid)
    eng.step()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        return kernel_events(path)


def gemv_slot_rates(cp: dict[str, Any], eng, copy_tbs: float) -> dict[str, Any]:
    """Bytes per GEMV slot and the rate its critical-path share implies."""
    cfg = eng.model_config
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    es = eng.dtype.itemsize
    sizes = {"_gemv_kernel[0]": (q + 2 * kv) * h, "_gemv_kernel[1]": q * h, "_gemv_kernel[2]": 2 * inter * h,
             "_gemv_kernel[3]": h * inter}
    out = {}
    for r in cp["slots"]:
        if r["slot"] in sizes:
            nbytes = sizes[r["slot"]] * es * cfg.num_layers
            out[r["slot"]] = {"bytes": nbytes, "critical_us": r["critical_us"],
                              "tb_per_s": nbytes / (r["critical_us"] * 1e-6) / 1e12,
                              "over_copy": nbytes / (r["critical_us"] * 1e-6) / 1e12 / copy_tbs}
    return out


def read_rates(device: torch.device, reps: int) -> list[dict[str, Any]]:
    """M = 1 GEMV configurations and cuBLAS on a 2 GiB weight (L2-cold by size), TB/s of weight bytes read."""
    n, k = 65536, 16384
    w = torch.empty(n, k, dtype=torch.float16, device=device).normal_()
    x = torch.randn(1, k, dtype=torch.float16, device=device)
    rows = []
    for cfg in READ_CONFIGS:
        t = B.median(B.time_each(lambda c=cfg: G.gemv(x, w, config=c), reps, 3, device))
        rows.append({"config": str(cfg), "median_s": t, "tb_per_s": w.numel() * 2 / t / 1e12})
    t = B.median(B.time_each(lambda: torch.nn.functional.linear(x, w), reps, 3, device))
    rows.append({"config": "cuBLAS F.linear", "median_s": t, "tb_per_s": w.numel() * 2 / t / 1e12})
    t = B.median(B.time_each(lambda: w.sum(dtype=torch.float32), reps, 3, device))
    rows.append({"config": "torch sum", "median_s": t, "tb_per_s": w.numel() * 2 / t / 1e12})
    w = x = None  # free the 2 GiB before the engines load
    torch.cuda.empty_cache()
    return rows


def gemv_chain(eng, device: torch.device, reps: int) -> dict[str, Any]:
    """The step's GEMVs alone, in step order, in one CUDA graph (accumulated sums as in the step; the buffers are
    zeroed after timing)."""
    m = eng.model
    cfg = m.cfg
    h = torch.randn(1, cfg.hidden_size, dtype=m.dtype, device=device) * 0.01
    a = torch.randn(1, cfg.q_size, dtype=m.dtype, device=device) * 0.01
    act = torch.randn(1, cfg.intermediate_size, dtype=m.dtype, device=device) * 0.01

    def chain() -> None:
        with G.enabled():
            for i in range(cfg.num_layers):
                t = m.arena.layers[i].tensors
                G.matmul(h, t["qkv"], accumulate=True)
                G.matmul(a, t["o"], accumulate=True)
                G.matmul(h, t["gate_up"], accumulate=True)
                G.matmul(act, t["down"], accumulate=True)
            G.matmul(h, m.lm_head, accumulate=True)

    chain()
    torch.cuda.synchronize(device)
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        chain()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain()
    t = B.median(B.time_each(g.replay, reps, 3, device))
    split_accum.reset()
    del g
    return {"median_s": t, "weight_bytes": B.weight_read_bytes(eng, 1)}


# setting -> (attention.FUSE_ROPE_DECODE, the Triton set's own greedy argmax and token feed); the first run
# (critical_path_h200.json, before the token kernels existed) had "fused" = rope-only and "unfused" = before
SETTINGS = {"shipped": (True, True), "rope-only": (True, False), "tokens-only": (False, True),
            "before": (False, False)}


def apply(name: str) -> None:
    fuse, tokens = SETTINGS[name]
    attention.FUSE_ROPE_DECODE = fuse
    token_probe.apply("tokens" if tokens else "before")  # the feed without PDL, as shipped


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--settings", default="shipped,before,rope-only,tokens-only",
                    help="RoPE + KV store fused into the decode launch or not (attention.FUSE_ROPE_DECODE), and "
                         "the Triton greedy argmax and token feed or torch's (KernelSet's defaults): "
                         f"{sorted(SETTINGS)}, alternated --rounds times (batch-1 step time), then each profiled")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("probe_critical_path needs a CUDA GPU")
    settings = a.settings.split(",")
    if any(n not in SETTINGS for n in settings):
        sys.exit(f"--settings: choose from {sorted(SETTINGS)}, got {settings}")
    dev = torch.device("cuda")
    res = B.probe_start(a, dev)
    copy_tbs = res["copy"]["tb_per_s"]
    res["read_rates"] = read_rates(dev, a.reps)
    for r in res["read_rates"]:
        print("read", r["config"], round(r["tb_per_s"], 3), flush=True)
    a.out.write_text(json.dumps(res, indent=1, default=str))
    try:
        for model in a.models.split(","):
            eng = B.probe_engine(model, dev)
            rng = np.random.default_rng(0)
            m = res[model] = {"b1": [], "critical_path": {}}
            for name in settings * a.rounds:
                apply(name)
                row = B.b1_step(eng, a.reps, copy_tbs * 1e12, rng)
                m["b1"].append({"setting": name, "row": row})
                print(model, name, "gpu", round(row["step_gpu_s"] * 1e3, 3), round(row["gpu_over_floor"], 3), "wall",
                      round(row["step_wall_s"] * 1e3, 3), round(row["wall_over_floor"], 3), flush=True)
                a.out.write_text(json.dumps(res, indent=1, default=str))
            for name in settings:
                apply(name)
                eng.runner.graphs.clear()
                cp = critical_path(split_steps(profile_steps(eng, a.steps, rng), a.steps),
                                   eng.model_config.num_layers)
                cp["gemv_slots"] = gemv_slot_rates(cp, eng, copy_tbs)
                m["critical_path"][name] = cp
                print(model, name, "span", round(cp["step_span_us"], 1), "launches", cp["launches"], flush=True)
                for r in cp["slots"][:16]:
                    print(f"  {r['slot']:34s} n={r['launches']:3d} crit={r['critical_us']:8.1f} "
                          f"kern={r['kernel_us']:8.1f} lead={r['start_lead_us']:8.1f}", flush=True)
                for k, v in cp["gemv_slots"].items():
                    print(f"  {k} {v['tb_per_s']:.3f} TB/s ({v['over_copy']:.3f} of copy)", flush=True)
                a.out.write_text(json.dumps(res, indent=1, default=str))
            chain = m["gemv_chain"] = gemv_chain(eng, dev, a.reps)
            chain["over_floor"] = chain["median_s"] / m["b1"][0]["row"]["floor_s"]
            print(model, "gemv chain", round(chain["median_s"] * 1e3, 3), "over floor", round(chain["over_floor"], 3),
                  flush=True)
            a.out.write_text(json.dumps(res, indent=1, default=str))
            del eng
            torch.cuda.empty_cache()
    finally:
        apply("shipped")
    return res


if __name__ == "__main__":
    main()
