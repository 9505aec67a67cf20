"""One row per run, and one row per (run, task), read from the files each run wrote.

Every number in the tables, figures and report comes from these rows, and every row comes from a run's files:
``aggregates.json`` (latency distributions, SLO attainment, throughput: morphserve.harness.metrics), ``quality.json``
(task scores: morphserve.eval.quality), ``requests.json`` (per-request latencies, for per-task percentiles),
``timeline.csv`` (KV capacity per step), ``run.json`` (what was installed) and the workload summary (the offered
rate, i.e. the mean arrival rate the trace was scaled to, and whether the trace is synthetic).  Times are seconds, rates per second, quality in percent (the headline scheme), KV in blocks.

*Quality of a run* is the macro mean over the tasks of its task set of each task's mean headline score (a single
task's mean when the set has one task); None when the weights are synthetic or nothing was scored.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from artifact.grid import RunKey

RUN_FILES = ("aggregates.json", "quality.json", "requests.json", "timeline.csv", "run.json")


def _pct(values: list[float], p: float) -> float | None:
    return float(np.percentile(values, p)) if values else None


def run_row(key: RunKey, run_dir: str | Path, workload_summary: str | Path) -> dict[str, Any]:
    from morphserve.harness.records import read_csv, read_json

    d = Path(run_dir)
    agg, prov = read_json(d / "aggregates.json", "aggregates")
    quality, _ = read_json(d / "quality.json", "quality")
    run, _ = read_json(d / "run.json", "run")
    wl, _ = read_json(workload_summary, "summary")
    timeline, _ = read_csv(d / "timeline.csv")
    lat, slo, thr = agg["latency_s"], agg["slo"], agg["throughput"]
    kv_total = [int(r["kv_total_blocks"]) for r in timeline]
    kv_used = [int(r["kv_used_blocks"]) for r in timeline]
    task_means = [t["headline_mean"] for t in quality.get("tasks", {}).values() if t.get("headline_mean") is not None]
    return {
        **{f: getattr(key, f) for f in ("model", "budget", "trace", "taskset", "load", "system")},
        "load_factor": float(key.load),
        "synthetic_trace": bool(wl["synthetic"]["trace"]),
        "synthetic_weights": bool(run["synthetic_weights"]),
        "offered_rps": wl["calibration"]["target_rate_rps"],
        "requests": agg["requests"]["total"],
        "ok": agg["requests"]["ok"],
        "errors": agg["requests"]["errors"],
        **{f"ttft_{p}_s": lat["ttft"][p] for p in ("p50", "p95", "p99")},
        **{f"tpot_{p}_s": lat["tpot"][p] for p in ("p50", "p95", "p99")},
        "e2e_p95_s": lat["e2e"]["p95"],
        "queueing_mean_s": lat["queueing_delay"]["mean"],
        "queueing_p95_s": lat["queueing_delay"]["p95"],
        "slo_ttft_s": slo["ttft_s"],
        "slo_tpot_s": slo["tpot_s"],
        "ttft_violation_rate": slo["ttft_violation_rate"],
        "tpot_violation_rate": slo["tpot_violation_rate"],
        "any_violation_rate": slo["any_violation_rate"],
        "throughput_tok_s": thr["output_tokens_per_s"],
        "throughput_rps": thr["requests_per_s"],
        "goodput_rps": thr["goodput_requests_per_s"],
        "makespan_s": thr["makespan_s"],
        "fp16_kv_blocks": run["fp16_kv_blocks"],
        "start_kv_blocks": run["start_kv_blocks"],
        "max_kv_blocks": max(kv_total) if kv_total else run["start_kv_blocks"],
        "max_kv_used_blocks": max(kv_used) if kv_used else 0,
        "mean_kv_utilization": statistics.fmean(u / t for u, t in zip(kv_used, kv_total)) if kv_total else None,
        "preemptions": sum(int(r["num_preempted"]) for r in timeline),
        "decisions": len(run["decisions"]),
        "quality": statistics.fmean(task_means) if task_means else None,
        "quality_scheme": quality.get("headline_scheme"),
        "quality_scored": sum(t.get("scored", 0) for t in quality.get("tasks", {}).values()),
        "fell_behind": bool(agg["driver"]["fell_behind"]),
        "order_source": run["order_source"],
        "device": prov.get("device"),
        "git_commit": prov.get("git_commit"),
    }


def task_rows(key: RunKey, run_dir: str | Path) -> list[dict[str, Any]]:
    """Per task of the run: its requests' TTFT percentiles and SLO violations, and its quality."""
    from morphserve.harness.records import read_json, read_request_records

    d = Path(run_dir)
    records, _ = read_request_records(d / "requests.json")
    quality, _ = read_json(d / "quality.json", "quality")
    agg, _ = read_json(d / "aggregates.json", "aggregates")
    slo_ttft = agg["slo"]["ttft_s"]
    out = []
    for task in sorted({r.task for r in records}):
        mine = [r for r in records if r.task == task]
        ttft = [r.ttft_s for r in mine if r.ok and r.ttft_s is not None]
        q = quality.get("tasks", {}).get(task, {})
        scheme = q.get("headline_scheme")
        out.append({
            **{f: getattr(key, f) for f in ("model", "budget", "trace", "taskset", "load", "system")},
            "task": task, "requests": len(mine), "ok": sum(r.ok for r in mine),
            "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
            "ttft_violation_rate": sum(not (r.ok and r.ttft_s is not None and r.ttft_s <= slo_ttft) for r in mine)
            / len(mine),
            "quality": q.get("headline_mean"),
            "quality_metric": (q.get("schemes", {}).get(scheme) or {}).get("metric") if scheme else None,
            "quality_scored": q.get("scored", 0),
        })
    return out
