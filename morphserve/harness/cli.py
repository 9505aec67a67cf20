"""Command-line subcommands of the harness: ``workload`` (build a workload file), ``replay`` (replay it into the
engine and write the metrics) and ``score`` (task quality of a replay's outputs).

``add_parsers(subparsers)`` adds the three to the ``morphserve`` command's subparsers; each sets ``fn`` to its
handler, which returns the exit status.  Bad values raise ValueError (WorkloadError, ModelError are ValueErrors)
naming the value; the ``morphserve`` entry point turns them into exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from morphserve.harness.metrics import LAG_TOLERANCE_S, TPOT_SLO_S, TTFT_SLO_S


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def cmd_workload(a: argparse.Namespace) -> int:
    from morphserve.provenance import provenance
    from morphserve.workloads.builder import WorkloadSpec, build_workload, write_workload

    spec = WorkloadSpec(trace=a.trace, window_s=a.window_s, window_rule=a.window_rule,
                        window_offset_s=a.window_offset_s, downsample=a.downsample, downsample_mode=a.downsample_mode,
                        rate_scale=a.rate_scale, max_requests=a.max_requests, tasks=a.tasks, pool=a.pool,
                        lengths=a.lengths, prompt_tokens=a.prompt_tokens, output_tokens=a.output_tokens,
                        chat=a.chat, synthetic_rate_rps=a.synthetic_rate, seed=a.seed)
    w = build_workload(spec, a.model)
    prov = provenance({"model": a.model, "spec": spec.to_dict()}, seed=spec.seed,
                      synthetic_weights=w.summary["synthetic"]["weights"])
    path, spath = write_workload(w, a.output, prov)
    s = w.summary
    print(json.dumps({"workload": str(path), "summary": str(spath), **s["workload"],
                      "prompt_tokens_mean": s["lengths"]["prompt_tokens"]["mean"],
                      "max_tokens_mean": s["lengths"]["max_tokens"]["mean"], "synthetic": s["synthetic"]}, indent=1))
    if s["synthetic"]["trace"]:
        print(f"[morphserve] SYNTHETIC TRACE: {s['trace']['source']}", file=sys.stderr)
    return 0


def cmd_replay(a: argparse.Namespace) -> int:
    from morphserve.engine.config import EngineConfig
    from morphserve.engine.engine import LLMEngine
    from morphserve.harness.metrics import SLO
    from morphserve.harness.replay import run_replay
    from morphserve.workloads.builder import load_workload

    workload = load_workload(a.workload)
    model = a.model or workload.model
    if model is None:
        raise ValueError(f"{a.workload}: the summary names no model; pass --model")
    cfg = EngineConfig(model=model, device=a.device, dtype=a.dtype, num_kv_blocks=a.num_kv_blocks,
                       max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, seed=a.seed)
    engine = LLMEngine(cfg)
    if engine.synthetic_weights:
        print("[morphserve] SYNTHETIC WEIGHTS: latency numbers are real, outputs and quality scores are not",
              file=sys.stderr)
    try:
        out = run_replay(workload, a.out, engine, slo=SLO(a.ttft_slo, a.tpot_slo), lag_tolerance_s=a.lag_tolerance,
                         warmup_requests=a.warmup_requests, drain_timeout_s=a.drain_timeout,
                         score_quality=not a.no_quality)
    finally:
        engine.close()
    agg = out["aggregates"]
    lat = agg["latency_s"]
    brief: dict[str, Any] = {
        "files": out["files"],
        "requests": agg["requests"],
        "ttft_s": {k: lat["ttft"][k] for k in ("mean", "p50", "p95", "p99")},
        "tpot_s": {k: lat["tpot"][k] for k in ("mean", "p50", "p95", "p99")},
        "slo": agg["slo"],
        "throughput": agg["throughput"],
        "fell_behind": agg["driver"]["fell_behind"],
        "warnings": out["warnings"],
    }
    print(json.dumps(brief, indent=1))
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    from morphserve.eval.quality import score_results_file

    path, quality = score_results_file(a.results, a.output)
    print(json.dumps({"quality": str(path), "headline_scheme": quality["headline_scheme"],
                      "tasks": {t: {"scored": d["scored"], "errors": d["errors"], "headline_mean": d["headline_mean"]}
                                for t, d in quality["tasks"].items()}}, indent=1))
    return 0


def add_parsers(subparsers: Any) -> None:
    """Add ``workload``, ``replay`` and ``score`` to the ``morphserve`` command."""
    from morphserve.workloads.builder import LENGTH_MODES, TRACES

    w = subparsers.add_parser("workload", help="build a workload file: a trace paired with task inputs")
    w.add_argument("--model", default="smollm2-135m",
                   help="model whose tokenizer cuts the prompts and whose attention type fixes the paper's lengths")
    w.add_argument("--trace", choices=TRACES, default="azure-conv")
    w.add_argument("--window-s", type=_positive_float, default=72.0, help="trace window length (paper: 72 s)")
    w.add_argument("--window-rule", choices=("busiest", "start", "offset"), default="busiest")
    w.add_argument("--window-offset-s", type=float, default=None, help="window start, with --window-rule offset")
    w.add_argument("--downsample", type=float, default=None,
                   help="load reduction factor (default: the paper's, 4.75 for Azure, 1.75 for BurstGPT)")
    w.add_argument("--downsample-mode", choices=("thin", "stretch"), default="thin")
    w.add_argument("--rate-scale", type=_positive_float, default=1.0,
                   help="multiply the arrival rate (divide every arrival time) to fit the hardware")
    w.add_argument("--max-requests", type=int, default=None, help="keep only the first N requests of the window")
    w.add_argument("--tasks", type=_tasks, default=("qmsum",),
                   help="comma-separated tasks (gov_report, qmsum, dureader, multi_news)")
    w.add_argument("--pool", choices=("eval", "calibration"), default="eval")
    w.add_argument("--lengths", choices=LENGTH_MODES, default="fixed",
                   help="fixed: the paper's per-model lengths (or --prompt-tokens/--output-tokens); trace: the "
                        "trace's own lengths")
    w.add_argument("--prompt-tokens", type=int, default=None, help="override the fixed prompt length")
    w.add_argument("--output-tokens", type=int, default=None, help="override the fixed response length")
    w.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    w.add_argument("--synthetic-rate", type=_positive_float, default=None,
                   help="mean req/s of the SYNTHETIC BurstGPT-shaped trace, used only when BurstGPT is unavailable")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--output", required=True, help="workload file (.jsonl); the summary is written beside it")
    w.set_defaults(fn=cmd_workload)

    r = subparsers.add_parser("replay", help="replay a workload open-loop in real time and write its metrics")
    r.add_argument("--workload", required=True, help="a workload .jsonl written by `morphserve workload`")
    r.add_argument("--out", required=True, help="directory for requests.json/.csv, aggregates.json, timeline.csv, "
                                                "quality.json")
    r.add_argument("--model", default=None, help="default: the model the workload was built for")
    r.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    r.add_argument("--dtype", default=None)
    r.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks of 16 tokens")
    r.add_argument("--max-num-seqs", type=int, default=256)
    r.add_argument("--max-num-batched-tokens", type=int, default=2048)
    r.add_argument("--seed", type=int, default=0, help="engine seed (synthetic weights)")
    r.add_argument("--ttft-slo", type=_positive_float, default=TTFT_SLO_S, help="TTFT SLO in seconds (paper: 2)")
    r.add_argument("--tpot-slo", type=_positive_float, default=TPOT_SLO_S, help="TPOT SLO in seconds")
    r.add_argument("--lag-tolerance", type=float, default=LAG_TOLERANCE_S,
                   help="seconds a submission may be late before the replay counts as fallen behind")
    r.add_argument("--warmup-requests", type=int, default=1)
    r.add_argument("--drain-timeout", type=_positive_float, default=None,
                   help="seconds to wait for answers after the last submission (default: as long as the engine runs)")
    r.add_argument("--no-quality", action="store_true", help="do not score outputs (quality.json)")
    r.set_defaults(fn=cmd_replay)

    s = subparsers.add_parser("score", help="score a replay's outputs against their references (quality.json)")
    s.add_argument("--results", required=True, help="requests.json of a replay")
    s.add_argument("--output", default=None, help="default: quality.json beside the results")
    s.set_defaults(fn=cmd_score)
