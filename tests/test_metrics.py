"""Serving metrics on hand-made records: known percentiles, SLO counts, throughput and goodput; record files."""

import json
import math

import pytest

from morphserve.harness.metrics import SLO, aggregate, distribution, makespan_s
from morphserve.harness.records import (REQUEST_CSV_COLUMNS, RequestRecord, TimelineRow, read_csv, read_json,
                                        read_request_records, write_request_records, write_timeline)


def rec(i: int, ttft: float | None = 0.5, tpot: float | None = 0.05, *, ok: bool = True, scheduled: float = 0.0,
        out: int = 10, lag: float | None = 0.001, finished: float | None = None, kind: str = "rejected"):
    e2e = None if ttft is None else ttft + (tpot or 0.0) * (out - 1)
    return RequestRecord(
        request_id=f"r{i}", task="qmsum", example_id=f"e{i}", status="ok" if ok else "error",
        error_kind=None if ok else kind, error=None if ok else "prompt too long",
        finish_reason="length" if ok else None,
        scheduled_s=scheduled, submitted_s=None if lag is None else scheduled + lag, lag_s=lag,
        first_scheduled_s=None, first_token_s=None,
        finished_s=finished if finished is not None else (scheduled + e2e if ok and e2e is not None else scheduled),
        queueing_delay_s=ttft / 2 if ok and ttft is not None else None, ttft_s=ttft if ok else None,
        tpot_s=tpot if ok else None, e2e_s=e2e if ok else None, prompt_tokens=100, output_tokens=out if ok else 0,
        max_tokens=out, num_preemptions=0, text="x" if ok else None, references=["x"])


def test_distribution_percentiles_are_linear_interpolation():
    d = distribution([float(v) for v in range(100, 0, -1)])  # 1..100 in any order
    assert d["count"] == 100 and d["mean"] == 50.5 and d["min"] == 1 and d["max"] == 100
    assert d["p50"] == pytest.approx(50.5) and d["p95"] == pytest.approx(95.05) and d["p99"] == pytest.approx(99.01)
    assert distribution([3.0]) == {"count": 1, "mean": 3.0, "min": 3.0, "p50": 3.0, "p95": 3.0, "p99": 3.0,
                                   "max": 3.0}
    empty = distribution([])
    assert empty["count"] == 0 and empty["p99"] is None
    with pytest.raises(ValueError, match="non-finite"):
        distribution([1.0, math.nan])


def test_slo_counts_throughput_and_goodput():
    # 10 requests, arrivals 0..9 s.  TTFTs 0.5 .. 5.0 s: r0-r3 meet the 2 s SLO (0.5, 1.0, 1.5, 2.0: <= counts).
    # TPOT: r1 and r5 violate a 0.1 s SLO.  r9 is a rejected request (error record).
    records = []
    for i in range(10):
        if i == 9:
            records.append(rec(i, ok=False, scheduled=9.0, finished=9.0))
            continue
        tpot = 0.2 if i in (1, 5) else 0.05
        records.append(rec(i, ttft=0.5 * (i + 1), tpot=tpot, scheduled=float(i)))
    agg = aggregate(records, SLO(ttft_s=2.0, tpot_s=0.1))
    assert agg["requests"] == {"total": 10, "ok": 9, "errors": 1, "errors_by_kind": {"rejected": 1},
                               "finish_reasons": {"length": 9}}
    slo = agg["slo"]
    # TTFT met by r0..r3 (4); the other 5 finished + 1 error violate
    assert slo["ttft_violations"] == 6 and slo["ttft_violation_rate"] == 0.6
    # TPOT violated by r1, r5 and the error record
    assert slo["tpot_violations"] == 3 and slo["tpot_violation_rate"] == 0.3
    # both met: r0, r2, r3
    assert slo["met_both"] == 3 and slo["any_violations"] == 7
    # makespan: earliest scheduled arrival 0 -> latest finish: r8 at 8 + 4.5 + 9 * 0.05
    span = 8 + 4.5 + 9 * 0.05
    assert makespan_s(records) == pytest.approx(span)
    tp = agg["throughput"]
    assert tp["makespan_s"] == pytest.approx(span)
    assert tp["output_tokens"] == 90 and tp["output_tokens_per_s"] == pytest.approx(90 / span)
    assert tp["requests_per_s"] == pytest.approx(9 / span) and tp["goodput_requests_per_s"] == pytest.approx(3 / span)
    assert agg["latency_s"]["ttft"]["count"] == 9 and agg["latency_s"]["ttft"]["p50"] == pytest.approx(2.5)
    assert agg["latency_s"]["ttft"]["max"] == 4.5


