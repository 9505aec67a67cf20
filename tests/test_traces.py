"""morphserve.workloads.traces: real Azure traces from the mirror, the BurstGPT loader and its synthetic stand-in,
window selection, downsampling, rate scaling, and every malformed-input path."""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
from pathlib import Path

import numpy as np
import pytest

from morphserve.data.mirror import manifest_entry
from morphserve.workloads.traces import (
    BurstGPTShape, Trace, TraceError, TraceRequest, burstgpt_or_synthetic, downsample, load_azure, load_burstgpt,
    load_csv_trace, scale_rate, select_window, synthetic_burstgpt, truncate)

# Read at import time, before any test's monkeypatch changes the environment.
SHARED_MIRROR = os.environ.get("MORPHSERVE_DATA_MIRROR")
needs_mirror = pytest.mark.skipif(not SHARED_MIRROR, reason="MORPHSERVE_DATA_MIRROR is not set (offline data mirror)")

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
BURSTGPT_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"


def _write(tmp_path: Path, name: str, lines: list[str], newline: str = "\n") -> Path:
    path = tmp_path / name
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def _trace(arrivals: list[float], span_s: float | None = None, synthetic: bool = False) -> Trace:
    reqs = [TraceRequest(float(a), 10 + i, 1 + i % 7) for i, a in enumerate(arrivals)]
    return Trace(name="t", requests=reqs, source="test", synthetic=synthetic, span_s=span_s)


def _has(step: dict, **expected) -> bool:
    """True when the lineage step holds every expected key with the expected value."""
    return all(k in step and step[k] == v for k, v in expected.items())


