#!/usr/bin/env python3
"""Benchmark of the CUDA fast path (Triton kernels + CUDA-graph decode), against the roofline and against Hugging
Face transformers' continuous batching, on one GPU and in one run.

Everything is measured in the same process, so every ratio compares numbers from the same device state:

1. **Ceilings.**  Device-to-device copy bandwidth (a >= 1 GiB ``copy_``, bytes read + written over time) and the
   float16 matrix-multiply rate (an 8192^3 ``torch.mm`` on random data).  Medians of timed repetitions (CUDA
   events).
2. **GEMV sweep** (``--tune-gemv``).  cuBLAS (``F.linear``) against the Triton GEMV candidates on every projection
   shape of the benchmarked models, for M = 1..64 (``triton.testing.do_bench``, L2 flushed between repetitions).
3. Per model (synthetic float16 weights with the published shapes; tokenizers from the data mirror):

   * **decode step** at batch 1, 8, 32, 64, 128, 256 and context ``--decode-context`` (lowered where the KV pool
     cannot hold the batch): sequences are injected as already prefilled (random K/V filled into the pool, never
     zeros), then ``LLMEngine.step()`` is timed (wall, until the sampled tokens are on the host) together with the
     GPU time of the forward (CUDA events).  The **HBM floor** is the bytes a step must move (every weight once,
     the LM head included; each sequence's K/V read once; the new K/V written) over the measured copy bandwidth.
   * **prefill** of one sequence of 512..4096 tokens in one step: achieved FLOP/s (projections, LM head for the
     sampled row, causal attention) against the measured matmul rate.
   * **offline throughput**: 64 requests of 512 random prompt tokens + 256 output tokens (``ignore_eos``), through
     the engine's scheduler; with per-step host overhead (step wall time minus the forward's GPU time).  With
     ``--offline-sampled``, the same workload again with temperature / top-p sampling (:data:`SAMPLED`).
   * **HF transformers** (``--hf``): ``LlamaForCausalLM`` of the same shapes, random float16 weights built on the
     GPU, ``generate_batch`` (continuous batching, paged SDPA) on the same 64 requests, EOS disabled.

By default each model's engine measurements and each HF baseline run in a process of their own, one after
another, merged into one file (``run_isolated``; ``--no-isolate`` keeps everything in one process).

Writes a JSON file with provenance and a Markdown section (``--out``, ``--md``).  ``--smoke`` runs every code path
on a tiny shrunken model (CPU or GPU) to check the script itself; its numbers mean nothing.

    python3 benchmarks/bench_fastpath.py --hf llama2-7b --out fastpath.json --md BENCH_fastpath.md
    python3 benchmarks/bench_fastpath.py --tune-gemv --no-isolate --hf '' --out gemv.json   # GEMV tuning table
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from morphserve.engine.config import EngineConfig  # noqa: E402
from morphserve.engine.engine import LLMEngine  # noqa: E402
from morphserve.engine.model_runner import StepTiming  # noqa: E402
from morphserve.engine.request import Request, RequestStatus  # noqa: E402
from morphserve.engine.sampling_params import SamplingParams  # noqa: E402
from morphserve.model.config import ModelConfig, architecture  # noqa: E402
from morphserve.model.weight_source import SyntheticSource  # noqa: E402
from morphserve.provenance import provenance  # noqa: E402

TARGETS = {
    "decode_b1_over_floor_max": 1.15,  # Llama-2-7B fp16 decode step at batch 1 within 1.15x of the HBM floor
    "offline_speedup_vs_hf_min": 10.0,  # 64 x (512 + 256) output tokens/s at least 10x HF's
    "prefill_4096_fraction_of_peak_min": 0.60,  # prefill at 4096 tokens at >= 60% of the measured matmul rate
}


# --async-steps: EngineConfig.async_steps (None: the engine's default)
ASYNC_STEPS = {"on": True, "off": False, "default": None}
# --offline-sampled: the offline workload again with these sampling parameters (each request seeded by its id)
SAMPLED = {"temperature": 0.8, "top_p": 0.95}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def ms(x: float | None, digits: int = 2) -> str:
    """Seconds as milliseconds for the tables ('-' where not measured, e.g. GPU times on CPU)."""
    return "-" if x is None or x != x else f"{x * 1e3:.{digits}f}"


def ratio(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_each(fn: Callable[[], Any], reps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``reps`` calls (CUDA events on GPU, the host clock after a sync on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


# ---- ceilings ---------------------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> dict[str, float]:
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    t = median(time_each(lambda: dst.copy_(src), reps, 3, device))
    del src, dst
    return {"bytes_copied": nbytes, "median_s": t, "tb_per_s": 2 * nbytes / t / 1e12}


def matmul_peak(device: torch.device, n: int, reps: int) -> dict[str, float]:
    a = torch.randn(n, n, dtype=torch.float16, device=device)
    b = torch.randn(n, n, dtype=torch.float16, device=device)
    t = median(time_each(lambda: torch.mm(a, b), reps, 3, device))
    del a, b
    return {"n": n, "median_s": t, "tflop_per_s": 2 * n ** 3 / t / 1e12}


# ---- GEMV sweep -------------------------------------------------------------------------------------------------
def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, h), "o": (h, cfg.q_size), "gate_up": (2 * i, h),
            "down": (h, i), "lm_head": (cfg.vocab_size, h)}


def tune_gemv(device: torch.device, cfgs: list[ModelConfig], rep_ms: int) -> dict[str, Any]:
    """Time cuBLAS and every candidate on each projection shape at each tuned M; install the winners as this
    device's tuning table (a shape and M where cuBLAS wins keeps cuBLAS)."""
    import triton.testing

    from morphserve.kernels import gemv as G

    def bench(fn: Callable[[], Any]) -> float:
        return float(triton.testing.do_bench(fn, warmup=2, rep=rep_ms, return_mode="median")) / 1e3

    dev_name = torch.cuda.get_device_name(device)
    rows = []
    shapes = {f"{c.name}:{k}": v for c in cfgs for k, v in projection_shapes(c).items()}
    for label, (n, k) in tqdm(shapes.items(), desc="gemv sweep", unit="shape"):
        w = torch.randn(n, k, dtype=torch.float16, device=device)
        for m in G.TUNED_MS:
            x = torch.randn(m, k, dtype=torch.float16, device=device)
            nbytes = 2 * (n * k + m * k + m * n)
            t_cublas = bench(lambda: F.linear(x, w))
            t_rule = bench(lambda: G.gemv(x, w, G.gemv_config(m, n, k)))
            times = {c: bench(lambda c=c: G.gemv(x, w, c)) for c in G.CANDIDATES[m]}
            best = min(times, key=times.get)
            chosen = best if times[best] < t_cublas else None
            G.set_tuned(dev_name, n, k, m, chosen)
            rows.append({"shape": label, "n": n, "k": k, "m": m, "cublas_s": t_cublas, "triton_rule_s": t_rule,
                         "rule_config": str(G.gemv_config(m, n, k)), "best_config": str(best),
                         "triton_best_s": times[best], "chosen": str(chosen) if chosen else "cuBLAS",
                         "candidates_s": {str(c): t for c, t in times.items()},
                         "cublas_tb_per_s": nbytes / t_cublas / 1e12, "triton_rule_tb_per_s": nbytes / t_rule / 1e12,
                         "triton_best_tb_per_s": nbytes / times[best] / 1e12})
        del w
    return {"device": dev_name, "rows": rows, "table": {dev_name: G.tuning_rows(dev_name)},
            "triton_wins": {m: sum(r["chosen"] != "cuBLAS" for r in rows if r["m"] == m) for m in G.TUNED_MS},
            "shapes": len(shapes)}


