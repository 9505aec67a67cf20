"""Serving metrics of a replay: latency distributions, SLO attainment, throughput and goodput.

Definitions (all times in seconds; a *record* is a :class:`~morphserve.harness.records.RequestRecord`):

* **Distributions** (TTFT, TPOT, E2E, queueing delay) are over the requests that finished (``status == "ok"``);
  percentiles use linear interpolation between order statistics (``numpy.percentile``'s default, Hyndman-Fan type
  7), so P50 of ``1..100`` is 50.5 and P99 is 99.01.
* **SLOs.**  A request meets the TTFT SLO when it finished and ``ttft_s <= slo.ttft_s``.  It meets the TPOT SLO
  when it finished and its mean time per output token after the first is ``<= slo.tpot_s`` (a request with a single
  output token has no TPOT and meets it vacuously).  Violation rates are over *every request of the workload*:
  a request that ended in an error record never produced its tokens in time and counts as violating both SLOs, so
  rejecting requests can never improve an SLO number.
* **Makespan** is from the earliest scheduled arrival to the last completion (finish or error) of any request.
  **Throughput** is output tokens, and finished requests, per second of makespan; **goodput** is the number of
  requests meeting both SLOs per second of makespan.
* **Engine timeline** (:func:`timeline_summary`): per-step samples of the engine, summarised as distributions of
  KV utilisation (used / total blocks), queue length and running requests over steps, total preemptions, the range
  of the KV pool's size (it changes when the KV cache is resized) and of the number of full-precision layers.
* **Driver lag** is how late each request was submitted relative to its scheduled arrival.  The replay *fell
  behind* when any lag exceeds ``lag_tolerance_s``; the latencies of such a run include the driver's delay.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from morphserve.harness.records import RequestRecord, TimelineRow

TTFT_SLO_S = 2.0  # the paper's TTFT SLO
# The paper states no TPOT SLO; 0.2 s per token (5 tokens/s, about reading speed) is this project's default for
# interactive serving.  Every aggregates file records the SLOs it was computed with.
TPOT_SLO_S = 0.2
LAG_TOLERANCE_S = 0.05
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class SLO:
    ttft_s: float = TTFT_SLO_S
    tpot_s: float = TPOT_SLO_S

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"SLO {name}={v!r} must be a positive number of seconds")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, min, P50, P95, P99 and max of ``values`` (all None, count 0, when empty)."""
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    out: dict[str, float | int | None] = {"count": int(vals.size)}
    if vals.size == 0:
        out.update(mean=None, min=None, **{f"p{p}": None for p in PERCENTILES}, max=None)
        return out
    if not np.all(np.isfinite(vals)):
        raise ValueError(f"non-finite value in a latency distribution: {vals[~np.isfinite(vals)][0]!r}")
    out["mean"] = float(vals.mean())
    out["min"] = float(vals.min())
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(vals, p))
    out["max"] = float(vals.max())
    return out


def meets_ttft(r: RequestRecord, slo: SLO) -> bool:
    return r.ok and r.ttft_s is not None and r.ttft_s <= slo.ttft_s


def meets_tpot(r: RequestRecord, slo: SLO) -> bool:
    return r.ok and (r.tpot_s is None or r.tpot_s <= slo.tpot_s)


def makespan_s(records: Sequence[RequestRecord]) -> float | None:
    """From the earliest scheduled arrival to the last completion; None when nothing completed."""
    ends = [r.finished_s for r in records if r.finished_s is not None]
    if not records or not ends:
        return None
    return max(ends) - min(r.scheduled_s for r in records)


def _rate(n: int, span: float | None) -> float | None:
    return None if span is None or span <= 0 else n / span


def aggregate(records: Sequence[RequestRecord], slo: SLO = SLO(),
              lag_tolerance_s: float = LAG_TOLERANCE_S) -> dict[str, Any]:
    """The aggregates of a replay (see the module docstring for every definition)."""
    if lag_tolerance_s < 0:
        raise ValueError(f"lag_tolerance_s={lag_tolerance_s!r} must be >= 0")
    ids = Counter(r.request_id for r in records)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise ValueError(f"request id {dup[0]!r} has {ids[dup[0]]} records; each request must have exactly one")
    n = len(records)
    ok = [r for r in records if r.ok]
    errors = Counter(r.error_kind for r in records if not r.ok)
    ttft_ok = sum(meets_ttft(r, slo) for r in records)
    tpot_ok = sum(meets_tpot(r, slo) for r in records)
    both = sum(meets_ttft(r, slo) and meets_tpot(r, slo) for r in records)
    span = makespan_s(records)
    out_tokens = sum(r.output_tokens for r in ok)
    lags = [r.lag_s for r in records if r.lag_s is not None]
    late = [lag for lag in lags if lag > lag_tolerance_s]

    def rate(k: int) -> float | None:
        return None if n == 0 else k / n

    return {
        "requests": {"total": n, "ok": len(ok), "errors": n - len(ok),
                     "errors_by_kind": dict(sorted((str(k), v) for k, v in errors.items())),
                     "finish_reasons": dict(sorted(Counter(r.finish_reason for r in ok).items()))},
        "latency_s": {
            "ttft": distribution([r.ttft_s for r in ok]),
            "tpot": distribution([r.tpot_s for r in ok]),
            "e2e": distribution([r.e2e_s for r in ok]),
            "queueing_delay": distribution([r.queueing_delay_s for r in ok]),
        },
        "slo": {
            **slo.to_dict(),
            "ttft_violations": n - ttft_ok, "ttft_violation_rate": rate(n - ttft_ok),
            "tpot_violations": n - tpot_ok, "tpot_violation_rate": rate(n - tpot_ok),
            "any_violations": n - both, "any_violation_rate": rate(n - both),
            "met_both": both,
        },
        "throughput": {
            "makespan_s": span,
            "prompt_tokens": sum(r.prompt_tokens for r in ok),
            "output_tokens": out_tokens,
            "output_tokens_per_s": _rate(out_tokens, span),
            "requests_per_s": _rate(len(ok), span),
            "goodput_requests_per_s": _rate(both, span),
        },
        "driver": {
            "lag_s": distribution(lags),
            "lag_tolerance_s": lag_tolerance_s,
            "late_submissions": len(late),
            "fell_behind": bool(late),
        },
    }


def timeline_summary(rows: Sequence[TimelineRow]) -> dict[str, Any]:
    """Per-step engine state of a replay, summarised (distributions are over steps, not over time)."""
    if not rows:
        return {"steps": 0}
    out: dict[str, Any] = {
        "steps": len(rows),
        "busy_s": sum(r.duration_s for r in rows),
        "kv_utilization": distribution([r.kv_utilization for r in rows]),
        "num_waiting": distribution([float(r.num_waiting) for r in rows]),
        "num_running": distribution([float(r.num_running) for r in rows]),
        "preemptions": sum(r.num_preempted for r in rows),
        "kv_total_blocks": {"min": min(r.kv_total_blocks for r in rows), "max": max(r.kv_total_blocks for r in rows)},
    }
    if any(r.precisions for r in rows):
        out["num_fp16_layers"] = {"min": min(r.num_fp16 for r in rows), "max": max(r.num_fp16 for r in rows)}
        out["precision_changes"] = sum(a.precisions != b.precisions for a, b in zip(rows, rows[1:]))
    return out