def test_single_token_output_meets_tpot_vacuously_and_lag_detection():
    records = [rec(0, ttft=0.1, tpot=None, out=1, lag=0.2), rec(1, ttft=0.1, tpot=0.01, lag=0.01)]
    agg = aggregate(records, SLO(ttft_s=1.0, tpot_s=0.05), lag_tolerance_s=0.05)
    assert agg["slo"]["met_both"] == 2
    assert agg["driver"]["fell_behind"] is True and agg["driver"]["late_submissions"] == 1
    assert agg["driver"]["lag_s"]["max"] == 0.2
    assert aggregate(records, SLO(), lag_tolerance_s=0.5)["driver"]["fell_behind"] is False


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="tpot_s=0"):
        SLO(tpot_s=0)
    with pytest.raises(ValueError, match="ttft_s=nan"):
        SLO(ttft_s=math.nan)
    with pytest.raises(ValueError, match="'r0' has 2 records"):
        aggregate([rec(0), rec(0)])
    with pytest.raises(ValueError, match="lag_tolerance_s=-1"):
        aggregate([rec(0)], lag_tolerance_s=-1)


def test_empty_and_all_failed_runs_have_no_rates():
    agg = aggregate([rec(0, ok=False, finished=None, lag=None, kind="engine_failure")])
    assert agg["requests"]["errors_by_kind"] == {"engine_failure": 1}
    assert agg["slo"]["ttft_violation_rate"] == 1.0
    assert aggregate([])["throughput"]["output_tokens_per_s"] is None


def test_record_files_round_trip_with_provenance(tmp_path):
    prov = {"git_commit": "abc", "seed": 3}
    records = [rec(0), rec(1, ok=False, scheduled=1.0, finished=1.0)]
    records[0].token_times_s = [0.5, 0.55]
    write_request_records(tmp_path / "r.json", tmp_path / "r.csv", records, prov)
    back, p = read_request_records(tmp_path / "r.json")
    assert back == records and p == prov
    rows, p = read_csv(tmp_path / "r.csv")
    assert p == prov and list(rows[0]) == list(REQUEST_CSV_COLUMNS) and len(rows) == 2
    assert rows[1]["status"] == "error" and rows[1]["ttft_s"] == "" and float(rows[0]["ttft_s"]) == 0.5
    assert (tmp_path / "r.csv").read_text().startswith("# provenance: {")
    row = TimelineRow(1, 0.0, 0.01, 5, 1, 0, 0, 1, 2, 10, 0.2, 3, 0, 0, "fp16,fp16,fp16")
    write_timeline(tmp_path / "t.csv", [row], prov)
    rows, _ = read_csv(tmp_path / "t.csv")
    assert rows[0]["precisions"] == "fp16,fp16,fp16" and rows[0]["kv_utilization"] == "0.2"
    payload, _ = read_json(tmp_path / "r.json", "requests")
    assert json.loads((tmp_path / "r.json").read_text())["provenance"] == prov and len(payload) == 2
    with pytest.raises(ValueError, match="unknown fields \\['bogus'\\]"):
        RequestRecord.from_dict({**records[0].to_dict(), "bogus": 1})


def test_timeline_summary():
    from morphserve.harness.metrics import timeline_summary

    rows = [TimelineRow(1, 0.0, 0.1, 64, 2, 0, 3, 2, 10, 100, 0.1, 2, 0, 1, "fp16,fp16,w4"),
            TimelineRow(2, 0.1, 0.3, 2, 2, 1, 1, 2, 50, 120, 50 / 120, 1, 0, 2, "fp16,w4,w4"),
            TimelineRow(3, 0.4, 0.2, 2, 2, 0, 0, 2, 30, 120, 0.25, 1, 0, 2, "fp16,w4,w4")]
    s = timeline_summary(rows)
    assert s["steps"] == 3 and s["busy_s"] == pytest.approx(0.6) and s["preemptions"] == 1
    assert s["kv_utilization"]["max"] == pytest.approx(50 / 120) and s["num_waiting"]["max"] == 3
    assert s["kv_total_blocks"] == {"min": 100, "max": 120}
    assert s["num_fp16_layers"] == {"min": 1, "max": 2} and s["precision_changes"] == 1
    assert timeline_summary([]) == {"steps": 0}