# ---- engine helpers ---------------------------------------------------------------------------------------------
def build_engine(name: str, cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> LLMEngine:
    ec = EngineConfig(model=name, device=str(device), dtype="float16", max_num_seqs=256,
                      max_num_batched_tokens=max(args.prefill), max_model_len=min(cfg.max_position_embeddings,
                                                                                  args.max_model_len),
                      kv_cache_bytes=args.kv_cache_bytes, seed=0, async_steps=ASYNC_STEPS[args.async_steps])
    return LLMEngine(ec, source=SyntheticSource(name, seed=0, config=cfg))


def probe_start(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The header of a probe's result (date, command, device, provenance) and the copy bandwidth measured now."""
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                           "device": torch.cuda.get_device_name(device),
                           "provenance": provenance(config={k: str(v) for k, v in vars(args).items()}, device=device)}
    res["copy"] = copy_bandwidth(device, 2 << 30, 10)
    return res


def probe_engine(name: str, device: torch.device) -> LLMEngine:
    """A probe's engine: synthetic weights, an 8 GiB KV pool filled with random values, graphs, asynchronous
    steps, prompts of up to 512 tokens per step."""
    args = argparse.Namespace(prefill=[512], max_model_len=4096, kv_cache_bytes=8 << 30, async_steps="on")
    eng = build_engine(name, architecture(name), args, device)
    for seg in eng.pool.segments.values():
        seg.tensor.normal_()
    return eng


def b1_step(engine: LLMEngine, reps: int, bw: float, rng: np.random.Generator) -> dict[str, Any]:
    """One batch-1 decode sweep (context 512) after dropping the captured graphs, so a probe's new setting (a
    kernel, a configuration, a switch) is what the step replays."""
    engine.runner.graphs.clear()
    return decode_sweep(engine, [1], 512, reps, 3, bw, rng)[0]


def alternate_b1(res: dict[str, Any], models: list[str], settings: dict[str, Callable[[], None]], rounds: int,
                 reps: int, out: Path, device: torch.device, key: str = "variant") -> None:
    """An A/B probe's loop: per model one :func:`probe_engine`; each of ``settings`` applied in turn, ``rounds``
    times, the graphs recaptured after each and one batch-1 sweep timed (context 512).  Rows go to ``res[model]``
    as ``{key: name, "row": ...}``; ``res`` (with :func:`probe_start`'s copy rate) is rewritten to ``out`` after
    each."""
    bw = res["copy"]["tb_per_s"] * 1e12
    for model in models:
        eng = probe_engine(model, device)
        rng = np.random.default_rng(0)
        for name in list(settings) * rounds:
            settings[name]()
            row = b1_step(eng, reps, bw, rng)
            res.setdefault(model, []).append({key: name, "row": row})
            print(model, name, round(row["step_gpu_s"] * 1e3, 3), round(row["gpu_over_floor"], 3), flush=True)
            out.write_text(json.dumps(res, indent=1, default=str))
        del eng
        torch.cuda.empty_cache()


def weight_read_bytes(engine: LLMEngine, batch: int) -> int:
    """Bytes of weights a decode step reads: every layer tensor, the final norm, the LM head, B embedding rows."""
    m = engine.model
    layer = sum(s.nbytes for lay in [m.arena.layout(i) for i in range(m.cfg.num_layers)] for s in lay.specs)
    es = m.dtype.itemsize
    return layer + m.final_norm.numel() * es + m.lm_head.numel() * es + batch * m.cfg.hidden_size * es


def kv_token_bytes(engine: LLMEngine) -> int:
    c = engine.model_config
    return c.num_layers * 2 * c.num_kv_heads * c.head_dim * engine.dtype.itemsize


def inject_decoding(engine: LLMEngine, batch: int, context: int, rng: np.random.Generator) -> list[str]:
    """``batch`` requests that look already prefilled to ``context`` tokens (their blocks hold the pool's random
    K/V), each with one sampled token pending: the next ``step()`` decodes all of them."""
    bs = engine.config.block_size
    params = SamplingParams(max_tokens=engine.max_model_len, temperature=0.0, ignore_eos=True)
    ids = []
    for i in range(batch):
        toks = rng.integers(3, engine.model_config.vocab_size, context + 1).tolist()
        req = Request(f"decode-{batch}-{i}", toks[:context], params, time.monotonic())
        req.token_ids.append(toks[context])
        req.num_computed_tokens = context
        req.block_table = engine.block_manager.allocate(-(-context // bs))
        req.status = RequestStatus.RUNNING
        engine.requests[req.request_id] = req
        engine.scheduler.running.append(req)
        ids.append(req.request_id)
    return ids


def decode_sweep(engine: LLMEngine, batches: list[int], context: int, reps: int, warmup: int, bw: float,
                 rng: np.random.Generator) -> list[dict[str, Any]]:
    dev = engine.device
    bs = engine.config.block_size
    rows = []
    for b in tqdm(batches, desc=f"{engine.model_config.name} decode", unit="batch"):
        steps = warmup + reps
        per_seq_blocks = engine.block_manager.num_free_blocks // b
        ctx = min(context, engine.max_model_len - steps - 2, (per_seq_blocks * bs - steps - bs) // bs * bs)
        if ctx < bs:
            rows.append({"batch": b, "skipped": f"pool of {engine.block_manager.num_total_blocks} blocks too small"})
            continue
        ids = inject_decoding(engine, b, ctx, rng)
        engine.runner.timing = timing = StepTiming()
        walls = []
        for _ in range(steps):
            if not engine.async_steps:  # (asynchronous steps: a step's wall is the period between steps)
                sync(dev)
            t = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t)
            if engine.step_stats[-1].num_seqs != b or engine.step_stats[-1].num_tokens != b:
                raise RuntimeError(f"decode step at batch {b} ran {engine.step_stats[-1].num_seqs} sequences")
        for rid in ids:
            engine.abort(rid)
        engine.step()  # reads back a step still in flight (asynchronous steps); nothing is left to schedule
        engine.runner.timing = None
        walls, gpu = walls[warmup:], timing.device_forward[warmup:steps]
        mid_ctx = ctx + warmup + reps // 2  # context length halfway through the timed steps
        floor_bytes = weight_read_bytes(engine, b) + b * (mid_ctx + 2) * kv_token_bytes(engine)
        floor = floor_bytes / bw
        wall, g = median(walls), median(gpu) if gpu else float("nan")
        rows.append({"batch": b, "context": mid_ctx, "graph": all(timing.graph[warmup:]) if timing.graph else None,
                     "step_wall_s": wall, "step_gpu_s": g, "floor_bytes": floor_bytes, "floor_s": floor,
                     "wall_over_floor": wall / floor, "gpu_over_floor": g / floor,
                     "host_overhead_s": median([w - d for w, d in zip(walls, gpu)]) if gpu else None,
                     "tokens_per_s": b / wall})
    return rows


def linear_flops_per_token(cfg: ModelConfig) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * i
    return 2.0 * cfg.num_layers * per_layer


def prefill_sweep(engine: LLMEngine, sizes: list[int], reps: int, peak: float,
                  rng: np.random.Generator) -> list[dict[str, Any]]:
    """One sequence of ``n`` tokens through one eager forward (the prefill kernels, the LM head on its last row)
    and the argmax of its logits: a whole prompt as one step.  Run on the model directly because a prompt of the
    full context window (4096 tokens for Llama-2) cannot be submitted as a request (no room left for output)."""
    from morphserve.engine.model_runner import HostBatch
    from morphserve.kernels.attention import attention_flops

    cfg, dev, bs = engine.model_config, engine.device, engine.config.block_size
    runner = engine.runner
    rows = []
    for n in tqdm(sizes, desc=f"{cfg.name} prefill", unit="size"):
        blocks = engine.block_manager.allocate(-(-n // bs))
        pos = np.arange(n, dtype=np.int64)
        table = np.asarray(blocks, dtype=np.int64)
        times = []
        for _ in range(reps + 1):
            hb = HostBatch(rng.integers(3, cfg.vocab_size, n).astype(np.int64), pos, table[pos // bs] * bs + pos % bs,
                           np.array([0, n], dtype=np.int64), np.array([n], dtype=np.int64), table[None, :],
                           np.array([n - 1], dtype=np.int64), [blocks])
            sync(dev)
            t = time.perf_counter()
            int(runner.forward(hb).argmax())
            times.append(time.perf_counter() - t)
        engine.block_manager.free_blocks(blocks)
        t = median(times[1:])
        flops = n * linear_flops_per_token(cfg) + 2.0 * cfg.hidden_size * cfg.vocab_size \
            + cfg.num_layers * attention_flops([n], [n], cfg.num_heads, cfg.head_dim)
        rows.append({"tokens": n, "step_s": t, "tokens_per_s": n / t, "flops": flops, "tflop_per_s": flops / t / 1e12,
                     "fraction_of_matmul_peak": flops / t / 1e12 / peak})
    return rows


def profile_decode(engine: LLMEngine, batch: int, context: int, rng: np.random.Generator) -> dict[str, Any]:
    """GPU time of each kernel in one decode step (torch.profiler over graph replays), grouped by name."""
    ids = inject_decoding(engine, batch, context, rng)
    for _ in range(3):
        engine.step()
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync(engine.device)
    for rid in ids:
        engine.abort(rid)
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, []).append(ev.device_time_total if hasattr(ev, "device_time_total")
                                                   else ev.cuda_time_total)
    rows = sorted(({"kernel": k[:90], "calls_per_step": len(v) / steps, "us_per_step": sum(v) / steps}
                   for k, v in kernels.items()), key=lambda r: -r["us_per_step"])
    return {"batch": batch, "context": context, "kernel_us_per_step": sum(r["us_per_step"] for r in rows),
            "launches_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:25]}


def offline(engine: LLMEngine, prompts: list[list[int]], output_len: int,
            sampled: bool = False) -> dict[str, Any]:
    """The workload through the engine's scheduler (greedy, or with ``sampled`` :data:`SAMPLED` parameters), after
    a short warm-up with the same prompts (8 requests, 16 output tokens), so that one-time costs (Triton compiles
    for new argument specialisations of mixed prefill and decode steps, graph captures) stay out of the
    measurement; the warm heap is then frozen as a server's is (:meth:`LLMEngine.warmed_up`, released when the
    engine is closed)."""
    dev = engine.device
    warm = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for p in prompts[:8]:
        engine.add_request(p, warm)
    engine.run_until_done()
    # The engine's own warm-up-then-freeze (morphserve.engine.heap_freeze): a full collection otherwise walks the
    # whole heap (measured: a 314 ms generation-2 collection inside one step on an H200, 2026-12-02).
    engine.warmed_up()
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, **(SAMPLED if sampled else {"temperature": 0.0}))
    engine.runner.timing = timing = StepTiming()
    walls, seqs, tokens, timed = [], [], [], []
    # What a slow step spent its time on: Triton kernels compiled (or loaded from the disk cache) during the run,
    # and Python garbage collections, each with the index of the step it happened in.
    events: list[dict[str, Any]] = []

    def on_compile(**kw: Any) -> None:
        events.append({"step": len(walls), "compiled": str(kw.get("repr"))[:4000]})

    gc_start: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_start[:] = [time.perf_counter()]
        elif gc_start:
            ms_ = (time.perf_counter() - gc_start[0]) * 1e3
            if ms_ >= 1.0 or info.get("generation") == 2:  # the many sub-millisecond young collections: left out
                events.append({"step": len(walls), "gc_generation": info.get("generation"), "gc_ms": round(ms_, 3)})

    from triton import knobs

    hook_before = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = on_compile
    gc.callbacks.append(on_gc)
    sync(dev)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    outs = {}
    try:
        _offline_loop(engine, ids, outs, timing, walls, seqs, tokens, timed)
    finally:
        knobs.runtime.jit_post_compile_hook = hook_before
        gc.callbacks.remove(on_gc)
    total = time.perf_counter() - t0
    return _offline_result(engine, prompts, ids, outs, timing, walls, seqs, tokens, timed, total, events)


def _offline_loop(engine: LLMEngine, ids: list[str], outs: dict, timing: StepTiming, walls: list, seqs: list,
                  tokens: list, timed: list) -> None:
    with tqdm(total=len(ids), desc=f"{engine.model_config.name} offline", unit="req") as bar:
        while engine.has_unfinished():
            runs = len(timing.wall)
            t = time.perf_counter()
            for o in engine.step():
                outs[o.request_id] = o
                bar.update(1)
            walls.append(time.perf_counter() - t)
            seqs.append(engine.step_stats[-1].num_seqs)
            tokens.append(engine.step_stats[-1].num_tokens)
            timed.append(runs if len(timing.wall) == runs + 1 else None)  # index into timing, if the step ran


def _offline_result(engine: LLMEngine, prompts: list[list[int]], ids: list[str], outs: dict, timing: StepTiming,
                    walls: list, seqs: list, tokens: list, timed: list, total: float,
                    events: list[dict[str, Any]]) -> dict[str, Any]:
    engine.runner.timing = None
    n_out = sum(len(outs[i].output_token_ids) for i in ids)
    # steps (indices into walls) that replayed a decode graph, and their index into the runner's timing lists
    graph_steps = [(i, j) for i, j in enumerate(timed) if j is not None and timing.graph[j]]
    host = [walls[i] - timing.device_forward[j] for i, j in graph_steps]
    return {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "output_tokens": n_out,
            "wall_s": total, "output_tokens_per_s": n_out / total,
            "total_tokens_per_s": (n_out + sum(map(len, prompts))) / total, "steps": len(walls),
            "graph_decode_steps": len(graph_steps),
            "decode_step_wall_median_s": median([walls[i] for i, _ in graph_steps]) if graph_steps else None,
            "decode_step_gpu_median_s": median([timing.device_forward[j] for _, j in graph_steps]) if graph_steps
            else None,
            "decode_host_overhead_median_s": median(host) if host else None,
            "decode_host_prepare_median_s": median([timing.host_prepare[j] for _, j in graph_steps]) if graph_steps
            else None,
            "decode_host_launch_median_s": median([timing.host_launch[j] for _, j in graph_steps]) if graph_steps
            else None,
            "decode_batch_median": median([seqs[i] for i, _ in graph_steps]) if graph_steps else None,
            # every step, in order: where the wall time outside the graph-decode steps goes
            "steps_detail": {"wall_ms": [round(w * 1e3, 3) for w in walls], "seqs": seqs, "tokens": tokens,
                             "graph": [j is not None and bool(timing.graph[j]) for j in timed]},
            "compiles_and_gc_during_run": events}


def hf_offline(cfg: ModelConfig, prompts: list[list[int]], output_len: int, device: torch.device,
               memory_fraction: float = 0.5) -> dict[str, Any]:
    """HF transformers' continuous batching on the same requests.  ``memory_fraction`` caps the share of free
    device memory its paged cache takes (``ContinuousBatchingConfig.max_memory_percent``): with its default (0.9)
    it ran out of memory for activations on an H200 (2026-11-22) and dropped half the requests."""
    import transformers
    from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaForCausalLM

    hf_cfg = cfg.to_hf()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf_cfg, dtype=torch.float16, attn_implementation="sdpa")
    model.eval()
    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0,
                           bos_token_id=cfg.bos_token_id)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=True,
                                    continuous_batching_config=ContinuousBatchingConfig(
                                        max_memory_percent=memory_fraction))
    sync(device)
    wall = time.perf_counter() - t0
    n_out = sum(len(o.generated_tokens) for o in outs.values())
    errors = [o.error for o in outs.values() if o.error]
    first = min(o.created_time for o in outs.values())
    last = max(o.lifespan[1] for o in outs.values())
    del model, outs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"transformers": transformers.__version__, "attn_implementation": "paged|sdpa",
            "max_memory_percent": memory_fraction,
            "requests": len(prompts), "output_tokens": n_out, "errors": errors[:3],
            "wall_s": wall, "output_tokens_per_s": n_out / wall,
            "request_window_s": last - first, "output_tokens_per_s_request_window": n_out / (last - first)}


# ---- report -----------------------------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    p, c = res["provenance"], res["ceilings"]
    lines = ["## Fast path: Triton kernels and CUDA-graph decode", "",
             f"Measured {res['date']} on **{p['device']}** (torch {p['torch']}, transformers {p['transformers']}, "
             f"triton {res['triton']}), commit `{p['git_commit']}`, synthetic float16 weights with the published "
             f"shapes.  Command: `{res['command']}`.  All numbers are medians from this one run.", "",
             f"Ceilings measured in the same run: device-to-device copy **{c['copy']['tb_per_s']:.2f} TB/s** "
             f"(read + write, {c['copy']['bytes_copied'] / 2**30:.0f} GiB), float16 `torch.mm` {c['matmul']['n']}^3 "
             f"**{c['matmul']['tflop_per_s']:.0f} TFLOP/s**.", ""]
    for name, m in res["models"].items():
        lines += [f"### {name}", "", "Decode step (HBM floor = weights + K/V read + K/V written, over the copy "
                  "bandwidth):", "",
                  "| batch | context | step wall (ms) | step GPU (ms) | floor (ms) | wall / floor | GPU / floor | "
                  "host overhead (ms) | tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in m["decode"]:
            if "skipped" in r:
                lines.append(f"| {r['batch']} | skipped: {r['skipped']} | | | | | | | |")
                continue
            lines.append(f"| {r['batch']} | {r['context']} | {ms(r['step_wall_s'])} | {ms(r['step_gpu_s'])} | "
                         f"{ms(r['floor_s'])} | {ratio(r['wall_over_floor'])} | {ratio(r['gpu_over_floor'])} | "
                         f"{ms(r['host_overhead_s'], 3)} | {r['tokens_per_s']:.0f} |")
        if "decode_without_pdl" in m:
            with_pdl = {r["batch"]: r for r in m["decode"] if "skipped" not in r}
            lines += ["", "Programmatic dependent launch (PDL) on and off (graphs recaptured):", "",
                      "| batch | step GPU with PDL (ms) | without (ms) |", "|---|---|---|"]
            for r in m["decode_without_pdl"]:
                if "skipped" not in r and r["batch"] in with_pdl:
                    lines.append(f"| {r['batch']} | {ms(with_pdl[r['batch']]['step_gpu_s'])} | {ms(r['step_gpu_s'])} |")
        if isinstance(m.get("profile"), list):
            for pr in m["profile"]:
                lines += ["", f"Kernels of one decode step at batch {pr['batch']} (torch.profiler, graph replay): "
                          f"{pr['launches_per_step']:.0f} launches, {pr['kernel_us_per_step']:.0f} us of kernel time "
                          f"per step.", "", "| kernel | launches/step | us/step |", "|---|---|---|"]
                for r in pr["top"][:10]:
                    lines.append(f"| `{r['kernel']}` | {r['calls_per_step']:.0f} | {r['us_per_step']:.0f} |")
        lines += ["", "Prefill (one sequence, one step):", "", "| tokens | step (ms) | tokens/s | TFLOP/s | "
                  "fraction of matmul peak |", "|---|---|---|---|---|"]
        for r in m["prefill"]:
            lines.append(f"| {r['tokens']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
                         f"{r['tflop_per_s']:.0f} | {r['fraction_of_matmul_peak']:.2f} |")
        o = m["offline"]
        lines += ["", f"Offline, {o['requests']} requests x ({o['prompt_tokens'] // o['requests']} prompt + "
                  f"{o['output_tokens'] // o['requests']} output) tokens:", "",
                  "| system | wall (s) | output tokens/s |", "|---|---|---|",
                  f"| MorphServe (this engine) | {o['wall_s']:.2f} | {o['output_tokens_per_s']:.0f} |"]
        if "offline_sampled" in m:
            so = m["offline_sampled"]
            lines.append(f"| MorphServe, sampled (temperature {SAMPLED['temperature']}, top-p {SAMPLED['top_p']}) "
                         f"| {so['wall_s']:.2f} | {so['output_tokens_per_s']:.0f} |")
        if "hf" in m:
            h = m["hf"]
            lines.append(f"| HF transformers {h['transformers']} `generate_batch`, first request in to last "
                         f"out | {h['request_window_s']:.2f} | {h['output_tokens_per_s_request_window']:.0f} |")
            lines.append(f"| the same, whole `generate_batch` call (manager start and warm-up included) | "
                         f"{h['wall_s']:.2f} | {h['output_tokens_per_s']:.0f} |")
            lines.append("")
            lines.append(f"Speed-up: **{m['offline_speedup_vs_hf']:.1f}x** against HF's request window (the "
                         f"conservative comparison: this engine's time includes admission of every request; "
                         f"{m['offline_speedup_vs_hf_call']:.1f}x against HF's whole call).")
        if o.get("decode_host_overhead_median_s") is not None:
            lines += ["", f"Per-step host overhead in the offline run's graph decode steps (median batch "
                      f"{o['decode_batch_median']:.0f}): step wall {o['decode_step_wall_median_s'] * 1e3:.2f} ms, "
                      f"forward GPU {o['decode_step_gpu_median_s'] * 1e3:.2f} ms, host "
                      f"{o['decode_host_overhead_median_s'] * 1e3:.3f} ms (metadata preparation "
                      f"{o['decode_host_prepare_median_s'] * 1e3:.3f} ms, upload + replay launch "
                      f"{o['decode_host_launch_median_s'] * 1e3:.3f} ms)."]
        lines.append("")
    if "gemv" in res:
        g = res["gemv"]
        lines += ["### GEMV sweep (float16, L2 flushed between repetitions)", "",
                  f"Per shape and M, the fastest Triton candidate against cuBLAS; the winner goes into the tuning "
                  f"table (`morphserve/kernels/gemv_tuning.json`).  Triton chosen (shapes out of {g['shapes']}) "
                  f"per M: {g['triton_wins']}.", "",
                  "| shape | M | cuBLAS TB/s | Triton rule TB/s | Triton best TB/s | chosen |", "|---|---|---|---|---|---|"]
        for r in g["rows"]:
            lines.append(f"| {r['shape']} | {r['m']} | {r['cublas_tb_per_s']:.2f} | "
                         f"{r['triton_rule_tb_per_s']:.2f} | {r['triton_best_tb_per_s']:.2f} | `{r['chosen']}` |")
        lines.append("")
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def evaluate_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    m = res["models"].get("llama2-7b")
    if m:
        b1 = next((r for r in m["decode"] if r["batch"] == 1 and "skipped" not in r), None)
        if b1:
            out.append({"target": "Llama-2-7B decode step, batch 1, wall <= 1.15x HBM floor",
                        "measured": f"{b1['wall_over_floor']:.3f}x (GPU time {b1['gpu_over_floor']:.3f}x)",
                        "met": b1["wall_over_floor"] <= TARGETS["decode_b1_over_floor_max"]})
        if "offline_speedup_vs_hf" in m:
            out.append({"target": "64 x (512 + 256) output tokens/s >= 10x HF transformers",
                        "measured": f"{m['offline_speedup_vs_hf']:.1f}x",
                        "met": m["offline_speedup_vs_hf"] >= TARGETS["offline_speedup_vs_hf_min"]})
        p = next((r for r in m["prefill"] if r["tokens"] == 4096), None)
        if p:
            out.append({"target": "Llama-2-7B prefill at 4096 tokens >= 60% of matmul peak",
                        "measured": f"{p['fraction_of_matmul_peak']:.2f}",
                        "met": p["fraction_of_matmul_peak"] >= TARGETS["prefill_4096_fraction_of_peak_min"]})
    return out


def prompts_for(cfg: ModelConfig, args: argparse.Namespace) -> list[list[int]]:
    """The offline workload's random prompts: the same in every process (the HF baseline may run in its own)."""
    rng = np.random.default_rng(1)
    return [rng.integers(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.requests)]


def run_isolated(args: argparse.Namespace, models: list[str], hf_models: list[str]) -> int:
    """Every model's engine measurements, then every HF baseline, each in a process of its own, one after another
    on the same device; the results are merged into one file.  Why: on an H200 (2026-12-02) a finished engine's
    memory was not returned to the device before the next model was built (cause not found), and HF's
    continuous-batching manager kept its memory after it finished, so sharing a process skewed what came next."""
    import subprocess

    common = ["--batches", args.batches, "--decode-context", str(args.decode_context), "--prefill", args.prefill,
              "--requests", str(args.requests), "--prompt-len", str(args.prompt_len), "--output-len",
              str(args.output_len), "--max-model-len", str(args.max_model_len), "--reps", str(args.reps),
              "--hf-memory-fraction", str(args.hf_memory_fraction), "--device", args.device, "--no-isolate"]
    common += (["--kv-cache-bytes", str(args.kv_cache_bytes)] if args.kv_cache_bytes is not None else [])
    if args.tune_gemv:
        raise SystemExit("--tune-gemv tunes over all models in one process: add --no-isolate")
    common += ["--smoke"] if args.smoke else []
    common += ["--async-steps", args.async_steps] + (["--offline-sampled"] if args.offline_sampled else [])
    parts = [("engine", m) for m in models] + [("hf", m) for m in hf_models]
    res: dict[str, Any] | None = None
    failures = []
    for part, name in parts:
        out = args.out.with_name(f"{args.out.stem}.{part}.{name}.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--models", name, "--hf", "", "--part", part,
               "--out", str(out)] + common
        print(f"== {part} {name}: {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0 or not out.exists():
            failures.append(f"{part} {name}: exit status {rc}")
            continue
        child = json.loads(out.read_text())
        if part == "engine":
            if res is None:
                res = child
                res["command"] = "python3 " + " ".join(sys.argv)
            else:
                res["models"].update(child["models"])
        elif res is not None and name in res["models"]:
            m = res["models"][name]
            m["hf"] = child["models"][name]["hf"]
            ours = m["offline"]["output_tokens_per_s"]
            m["offline_speedup_vs_hf"] = ours / m["hf"]["output_tokens_per_s_request_window"]
            m["offline_speedup_vs_hf_call"] = ours / m["hf"]["output_tokens_per_s"]
        out.unlink()
    if res is None:
        print("no engine measurement finished: " + "; ".join(failures), file=sys.stderr)
        return 1
    res["isolated_processes"] = True
    res["failures"] = failures
    res["targets"] = evaluate_targets(res)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    if args.md:
        args.md.write_text(md)
    print(md)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b,llama3-8b")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--prefill", default="512,1024,2048,4096")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-cache-bytes", type=int, default=None, help="default: the free device memory minus 2 GiB")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--hf", default="llama2-7b", help="models to run HF transformers on ('' for none)")
    ap.add_argument("--hf-memory-fraction", type=float, default=0.5)
    ap.add_argument("--tune-gemv", action="store_true")
    ap.add_argument("--async-steps", choices=["on", "off", "default"], default="default",
                    help="asynchronous steps (EngineConfig.async_steps: each step is launched before the previous "
                         "step's tokens are read back; a step's wall is then the period between steps): on, off, or "
                         "the engine's default (on with CUDA graphs)")
    ap.add_argument("--offline-sampled", action="store_true",
                    help="run the offline workload a second time with sampling (temperature 0.8, top-p 0.95)")
    ap.add_argument("--smoke", action="store_true", help="tiny shrunken models: checks the script, not the speed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="measure every model and HF in this process (default: one process per part, see "
                         "run_isolated)")
    ap.add_argument("--part", choices=["all", "engine", "hf"], default="all", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.isolate:
        return run_isolated(args, [m for m in args.models.split(",") if m], [m for m in args.hf.split(",") if m])
    dev = torch.device(args.device)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.prefill = [int(x) for x in args.prefill.split(",")]
    models = [m for m in args.models.split(",") if m]
    hf_models = [m for m in args.hf.split(",") if m]
    if args.smoke:
        args.reps = 3
    import triton

    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": "python3 " + " ".join(sys.argv),
                           "triton": triton.__version__, "targets_definition": TARGETS, "models": {}}
    res["provenance"] = provenance(config=vars(args) | {"out": str(args.out), "md": str(args.md)}, device=dev,
                                   synthetic_weights=True)
    rng = np.random.default_rng(0)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage, so a run cut short keeps what it measured
        args.out.write_text(json.dumps(res, indent=1, default=str))

    copy_bytes = (64 << 20) if args.smoke else (2 << 30)
    res["ceilings"] = {"copy": copy_bandwidth(dev, copy_bytes, args.reps),
                       "matmul": matmul_peak(dev, 512 if args.smoke else 8192, args.reps)}
    bw = res["ceilings"]["copy"]["tb_per_s"] * 1e12
    peak = res["ceilings"]["matmul"]["tflop_per_s"]
    print(f"copy {bw / 1e12:.2f} TB/s, fp16 mm {peak:.0f} TFLOP/s", flush=True)
    save()

    def model_cfg(name: str) -> ModelConfig:
        cfg = architecture(name)
        if args.smoke:
            cfg = cfg.replace(vocab_size=4096, hidden_size=256, num_heads=2, head_dim=128,
                              num_kv_heads=2 if cfg.attention == "MHA" else 1, intermediate_size=512, num_layers=2)
        return cfg

    if args.part == "hf":  # one HF baseline on its own (run_isolated)
        for name in models:
            cfg = model_cfg(name)
            res["models"][name] = {"hf": hf_offline(cfg, prompts_for(cfg, args), args.output_len, dev,
                                                    args.hf_memory_fraction)}
            save()
        return 0
    if args.tune_gemv and dev.type == "cuda":
        res["gemv"] = tune_gemv(dev, [model_cfg(m) for m in models], 5 if args.smoke else 12)
        (args.out.parent / "gemv_tuning.json").write_text(json.dumps(res["gemv"]["table"], indent=1))
        print(f"gemv: Triton chosen over cuBLAS on {res['gemv']['triton_wins']} of {res['gemv']['shapes']} shapes "
              f"per M", flush=True)
        save()
    hf_jobs: list[tuple[str, ModelConfig, list[list[int]]]] = []
    for name in models:
        cfg = model_cfg(name)
        t = time.perf_counter()
        engine = build_engine(name, cfg, args, dev)
        build_s = time.perf_counter() - t
        for seg in engine.pool.segments.values():  # random K/V: decode reads real-looking data, never zeros
            seg.tensor.normal_()
        t = time.perf_counter()
        if engine.runner.graphs is not None:
            engine.runner.graphs.capture_all()
        capture_s = time.perf_counter() - t
        m: dict[str, Any] = {"config": {k: v for k, v in vars(cfg).items() if k != "rope_parameters"},
                             "kernels": engine.model.kernels.name, "cuda_graphs": engine.runner.graphs is not None,
                             "async_steps": engine.async_steps,
                             "kv_blocks": engine.block_manager.num_total_blocks, "engine_build_s": build_s,
                             "graph_capture_s": capture_s}
        res["models"][name] = m
        m["decode"] = decode_sweep(engine, args.batches, args.decode_context, args.reps, 3, bw, rng)
        save()
        if dev.type == "cuda" and engine.runner.graphs is not None:
            from morphserve.kernels.triton_support import set_pdl, use_pdl

            m["pdl"] = use_pdl(dev)
            try:
                m["profile"] = [profile_decode(engine, b, args.decode_context, rng) for b in (1, 64)]
            except Exception as exc:  # diagnostics only: never lose the run to the profiler
                m["profile"] = f"profiler failed: {exc!r}"
            if m["pdl"]:  # the same decode steps without programmatic dependent launch, graphs recaptured
                set_pdl(False)
                engine.runner.graphs.clear()
                try:
                    m["decode_without_pdl"] = decode_sweep(engine, [1, 64], args.decode_context, args.reps, 3, bw,
                                                           rng)
                finally:
                    set_pdl(None)
                    engine.runner.graphs.clear()
            save()
        m["prefill"] = prefill_sweep(engine, args.prefill, 3 if args.smoke else 5, peak, rng)
        save()
        prompts = prompts_for(cfg, args)
        if engine.runner.graphs is not None:  # the PDL comparison cleared them: a server captures every bucket at start
            engine.runner.graphs.capture_all()
        m["offline"] = offline(engine, prompts, args.output_len)
        save()
        if args.offline_sampled:
            m["offline_sampled"] = offline(engine, prompts, args.output_len, sampled=True)
            save()
        print(json.dumps({name: {"decode": [(r["batch"], round(r.get("wall_over_floor", 0), 3)) for r in m["decode"]],
                                 "prefill": [(r["tokens"], round(r["fraction_of_matmul_peak"], 3))
                                             for r in m["prefill"]],
                                 "offline_tok_s": round(m["offline"]["output_tokens_per_s"])}}), flush=True)
        engine.close()  # releases the heap freeze: the engine's frozen cycles (and its GPU memory) can be freed
        del engine
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        hf_jobs.append((name, cfg, prompts))
    # HF last: its continuous-batching manager did not give its memory back before the next engine was built
    for name, cfg, prompts in hf_jobs:
        if name not in hf_models:
            continue
        m = res["models"][name]
        m["hf"] = hf_offline(cfg, prompts, args.output_len, dev, args.hf_memory_fraction)
        ours = m["offline"]["output_tokens_per_s"]
        m["offline_speedup_vs_hf"] = ours / m["hf"]["output_tokens_per_s_request_window"]
        m["offline_speedup_vs_hf_call"] = ours / m["hf"]["output_tokens_per_s"]
        print(f"HF {m['hf']['output_tokens_per_s_request_window']:.0f} tok/s (request window), speed-up "
              f"{m['offline_speedup_vs_hf']:.1f}x", flush=True)
        save()
    res["targets"] = evaluate_targets(res)
    save()
    md = markdown(res)
    if args.md:
        args.md.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