def _independent_azure(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrivals (s, microsecond precision via datetime), prompt and output tokens, read without the module."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    ts = [dt.datetime.strptime(r[0][:26], "%Y-%m-%d %H:%M:%S.%f") for r in rows]
    arrivals = np.array([(t - ts[0]).total_seconds() for t in ts])
    return arrivals, np.array([int(r[1]) for r in rows]), np.array([int(r[2]) for r in rows])


# ---- the real Azure files ----------------------------------------------------------------------------------------

@needs_mirror
@pytest.mark.parametrize("kind, count, duration_s, t0, second", [
    # duration: last minus first timestamp, exact in 100 ns ticks (e.g. 19:14:19.9280160 - 18:17:03.9799600)
    ("code", 8819, 3435.9480560, "2023-11-16 18:17:03.9799600", (0.0520000, 3180, 8)),
    ("conv", 19366, 3501.7219370, "2023-11-16 18:15:46.6805900", (4.3145790, 396, 109)),
])
def test_azure_real_files(kind, count, duration_s, t0, second):
    trace = load_azure(kind)
    assert len(trace) == count
    assert trace.duration_s == pytest.approx(duration_s, abs=1e-9)
    assert trace.meta["t0"] == t0
    assert trace.requests[0].arrival_s == 0.0
    r1 = trace.requests[1]
    assert (r1.arrival_s, r1.prompt_tokens, r1.output_tokens) == (pytest.approx(second[0], abs=1e-12),) + second[1:]
    assert not trace.synthetic and trace.meta["lineage"] == []
    assert trace.meta["skipped_rows"]["total"] == 0 and not trace.meta["sorted_by_loader"]
    assert trace.meta["sha256"] == manifest_entry(f"azure_{kind}").sha256
    assert trace.meta["rows_read"] == count
    assert "AzurePublicDataset" in trace.source

    arrivals, prompts, outputs = _independent_azure(Path(trace.meta["file"]))
    np.testing.assert_array_equal(trace.prompt_lengths(), prompts)
    np.testing.assert_array_equal(trace.output_lengths(), outputs)
    # datetime drops the 7th digit: at most 100 ns per timestamp, so the two parses differ by < 0.2 us
    assert np.max(np.abs(trace.arrival_times() - arrivals)) < 2e-7
    s = trace.summary()
    assert s["count"] == count and s["rate_rps"] == pytest.approx(count / duration_s)


@needs_mirror
def test_azure_busiest_window_is_busiest_on_real_trace():
    trace = load_azure("code")
    window = select_window(trace, 72.0)
    step = window.meta["lineage"][-1]
    arr = trace.arrival_times()

    def counts(starts: np.ndarray) -> np.ndarray:
        return np.searchsorted(arr, starts + 72.0, side="left") - np.searchsorted(arr, starts, side="left")

    # every start on a 10 ms grid over the whole trace, and every arrival: none beats the chosen window
    at_arrivals = arr[arr <= trace.duration_s - 72.0]
    best = max(counts(np.arange(0.0, trace.duration_s - 72.0, 0.01)).max(), counts(at_arrivals).max())
    assert len(window) == best == step["requests"]
    assert step["start_s"] == at_arrivals[np.argmax(counts(at_arrivals))]  # the earliest busiest
    assert window.duration_s == 72.0 and window.requests[0].arrival_s == 0.0
    assert all(0.0 <= r.arrival_s < 72.0 for r in window.requests)


def test_azure_timestamp_keeps_100ns(tmp_path):
    path = _write(tmp_path, "a.csv", [AZURE_HEADER, "2023-11-16 23:59:59.9999999,5,1",
                                      "2023-11-17 00:00:00.0000000,5,2", "2023-11-17 00:00:00.0000001,5,3",
                                      "2023-11-17 00:00:00.5,5,4", "2023-11-17 00:00:01,5,5"], newline="\r\n")
    t = load_csv_trace(path, "azure")
    assert [r.arrival_s for r in t.requests] == pytest.approx([0.0, 1e-7, 2e-7, 0.5000001, 1.0000001], abs=1e-12)
    assert t.meta["t0"] == "2023-11-16 23:59:59.9999999"


# ---- summary and data types --------------------------------------------------------------------------------------

def test_summary_by_hand():
    t = Trace("h", [TraceRequest(0.0, 10, 1), TraceRequest(0.5, 20, 2), TraceRequest(1.5, 30, 3),
                    TraceRequest(3.0, 40, 40)], source="hand", synthetic=False)
    s = t.summary()
    gaps = np.array([0.5, 1.0, 1.5])
    assert s["count"] == 4 and s["duration_s"] == 3.0 and s["rate_rps"] == pytest.approx(4 / 3)
    # 1 s bins [0,1) [1,2) [2,3]: 2, 1, 1 (the arrival at the end counts in the last bin)
    assert (s["rate_1s_mean"], s["rate_1s_p50"]) == (pytest.approx(4 / 3), 1.0)
    assert s["rate_1s_p95"] == pytest.approx(1.9)
    assert s["interarrival_cv"] == pytest.approx(gaps.std() / gaps.mean())
    assert s["prompt_tokens"] == {"mean": 25.0, "p50": 25.0, "p95": pytest.approx(38.5)}
    assert s["output_tokens"]["mean"] == 11.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(arrival_s=-1.0, prompt_tokens=1, output_tokens=1), "arrival_s=-1.0"),
    (dict(arrival_s=math.nan, prompt_tokens=1, output_tokens=1), "arrival_s=nan"),
    (dict(arrival_s=0.0, prompt_tokens=0, output_tokens=1), "prompt_tokens=0"),
    (dict(arrival_s=0.0, prompt_tokens=1, output_tokens=2.5), "output_tokens=2.5"),
])
def test_trace_request_validation(kwargs, match):
    with pytest.raises(TraceError, match=match):
        TraceRequest(**kwargs)


def test_trace_validation():
    with pytest.raises(TraceError, match="no requests"):
        Trace("e", [], source="x", synthetic=False)
    with pytest.raises(TraceError, match="request 1 arrives at 1.0 s, before request 0"):
        _trace([2.0, 1.0])
    with pytest.raises(TraceError, match="span_s=1.5"):
        _trace([0.0, 2.0], span_s=1.5)


