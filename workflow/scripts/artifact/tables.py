"""The artifact's tables, built from the run rows of :mod:`artifact.summary` (pandas DataFrames), and a plain
Markdown writer.

* :func:`systems_table`: per setting and system at the base load, the serving metrics and the quality with its
  change versus FP16 of the same setting (``quality_delta``: points of the headline score; ``quality_change_pct``:
  relative, ``100 x (q - q_fp16) / q_fp16``).
* :func:`table5`: the paper's Table 5 layout per setting: all layers W4, static selective 16 and 8 layers, FP16 and
  MorphServe (the configured headline mode), with quality, P95 TTFT and TTFT-SLO violations.
* :func:`sweep_table`: the rate sweep (Fig. 6) per setting, system and load.
* :func:`per_task_table`: per task of each run, P95 TTFT and quality (Fig. 4's points).

Runs with synthetic weights have no quality (None) and are marked in the ``weights`` column; a synthetic trace is
marked in ``trace``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

SETTING = ["model", "budget", "trace", "taskset"]
TABLE5_ROWS = ("w4", "selective-16", "selective-8", "fp16")


def label_trace(trace: str, synthetic: bool) -> str:
    return f"{trace} (synthetic)" if synthetic else trace


def label_weights(synthetic: bool) -> str:
    return "SYNTHETIC" if synthetic else "real"


def with_fp16_quality(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus ``quality_fp16``, ``quality_delta`` and ``quality_change_pct`` against FP16 of the same
    setting and load."""
    fp16 = runs[runs.system == "fp16"][SETTING + ["load", "quality"]].rename(columns={"quality": "quality_fp16"})
    out = runs.merge(fp16, on=SETTING + ["load"], how="left")
    out["quality_delta"] = out.quality - out.quality_fp16
    out["quality_change_pct"] = 100.0 * out.quality_delta / out.quality_fp16
    return out


def systems_table(runs: pd.DataFrame, base_load: str, systems: Sequence[str]) -> pd.DataFrame:
    df = with_fp16_quality(runs[runs.load == base_load])
    df = df.assign(trace=[label_trace(t, s) for t, s in zip(df.trace, df.synthetic_trace)],
                   weights=[label_weights(s) for s in df.synthetic_weights],
                   ttft_slo_violations_pct=100.0 * df.ttft_violation_rate,
                   any_slo_violations_pct=100.0 * df.any_violation_rate)
    df["system"] = pd.Categorical(df.system, categories=list(systems), ordered=True)
    cols = SETTING + ["weights", "system", "offered_rps", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "tpot_p50_s",
                      "tpot_p95_s", "tpot_p99_s", "queueing_mean_s", "ttft_slo_violations_pct",
                      "any_slo_violations_pct", "throughput_tok_s", "throughput_rps", "goodput_rps",
                      "start_kv_blocks", "max_kv_blocks", "quality", "quality_delta", "quality_change_pct",
                      "ok", "requests", "fell_behind"]
    return df.sort_values(SETTING + ["system"])[cols].reset_index(drop=True)


def table5(runs: pd.DataFrame, base_load: str, headline: str) -> pd.DataFrame:
    order = list(TABLE5_ROWS) + [headline]
    df = runs[(runs.load == base_load) & runs.system.isin(order)].copy()
    df["row"] = pd.Categorical(df.system, categories=order, ordered=True)
    df = df.assign(trace=[label_trace(t, s) for t, s in zip(df.trace, df.synthetic_trace)],
                   weights=[label_weights(s) for s in df.synthetic_weights],
                   ttft_slo_violations_pct=100.0 * df.ttft_violation_rate)
    cols = SETTING + ["weights", "system", "quality", "ttft_p95_s", "ttft_slo_violations_pct"]
    return df.sort_values(SETTING + ["row"])[cols].reset_index(drop=True)


def sweep_table(runs: pd.DataFrame, sweep_systems: Sequence[str], sweep_traces: Sequence[str]) -> pd.DataFrame:
    df = runs[runs.system.isin(sweep_systems) & runs.trace.isin(sweep_traces)].copy()
    df = df.assign(trace=[label_trace(t, s) for t, s in zip(df.trace, df.synthetic_trace)],
                   ttft_slo_violations_pct=100.0 * df.ttft_violation_rate)
    cols = SETTING + ["system", "load_factor", "offered_rps", "ttft_p50_s", "ttft_p95_s", "ttft_slo_violations_pct",
                      "throughput_rps", "goodput_rps", "max_kv_blocks"]
    return df.sort_values(SETTING + ["system", "load_factor"])[cols].reset_index(drop=True)


def per_task_table(tasks: pd.DataFrame, base_load: str) -> pd.DataFrame:
    df = tasks[tasks.load == base_load]
    cols = SETTING + ["task", "system", "requests", "ok", "ttft_p50_s", "ttft_p95_s", "ttft_violation_rate",
                      "quality", "quality_metric", "quality_scored"]
    return df.sort_values(SETTING + ["task", "system"])[cols].reset_index(drop=True)


# ---- Markdown ----------------------------------------------------------------------------------------------------

HEADERS = {
    "offered_rps": "offered (req/s)", "ttft_p50_s": "TTFT P50 (s)", "ttft_p95_s": "TTFT P95 (s)",
    "ttft_p99_s": "TTFT P99 (s)", "tpot_p50_s": "TPOT P50 (s)", "tpot_p95_s": "TPOT P95 (s)",
    "tpot_p99_s": "TPOT P99 (s)", "queueing_mean_s": "queueing mean (s)",
    "ttft_slo_violations_pct": "TTFT SLO viol. (%)", "any_slo_violations_pct": "any SLO viol. (%)",
    "throughput_tok_s": "throughput (tok/s)", "throughput_rps": "throughput (req/s)", "goodput_rps": "goodput (req/s)",
    "start_kv_blocks": "KV blocks (start)", "max_kv_blocks": "KV blocks (max)", "quality": "quality (%)",
    "quality_delta": "Δ quality vs FP16 (pts)", "quality_change_pct": "Δ quality vs FP16 (%)",
    "load_factor": "load (x FP16 capacity)", "ttft_violation_rate": "TTFT SLO viol. (fraction)",
    "quality_metric": "metric", "quality_scored": "scored", "fell_behind": "driver fell behind",
}


def fmt(value: Any) -> str:
    """A cell: integers as they are, floats with 3 significant digits below 1, 2 decimals up to 100, else none."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{value:.0f}"
        return f"{value:.2f}" if a >= 1 else f"{value:.3g}"
    return str(value)


def to_markdown(df: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (``None``/NaN as ``n/a``; headers with units)."""
    columns = list(columns or df.columns)
    head = "| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    rows = ["| " + " | ".join(fmt(v.item() if hasattr(v, "item") else v).replace("|", "\\|")
                              for v in (row[c] for c in columns)) + " |" for _, row in df.iterrows()]
    return "\n".join([head, rule, *rows])


def grouped_markdown(df: pd.DataFrame, columns: Sequence[str], group: Sequence[str] = SETTING) -> str:
    """One Markdown table per group (a ``###`` heading naming it)."""
    parts = []
    for keys, sub in df.groupby(list(group), sort=False, observed=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        parts.append("### " + " / ".join(f"{g} {k}" for g, k in zip(group, keys)))
        parts.append("")
        parts.append(to_markdown(sub, columns))
        parts.append("")
    return "\n".join(parts)