# ---- window selection --------------------------------------------------------------------------------------------

def _bursty_arrivals(seed: int, n: int = 300, duration: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, duration, size=6)
    a = np.concatenate([rng.uniform(0, duration, n // 2),
                        np.clip(rng.normal(rng.choice(centres, n - n // 2), 1.5), 0, duration)])
    return np.sort(np.round(a, 3))  # rounding creates exact ties between arrivals


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("length", [3.0, 7.3, 20.0])
def test_busiest_window_brute_force(seed, length):
    arr = _bursty_arrivals(seed)
    trace = _trace(list(arr), span_s=100.0)
    w = select_window(trace, length)
    start = w.meta["lineage"][-1]["start_s"]

    def count(s: float) -> int:
        return int(np.sum((arr >= s) & (arr < s + length)))

    grid = np.arange(0.0, 100.0 - length + 1e-9, 0.0005)
    best_grid = max(int(c) for c in np.searchsorted(arr, grid + length) - np.searchsorted(arr, grid))
    arrival_starts = [a for a in arr if a <= 100.0 - length]
    best = max([count(a) for a in arrival_starts] + [count(100.0 - length)])
    assert len(w) == count(start) == best >= best_grid
    # ties go to the earliest window starting at an arrival
    assert all(count(a) < best for a in arrival_starts if a < start)
    assert w.duration_s == length and all(0 <= r.arrival_s < length for r in w.requests)
    assert [r.arrival_s for r in w.requests] == pytest.approx([a - start for a in arr if start <= a < start + length])


def test_busiest_window_ties_earliest_and_end_of_trace():
    # two identical clusters: the first wins
    t = _trace([1.0, 1.1, 1.2, 50.0, 50.1, 50.2], span_s=60.0)
    assert select_window(t, 5.0).meta["lineage"][-1]["start_s"] == 1.0
    # the busiest stretch sits at the very end: the window is clamped inside the trace, [55, 60)
    t = _trace([0.0, 56.0, 57.0, 58.0, 59.0], span_s=60.0)
    w = select_window(t, 5.0)
    assert w.meta["lineage"][-1]["start_s"] == 55.0 and len(w) == 4
    assert [r.arrival_s for r in w.requests] == [1.0, 2.0, 3.0, 4.0]
    # half-open windows: an arrival exactly at the end of a window is outside it
    t = _trace([0.0, 1.0, 2.0, 3.0])
    assert len(select_window(t, 3.0, rule="start")) == 3


def test_window_rules_and_errors():
    t = _trace([0.0, 1.0, 2.5, 4.0, 9.0], span_s=10.0)
    assert [r.arrival_s for r in select_window(t, 3.0, rule="start").requests] == [0.0, 1.0, 2.5]
    w = select_window(t, 3.0, rule="offset", offset_s=2.0)
    assert [r.arrival_s for r in w.requests] == [0.5, 2.0]
    assert _has(w.meta["lineage"][-1], op="select_window", rule="offset", start_s=2.0, end_s=5.0, requests=2)
    with pytest.raises(TraceError, match="window length 11.0 s exceeds"):
        select_window(t, 11.0)
    with pytest.raises(TraceError, match="offset_s=8.0 must be a number in"):
        select_window(t, 3.0, rule="offset", offset_s=8.0)
    with pytest.raises(TraceError, match="offset_s=None"):
        select_window(t, 3.0, rule="offset")
    with pytest.raises(TraceError, match="only used with rule='offset'"):
        select_window(t, 3.0, offset_s=1.0)
    with pytest.raises(TraceError, match="unknown window rule 'middle'"):
        select_window(t, 3.0, rule="middle")
    with pytest.raises(TraceError, match=r"window \[5.0, 8.0\) s .* holds no request"):
        select_window(t, 3.0, rule="offset", offset_s=5.0)
    with pytest.raises(TraceError, match="length_s=-1"):
        select_window(t, -1)


# ---- downsampling, rate scaling, truncation ----------------------------------------------------------------------

def test_thin_semantics():
    arr = np.sort(np.random.default_rng(1).uniform(0, 1000, 4000))
    t = _trace(list(arr), span_s=1000.0)
    d = downsample(t, 4.75, seed=3)
    step = d.meta["lineage"][-1]
    assert _has(step, op="downsample", mode="thin", factor=4.75, seed=3, requests=len(d), parent_requests=4000)
    # binomial(4000, 1/4.75): mean 842.1, sd 25.8
    assert abs(len(d) - 4000 / 4.75) < 5 * math.sqrt(4000 / 4.75 * (1 - 1 / 4.75))
    assert d.duration_s == 1000.0 and d.rate == pytest.approx(len(d) / 1000.0)
    assert set(d.requests) <= set(t.requests)  # a subset, times untouched
    assert downsample(t, 4.75, seed=3).requests == d.requests  # deterministic in the seed
    assert downsample(t, 4.75, seed=4).requests != d.requests
    assert len(downsample(t, 1.0).requests) == 4000


def test_stretch_semantics():
    t = _trace([0.0, 1.0, 2.0, 7.5], span_s=8.0)
    d = downsample(t, 1.75, mode="stretch")
    assert [r.arrival_s for r in d.requests] == pytest.approx([0.0, 1.75, 3.5, 13.125])
    assert [(r.prompt_tokens, r.output_tokens) for r in d.requests] == \
        [(r.prompt_tokens, r.output_tokens) for r in t.requests]
    assert d.duration_s == 14.0 and d.rate == pytest.approx(t.rate / 1.75)
    assert _has(d.meta["lineage"][-1], op="downsample", mode="stretch", factor=1.75, requests=4)


@pytest.mark.parametrize("factor, mode, match", [
    (0.5, "thin", "factor=0.5"), (math.inf, "thin", "factor=inf"), (2.0, "drop", "unknown downsampling mode"),
])
def test_downsample_errors(factor, mode, match):
    with pytest.raises(TraceError, match=match):
        downsample(_trace([0.0, 1.0]), factor, mode=mode)
    with pytest.raises(TraceError, match="kept no request"):
        downsample(_trace([0.0]), 1e9, seed=0)
    with pytest.raises(TraceError, match="seed=-1"):
        downsample(_trace([0.0]), 2.0, seed=-1)


def test_scale_rate_and_truncate():
    t = _trace([0.0, 1.0, 3.0, 6.0], span_s=8.0)
    f = scale_rate(t, 2.0)
    assert [r.arrival_s for r in f.requests] == [0.0, 0.5, 1.5, 3.0] and f.duration_s == 4.0
    assert f.rate == pytest.approx(2 * t.rate)
    assert scale_rate(t, 0.5).duration_s == 16.0
    assert f.meta["lineage"][-1]["op"] == "scale_rate" and f.meta["lineage"][-1]["factor"] == 2.0
    for bad in (0, -1.0, math.nan):
        with pytest.raises(TraceError, match="rate factor"):
            scale_rate(t, bad)
    c = truncate(t, 2)
    assert len(c) == 2 and c.duration_s == 1.0 and c.meta["lineage"][-1]["max_requests"] == 2
    assert len(truncate(t, 10)) == 4 and truncate(t, 10).duration_s == 8.0
    with pytest.raises(TraceError, match="max_requests=0"):
        truncate(t, 0)
    assert t.meta["lineage"] == []  # parents are never modified


# ---- synthetic BurstGPT-shaped generator -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic() -> Trace:
    return synthetic_burstgpt(duration_s=3600.0, mean_rate=4.0, seed=7)


def test_synthetic_defaults_are_the_documented_ones():
    s = BurstGPTShape()
    assert (s.gamma_shape, s.prompt_zipf_exponent, s.prompt_min, s.prompt_max) == (0.5, 1.1, 1, 1024)
    assert (s.output_short_weight, s.output_short_median, s.output_short_sigma, s.output_long_median,
            s.output_long_sigma, s.output_max) == (0.4, 30.0, 0.6, 350.0, 0.5, 2048)


def test_synthetic_arrivals_are_bursty(synthetic):
    s = synthetic.summary()
    assert synthetic.synthetic and synthetic.source.startswith("synthetic: BurstGPT-shaped generator")
    assert s["rate_rps"] == pytest.approx(4.0, rel=0.05)
    # Gamma(0.5) gaps: CV = 1/sqrt(0.5) = 1.414, burstier than Poisson (CV 1)
    assert s["interarrival_cv"] > 1.2
    assert s["interarrival_cv"] == pytest.approx(math.sqrt(2), rel=0.08)
    assert synthetic.duration_s == 3600.0 and synthetic.requests[-1].arrival_s <= 3600.0


def test_synthetic_prompt_lengths_follow_the_documented_zipf(synthetic):
    prompts = synthetic.prompt_lengths()
    k = np.arange(1, 1025)
    pmf = k ** -1.1 / np.sum(k ** -1.1)
    cdf = np.cumsum(pmf)
    exact_mean, exact_p50, exact_p95 = float(np.sum(k * pmf)), int(k[np.searchsorted(cdf, 0.5)]), \
        int(k[np.searchsorted(cdf, 0.95)])
    assert (round(exact_mean, 1), exact_p50, exact_p95, round(float(pmf[0]), 3)) == (101.8, 12, 595, 0.179)  # doc
    assert prompts.min() >= 1 and prompts.max() <= 1024
    assert np.mean(prompts) == pytest.approx(exact_mean, rel=0.06)
    assert abs(np.median(prompts) - exact_p50) <= 2
    assert np.percentile(prompts, 95) == pytest.approx(exact_p95, rel=0.06)
    assert np.mean(prompts == 1) == pytest.approx(pmf[0], abs=0.015)
    # power law: log-frequency falls linearly with log-length, slope -1.1 (fit on lengths 1..64, well populated)
    counts = np.bincount(prompts, minlength=1025)[1:65]
    slope = np.polyfit(np.log(np.arange(1, 65)), np.log(counts), 1)[0]
    assert slope == pytest.approx(-1.1, abs=0.15)


def test_synthetic_output_lengths_are_bimodal(synthetic):
    outputs = synthetic.output_lengths()
    assert outputs.min() >= 1 and outputs.max() <= 2048
    # the documented mixture puts 39.6% of outputs at or below sqrt(30 * 350) = 102.5 tokens
    assert np.mean(outputs <= 102) == pytest.approx(0.396, abs=0.03)
    hist, edges = np.histogram(np.log(outputs), bins=np.arange(1.5, 7.75, 0.25))
    centres = (edges[:-1] + edges[1:]) / 2
    short_peak = hist[(centres > 3.0) & (centres < 3.8)].max()   # around ln 30 = 3.40
    long_peak = hist[(centres > 5.4) & (centres < 6.3)].max()    # around ln 350 = 5.86
    trough = hist[(centres > 4.2) & (centres < 5.0)].min()
    assert trough < 0.4 * short_peak and trough < 0.4 * long_peak
    assert long_peak > short_peak  # weights 0.6 long vs 0.4 short, and the long mode is narrower


def test_synthetic_is_deterministic_and_validated():
    a = synthetic_burstgpt(60.0, 3.0, seed=1)
    assert a.requests == synthetic_burstgpt(60.0, 3.0, seed=1).requests
    assert a.requests != synthetic_burstgpt(60.0, 3.0, seed=2).requests
    with pytest.raises(TraceError, match="mean_rate=0"):
        synthetic_burstgpt(60.0, 0, seed=1)
    with pytest.raises(TraceError, match="duration_s=-5"):
        synthetic_burstgpt(-5, 1.0, seed=1)
    with pytest.raises(TraceError, match="seed=1.5"):
        synthetic_burstgpt(60.0, 1.0, seed=1.5)
    with pytest.raises(TraceError, match="gamma_shape=0"):
        BurstGPTShape(gamma_shape=0)
    with pytest.raises(TraceError, match="produced no requests"):
        synthetic_burstgpt(1e-6, 1e-3, seed=0)


def test_synthetic_label_survives_every_transformation(synthetic):
    t = truncate(scale_rate(downsample(select_window(synthetic, 72.0), 1.75, seed=2), 1.5), 50)
    assert t.synthetic and t.source == synthetic.source
    assert [s["op"] for s in t.meta["lineage"]] == ["select_window", "downsample", "scale_rate", "truncate"]
    assert t.meta["generator"] == "synthetic_burstgpt" and t.meta["seed"] == 7
    assert downsample(synthetic, 2.0, mode="stretch").synthetic
    assert t.summary()["synthetic"] is True


# ---- BurstGPT loader ---------------------------------------------------------------------------------------------

BURSTGPT_ROWS = [
    BURSTGPT_HEADER,
    "5,ChatGPT,472,18,490,Conversation log",
    "5,GPT-4,300,0,300,Conversation log",          # failed
    "45,ChatGPT,1087,230,1317,Conversation log",
    "45.5,ChatGPT,0,0,0,API log",                   # failed before its prompt was counted
    "118,GPT-4,417,276,693,API log",
    "118.25,ChatGPT,100,20,999,API log",           # Total tokens inconsistent: counted, kept
]


def test_burstgpt_loader(tmp_path):
    path = _write(tmp_path, "BurstGPT_1.csv", BURSTGPT_ROWS)
    t = load_burstgpt(path)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in t.requests] == [
        (0.0, 472, 18), (40.0, 1087, 230), (113.0, 417, 276), (113.25, 100, 20)]
    assert t.meta["failed_rows"] == 2 and t.meta["rows_read"] == 6 and t.meta["t0"] == "5"
    assert t.meta["total_tokens_mismatch_rows"] == 1 and not t.synthetic
    chat = load_burstgpt(path, model="ChatGPT", log_type="Conversation log")
    assert [r.prompt_tokens for r in chat.requests] == [472, 1087]
    assert chat.meta["filtered_rows"] == 4 and chat.meta["failed_rows"] == 0
    assert chat.meta["filters"] == {"Model": "ChatGPT", "Log Type": "Conversation log"}
    with pytest.raises(TraceError, match=r"no requests left: 6 data rows, 0 malformed and skipped, 0 failed .* 6 "
                                         r"filtered out"):
        load_burstgpt(path, model="GPT-5")


def test_burstgpt_only_failed_rows_is_an_error(tmp_path):
    path = _write(tmp_path, "f.csv", [BURSTGPT_HEADER, "1,ChatGPT,10,0,10,API log", "2,ChatGPT,11,0,11,API log"])
    with pytest.raises(TraceError, match=r"no requests left: 2 data rows, 0 malformed and skipped, 2 failed"):
        load_burstgpt(path)


def test_burstgpt_or_synthetic_falls_back_only_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHSERVE_DATA_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path / "cache"))
    t = burstgpt_or_synthetic(3, duration_s=120.0, mean_rate=2.0)
    assert t.synthetic and t.source.startswith("synthetic: BurstGPT-shaped generator")
    assert "burstgpt" in t.meta["fallback_reason"] and t.meta["seed"] == 3

    placed = tmp_path / "mirror" / "traces" / "BurstGPT_1.csv"
    placed.parent.mkdir(parents=True)
    placed.write_text("\n".join(BURSTGPT_ROWS) + "\n")
    real = burstgpt_or_synthetic(3, duration_s=120.0, mean_rate=2.0)
    assert not real.synthetic and len(real) == 4 and real.meta["manifest_id"] == "burstgpt"

    placed.write_text(BURSTGPT_HEADER + "\n5,ChatGPT,abc,18,490,Conversation log\n")
    with pytest.raises(TraceError, match="non-numeric Request tokens 'abc'"):  # present but bad: no fallback
        burstgpt_or_synthetic(3, duration_s=120.0, mean_rate=2.0)
    with pytest.raises(TraceError, match="does not exist"):  # an explicit path that is missing: no fallback
        burstgpt_or_synthetic(3, duration_s=120.0, mean_rate=2.0, path=tmp_path / "nope.csv")


# ---- malformed input ---------------------------------------------------------------------------------------------

GOOD_AZURE = "2023-11-16 18:17:03.9799600,4808,10"


@pytest.mark.parametrize("bad_row, match", [
    ("2023-13-16 18:17:04.0000000,10,5", "bad TIMESTAMP '2023-13-16 18:17:04.0000000': month must be in 1..12"),
    ("2023-11-16T18:17:04.0000000,10,5", "bad TIMESTAMP '2023-11-16T18:17:04.0000000'"),
    ("2023-11-16 18:17:04.00000001,10,5", "at most 7 fractional digits"),
    ("2023-11-16 18:17:04.0000000+00:00,10,5", "no time zone"),
    ("yesterday,10,5", "bad TIMESTAMP 'yesterday'"),
    ("2023-11-16 18:17:04.0000000,-10,5", "negative ContextTokens '-10'"),
    ("2023-11-16 18:17:04.0000000,10,", "missing GeneratedTokens"),
    ("2023-11-16 18:17:04.0000000,ten,5", "non-numeric ContextTokens 'ten'"),
    ("2023-11-16 18:17:04.0000000,10,5.5", "non-integer GeneratedTokens '5.5'"),
    ("2023-11-16 18:17:04.0000000,10,0", "GeneratedTokens '0' must be >= 1"),
    ("2023-11-16 18:17:04.0000000,10", "2 fields"),
    ("", "0 fields"),
])
def test_azure_malformed_row_raises_with_file_line_and_value(tmp_path, bad_row, match):
    path = _write(tmp_path, "bad.csv", [AZURE_HEADER, GOOD_AZURE, bad_row, "2023-11-16 18:17:05.0000000,7,7"])
    with pytest.raises(TraceError, match=r"bad\.csv:3: ") as info:
        load_csv_trace(path, "azure")
    assert match in str(info.value) and "on_bad_row='skip'" in str(info.value)


@pytest.mark.parametrize("bad_row, match", [
    ("-5,ChatGPT,472,18,490,Conversation log", "bad Timestamp '-5'"),
    ("nan,ChatGPT,472,18,490,Conversation log", "bad Timestamp 'nan'"),
    ("5,ChatGPT,472,-18,454,Conversation log", "negative Response tokens '-18'"),
    ("5,ChatGPT,472,18,,Conversation log", "missing Total tokens"),
    ("5,ChatGPT,0,18,18,Conversation log", "Request tokens '0' must be >= 1"),
])
def test_burstgpt_malformed_row_raises(tmp_path, bad_row, match):
    path = _write(tmp_path, "b.csv", [BURSTGPT_HEADER, "1,ChatGPT,1,1,2,API log", bad_row])
    with pytest.raises(TraceError, match=r"b\.csv:3: ") as info:
        load_burstgpt(path)
    assert match in str(info.value)


def test_skip_mode_counts_every_skipped_row(tmp_path):
    path = _write(tmp_path, "s.csv", [AZURE_HEADER, GOOD_AZURE, "2023-11-16 18:17:04.0000000,-1,5",
                                      "2023-11-16 18:17:04.1000000,x,5", "bad,1,1", "2023-11-16 18:17:04.2000000,-3,5",
                                      "2023-11-16 18:17:05.0000000,7,7"])
    t = load_csv_trace(path, "azure", on_bad_row="skip")
    assert [r.prompt_tokens for r in t.requests] == [4808, 7]
    skipped = t.meta["skipped_rows"]
    assert skipped["total"] == 4
    assert skipped["by_reason"] == {"negative ContextTokens": 2, "non-numeric ContextTokens": 1, "bad TIMESTAMP": 1}
    assert skipped["first"][0] == f"{path}:3: negative ContextTokens '-1'"


def test_unsorted_rows(tmp_path):
    path = _write(tmp_path, "u.csv", [AZURE_HEADER, "2023-11-16 18:17:03.0000000,1,1",
                                      "2023-11-16 18:17:05.0000000,2,2", "2023-11-16 18:17:04.0000000,3,3",
                                      "2023-11-16 18:17:06.0000000,4,4"])
    with pytest.raises(TraceError, match=r"u\.csv:4: TIMESTAMP '2023-11-16 18:17:04.0000000' is earlier than "
                                         r"'2023-11-16 18:17:05.0000000' on line 3.*sort=True"):
        load_csv_trace(path, "azure")
    t = load_csv_trace(path, "azure", sort=True)
    assert [r.prompt_tokens for r in t.requests] == [1, 3, 2, 4]
    assert [r.arrival_s for r in t.requests] == [0.0, 1.0, 2.0, 3.0]
    assert t.meta["sorted_by_loader"] is True and t.meta["out_of_order_rows"] == 1


def test_wrong_columns_list_expected_and_found(tmp_path):
    path = _write(tmp_path, "c.csv", ["TIMESTAMP,ContextTokens", "2023-11-16 18:17:03.0000000,1"])
    with pytest.raises(TraceError, match=r"c\.csv:1: wrong columns for a azure trace: expected \['TIMESTAMP', "
                                         r"'ContextTokens', 'GeneratedTokens'\], found \['TIMESTAMP', "
                                         r"'ContextTokens'\]"):
        load_csv_trace(path, "azure")
    path = _write(tmp_path, "d.csv", [AZURE_HEADER, GOOD_AZURE])
    with pytest.raises(TraceError, match="expected \\['Timestamp', 'Model'"):
        load_burstgpt(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(TraceError, match="empty file; expected a header TIMESTAMP,ContextTokens,GeneratedTokens"):
        load_csv_trace(empty, "azure")
    header_only = _write(tmp_path, "h.csv", [AZURE_HEADER])
    with pytest.raises(TraceError, match="no requests left: 0 data rows"):
        load_csv_trace(header_only, "azure")
    all_bad = _write(tmp_path, "x.csv", [AZURE_HEADER, "bad,1,1"])
    with pytest.raises(TraceError, match="no requests left: 1 data rows, 1 malformed and skipped"):
        load_csv_trace(all_bad, "azure", on_bad_row="skip")
    with pytest.raises(TraceError, match="does not exist"):
        load_csv_trace(tmp_path / "missing.csv", "azure")


def test_bad_arguments(tmp_path):
    path = _write(tmp_path, "ok.csv", [AZURE_HEADER, GOOD_AZURE])
    with pytest.raises(TraceError, match="unknown trace format 'parquet'"):
        load_csv_trace(path, "parquet")
    with pytest.raises(TraceError, match="on_bad_row='ignore'"):
        load_csv_trace(path, "azure", on_bad_row="ignore")
    with pytest.raises(TraceError, match=r"cannot filter azure traces on \['Model'\]"):
        load_csv_trace(path, "azure", filters={"Model": "ChatGPT"})
    with pytest.raises(TraceError, match="unknown Azure trace kind 'chat'"):
        load_azure("chat")
