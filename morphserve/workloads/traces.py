"""Request-arrival traces: what arrives when, and how long its prompt and response are.

A :class:`Trace` is an ordered list of :class:`TraceRequest` (arrival time in seconds from the trace's start, prompt
tokens, output tokens) with a name, a human-readable source, a ``synthetic`` flag and a ``meta`` dict that records
where the trace came from and every transformation applied to it (``meta["lineage"]``).  The open-loop replay harness
submits request *i* at ``arrival_s`` after the replay starts, whatever the engine is doing.

Sources
    * :func:`load_azure`: the Azure LLM Inference trace 2023 (``code`` or ``conv``), resolved through the data manifest
      (``morphserve.data.mirror.resolve``) and checksum-verified.
    * :func:`load_burstgpt`: the official BurstGPT CSV (``BurstGPT_1.csv``).  It is not in the offline mirror and the
      manifest pins no checksum, so by default it raises ``DataMissing`` unless a copy was placed by hand.
    * :func:`synthetic_burstgpt`: a generator with BurstGPT's published shape (Gamma renewal arrivals, Zipf request
      lengths, bimodal response lengths), always labelled ``synthetic=True``; :func:`burstgpt_or_synthetic` returns
      the real trace when it is available and this generator otherwise.

Transformations (each returns a new trace; the input is never modified)
    * :func:`select_window`: the paper replays a 72 s segment without saying which; the default picks the busiest.
    * :func:`downsample`: the paper "downsampled 4.75x" (Azure) and "1.75x" (BurstGPT) without saying how; ``thin``
      (default) drops requests at random, ``stretch`` slows time down.
    * :func:`scale_rate` (compress or expand time to fit other hardware) and :func:`truncate` (first N requests).

Every derived trace keeps ``synthetic`` and ``source`` of its parent, so a synthetic label survives any chain of
transformations, and appends one step to ``meta["lineage"]`` naming the operation and its parameters (window bounds,
downsampling factor and mode, rate factor, seed, requests kept).

Input errors
    Malformed rows (bad timestamp, missing, negative or non-numeric token counts, wrong number of fields) raise
    :class:`TraceError` naming the file, the line and the bad value; with ``on_bad_row="skip"`` they are skipped
    instead and counted by reason in ``meta["skipped_rows"]`` (and logged), never dropped silently.  A file that is not
    sorted by time raises naming the first out-of-order line, unless ``sort=True`` (recorded in meta).  A wrong header
    raises listing the expected and found columns; a trace left empty after filtering raises.

Times are kept in integer nanoseconds while parsing (Azure timestamps carry 7 fractional digits, i.e. 100 ns ticks,
which Python's ``datetime`` cannot hold) and converted to float seconds relative to the first request only after the
subtraction, so no precision is lost to the absolute epoch.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import hashlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from tqdm import tqdm

from morphserve.data.mirror import DataMissing, manifest_entry, resolve

log = logging.getLogger(__name__)

OnBadRow = Literal["raise", "skip"]
DownsampleMode = Literal["thin", "stretch"]
WindowRule = Literal["busiest", "start", "offset"]

PAPER_WINDOW_S = 72.0
"""Length of the trace segment the MorphServe paper replays (both Azure and BurstGPT)."""

_MAX_REPORTED_SKIPS = 20  # skipped rows quoted verbatim in meta["skipped_rows"]["first"]; all are counted


class TraceError(ValueError):
    """A trace file or trace operation that cannot produce a valid trace; the message names the bad value."""


# ---- data types --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace.

    ``arrival_s``: seconds from the trace's start (>= 0).  ``prompt_tokens``, ``output_tokens``: lengths in tokens of
    the request's prompt and of its response (>= 1 each: a request needs a prompt and produces at least one token).
    """

    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        a = self.arrival_s
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < math.inf:  # NaN fails too
            raise TraceError(f"invalid arrival_s={a!r}: must be a finite number of seconds >= 0")
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if type(value) is int and value >= 1:  # the common case, checked first (traces hold millions)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise TraceError(f"invalid {name}={value!r}: must be an integer >= 1")


@dataclass
class Trace:
    """An ordered request-arrival trace.

    ``requests`` are sorted by arrival (ties keep file order).  ``source`` says where the requests come from (a file
    and its canonical origin, or ``"synthetic: ..."``); ``synthetic`` is True for generated traces and is inherited by
    every derived trace.  ``meta`` holds loader facts (file, sha256, rows read, skipped/failed/filtered counts) and
    ``meta["lineage"]``, the list of transformations applied, oldest first.

    ``span_s`` is the length of the observation period ``[0, span_s]`` when it is known to extend past the last
    arrival: the window length for a window cut from a longer trace, the requested duration for a generated trace.
    When it is None the period ends at the last arrival.
    """

    name: str
    requests: list[TraceRequest]
    source: str
    synthetic: bool
    meta: dict[str, Any] = field(default_factory=dict)
    span_s: float | None = None

    def __post_init__(self) -> None:
        if not self.requests:
            raise TraceError(f"trace {self.name!r} has no requests")
        prev = -1.0
        for i, r in enumerate(self.requests):
            if not isinstance(r, TraceRequest):
                raise TraceError(f"trace {self.name!r}: request {i} is a {type(r).__name__}, not a TraceRequest")
            if r.arrival_s < prev:
                raise TraceError(f"trace {self.name!r}: request {i} arrives at {r.arrival_s} s, before request "
                                 f"{i - 1} at {prev} s; requests must be sorted by arrival")
            prev = r.arrival_s
        if self.span_s is not None:
            if not isinstance(self.span_s, (int, float)) or not math.isfinite(self.span_s) or self.span_s < prev:
                raise TraceError(f"trace {self.name!r}: span_s={self.span_s!r} must be a finite number >= the last "
                                 f"arrival ({prev} s)")
        self.meta.setdefault("lineage", [])

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        """Length of the observation period in seconds: ``span_s`` when set, else the last arrival."""
        return float(self.span_s) if self.span_s is not None else self.requests[-1].arrival_s

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests per second over the observation period (NaN for a zero-length trace)."""
        duration = self.duration_s
        return len(self.requests) / duration if duration > 0 else math.nan

    def arrival_times(self) -> np.ndarray:
        """Arrival times in seconds (float64, sorted)."""
        return np.fromiter((r.arrival_s for r in self.requests), dtype=np.float64, count=len(self.requests))

    def prompt_lengths(self) -> np.ndarray:
        """Prompt lengths in tokens (int64)."""
        return np.fromiter((r.prompt_tokens for r in self.requests), dtype=np.int64, count=len(self.requests))

    def output_lengths(self) -> np.ndarray:
        """Output lengths in tokens (int64)."""
        return np.fromiter((r.output_tokens for r in self.requests), dtype=np.int64, count=len(self.requests))

    def summary(self) -> dict[str, Any]:
        """Load and length statistics (JSON-serialisable).

        ``rate_rps``: requests / duration.  ``rate_1s_*``: mean, median and 95th percentile of the number of
        arrivals in each 1 s bin ``[k, k+1)`` of the observation period (an arrival exactly at its end counts in the
        last bin).  ``interarrival_cv``: burstiness, the coefficient of variation (population std / mean) of the gaps
        between consecutive arrivals: 1 for a Poisson process, > 1 burstier (NaN with fewer than two gaps or a zero
        mean gap).  Token statistics: mean, median and 95th percentile (linear interpolation) in tokens.
        """
        arrivals = self.arrival_times()
        n_bins = max(1, math.ceil(self.duration_s))
        bins = np.minimum(np.floor(arrivals).astype(np.int64), n_bins - 1)
        per_bin = np.bincount(bins, minlength=n_bins).astype(np.float64)
        gaps = np.diff(arrivals)
        cv = float(gaps.std() / gaps.mean()) if len(gaps) >= 2 and gaps.mean() > 0 else math.nan

        def stats(values: np.ndarray) -> dict[str, float]:
            return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
                    "p95": float(np.percentile(values, 95))}

        return {
            "name": self.name,
            "source": self.source,
            "synthetic": self.synthetic,
            "count": len(self.requests),
            "duration_s": self.duration_s,
            "rate_rps": self.rate,
            "rate_1s_mean": float(per_bin.mean()),
            "rate_1s_p50": float(np.percentile(per_bin, 50)),
            "rate_1s_p95": float(np.percentile(per_bin, 95)),
            "interarrival_cv": cv,
            "prompt_tokens": stats(self.prompt_lengths()),
            "output_tokens": stats(self.output_lengths()),
        }


def _derive(parent: Trace, requests: list[TraceRequest], span_s: float | None, name_suffix: str,
            step: dict[str, Any]) -> Trace:
    """A new trace built from ``parent``: same source and synthetic label, parent's meta plus one lineage step."""
    meta = copy.deepcopy(parent.meta)
    meta.setdefault("lineage", []).append({**step, "parent": parent.name, "parent_requests": len(parent.requests),
                                           "requests": len(requests)})
    return Trace(name=f"{parent.name}/{name_suffix}", requests=requests, source=parent.source,
                 synthetic=parent.synthetic, meta=meta, span_s=span_s)


# ---- CSV formats -------------------------------------------------------------------------------------------------

_AZURE_TS = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,7}))?")
_DECIMAL = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?")
_NS_PER_S = 1_000_000_000


class _BadValue(Exception):
    """A malformed row: ``reason`` is its category (counted when skipping), the message quotes the bad value."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_azure_timestamp(text: str) -> int:
    """Nanoseconds since 0001-01-01 of a naive Azure timestamp ``YYYY-MM-DD HH:MM:SS[.fffffff]``.

    Up to 7 fractional digits (100 ns ticks) are kept exactly; more digits, a time zone, or an impossible date or time
    raise ValueError.
    """
    m = _AZURE_TS.fullmatch(text)
    if m is None:
        raise ValueError("expected YYYY-MM-DD HH:MM:SS.fffffff (at most 7 fractional digits, no time zone)")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    try:
        _dt.datetime(year, month, day, hour, minute, second)  # validates ranges (month 13, hour 25, Feb 30)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    whole_s = (_dt.date(year, month, day).toordinal() * 86400 + hour * 3600 + minute * 60 + second)
    frac = (m.group(7) or "").ljust(9, "0")  # pad to nanoseconds
    return whole_s * _NS_PER_S + int(frac)


def parse_seconds(text: str) -> int:
    """Nanoseconds of a non-negative decimal number of seconds (``5``, ``5.25``, ``1.5e3``); NaN, infinities and
    negative values raise ValueError."""
    if _DECIMAL.fullmatch(text) is None:
        raise ValueError("expected a non-negative decimal number of seconds")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return round(value * _NS_PER_S)


def _parse_count(text: str, column: str, minimum: int) -> int:
    if text.isdigit() and text.isascii():  # the common case first
        value = int(text)
        if value >= minimum:
            return value
        raise _BadValue(f"{column} < {minimum}", f"{column} {text!r} must be >= {minimum}")
    if text == "":
        raise _BadValue(f"missing {column}", f"missing {column} (empty field)")
    if text.startswith("-") and text[1:].isascii() and text[1:].isdigit():
        raise _BadValue(f"negative {column}", f"negative {column} {text!r}")
    try:
        float(text)
        kind = "non-integer"
    except ValueError:
        kind = "non-numeric"
    raise _BadValue(f"{kind} {column}", f"{kind} {column} {text!r}")


@dataclass(frozen=True)
class CsvTraceFormat:
    """How to read one trace CSV layout.

    ``columns``: the exact header.  ``time_column`` is parsed by ``parse_time`` into integer nanoseconds on any fixed
    origin.  ``failed_if_zero_output``: rows with 0 output tokens are failed requests to drop and count (BurstGPT)
    rather than malformed rows.  ``filters``: columns a caller may filter on by exact value.
    """

    name: str
    columns: tuple[str, ...]
    time_column: str
    prompt_column: str
    output_column: str
    parse_time: Callable[[str], int]
    failed_if_zero_output: bool = False
    total_column: str | None = None
    filters: tuple[str, ...] = ()


AZURE_FORMAT = CsvTraceFormat(
    name="azure", columns=("TIMESTAMP", "ContextTokens", "GeneratedTokens"), time_column="TIMESTAMP",
    prompt_column="ContextTokens", output_column="GeneratedTokens", parse_time=parse_azure_timestamp)

BURSTGPT_FORMAT = CsvTraceFormat(
    name="burstgpt",
    columns=("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"),
    time_column="Timestamp", prompt_column="Request tokens", output_column="Response tokens",
    parse_time=parse_seconds, failed_if_zero_output=True, total_column="Total tokens", filters=("Model", "Log Type"))

FORMATS: dict[str, CsvTraceFormat] = {f.name: f for f in (AZURE_FORMAT, BURSTGPT_FORMAT)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_csv_trace(path: Path | str, format: str | CsvTraceFormat, *, name: str | None = None,
                   source: str | None = None, on_bad_row: OnBadRow = "raise", sort: bool = False,
                   filters: dict[str, str] | None = None) -> Trace:
    """Read a trace CSV of a known layout (``"azure"``, ``"burstgpt"`` or a :class:`CsvTraceFormat`).

    The header must be exactly ``format.columns``.  Each data row becomes one request; arrivals are re-based so the
    first kept request arrives at 0 (its raw timestamp is kept in ``meta["t0"]``).  ``filters`` keeps only rows whose
    named columns (``format.filters``) equal the given values; the rows filtered out are counted.  Rows with 0 output
    tokens are failed requests in formats that say so (dropped, counted in ``meta["failed_rows"]``) and malformed
    elsewhere.

    Malformed rows raise :class:`TraceError` (``path:line: ...`` with the bad value) unless ``on_bad_row="skip"``,
    which skips and counts them in ``meta["skipped_rows"]`` (``total``, ``by_reason``, the first few messages).  Rows
    must be in non-decreasing time order; otherwise the first out-of-order line is named, unless ``sort=True``, which
    sorts them (stable) and records ``meta["sorted_by_loader"]`` and ``meta["out_of_order_rows"]``.
    """
    fmt = FORMATS.get(format) if isinstance(format, str) else format
    if fmt is None:
        raise TraceError(f"unknown trace format {format!r}; known formats: {', '.join(sorted(FORMATS))}")
    if on_bad_row not in ("raise", "skip"):
        raise TraceError(f"on_bad_row={on_bad_row!r}: must be 'raise' or 'skip'")
    filters = dict(filters or {})
    unknown = sorted(set(filters) - set(fmt.filters))
    if unknown:
        raise TraceError(f"cannot filter {fmt.name} traces on {unknown}; filterable columns: {list(fmt.filters)}")
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {path} does not exist")

    col = {c: i for i, c in enumerate(fmt.columns)}
    filter_idx = [(col[c], v) for c, v in filters.items()]
    skipped: Counter[str] = Counter()
    skipped_first: list[str] = []
    filtered = 0
    failed = 0
    total_mismatch = 0
    out_of_order = 0
    rows_read = 0
    # kept rows, in file order: times (ns), prompt and output tokens; the raw timestamp of the earliest
    times: list[int] = []
    prompts: list[int] = []
    outputs: list[int] = []
    t0_ns, t0_raw = 0, ""
    prev_ns: int | None = None  # the latest time seen so far, on line prev_line as prev_raw
    prev_line, prev_raw = 0, ""

    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path}: empty file; expected a header {','.join(fmt.columns)}")
        if tuple(h.strip() for h in header) != fmt.columns:
            raise TraceError(f"{path}:1: wrong columns for a {fmt.name} trace: expected {list(fmt.columns)}, "
                             f"found {header}")
        for row in tqdm(reader, desc=f"reading {path.name}", unit=" rows", disable=None, leave=False,
                        mininterval=1.0):
            rows_read += 1
            line = reader.line_num
            try:
                if len(row) != len(fmt.columns):
                    raise _BadValue("wrong field count", f"{len(row)} fields {row!r}; expected "
                                                         f"{len(fmt.columns)} ({','.join(fmt.columns)})")
                raw_ts = row[col[fmt.time_column]].strip()
                try:
                    t_ns = fmt.parse_time(raw_ts)
                except ValueError as exc:
                    raise _BadValue(f"bad {fmt.time_column}", f"bad {fmt.time_column} {raw_ts!r}: {exc}") from None
                output = _parse_count(row[col[fmt.output_column]].strip(), fmt.output_column,
                                      0 if fmt.failed_if_zero_output else 1)
                # a failed request (0 output tokens) may have failed before its prompt was counted
                prompt = _parse_count(row[col[fmt.prompt_column]].strip(), fmt.prompt_column,
                                      0 if output == 0 else 1)
                if fmt.total_column is not None:
                    total = _parse_count(row[col[fmt.total_column]].strip(), fmt.total_column, 0)
                    total_mismatch += total != prompt + output
            except _BadValue as bad:
                message = f"{path}:{line}: {bad}"
                if on_bad_row == "raise":
                    raise TraceError(message + " (pass on_bad_row='skip' to skip and count such rows)") from None
                skipped[bad.reason] += 1
                if len(skipped_first) < _MAX_REPORTED_SKIPS:
                    skipped_first.append(message)
                continue

            if prev_ns is not None and t_ns < prev_ns:
                if not sort:
                    raise TraceError(f"{path}:{line}: {fmt.time_column} {raw_ts!r} is earlier than {prev_raw!r} on "
                                     f"line {prev_line}; the file must be sorted by time (pass sort=True to sort "
                                     f"it, which is recorded in the trace's meta)")
                out_of_order += 1
            else:
                prev_ns, prev_line, prev_raw = t_ns, line, raw_ts
            if any(row[i].strip() != value for i, value in filter_idx):
                filtered += 1
                continue
            if output == 0:
                failed += 1
                continue
            if not times or t_ns < t0_ns:
                t0_ns, t0_raw = t_ns, raw_ts
            times.append(t_ns)
            prompts.append(prompt)
            outputs.append(output)

    skipped_total = sum(skipped.values())
    if skipped_total:
        log.warning("%s: skipped %d malformed rows: %s", path, skipped_total, dict(skipped))
    if not times:
        raise TraceError(f"{path}: no requests left: {rows_read} data rows, {skipped_total} malformed and skipped, "
                         f"{failed} failed (0 {fmt.output_column}), {filtered} filtered out by {filters or 'nothing'}")
    order = range(len(times))
    if out_of_order:
        order = sorted(order, key=times.__getitem__)  # stable: equal times keep file order
    requests = [TraceRequest((times[i] - t0_ns) / _NS_PER_S, prompts[i], outputs[i]) for i in order]

    meta: dict[str, Any] = {
        "format": fmt.name,
        "file": str(path),
        "sha256": _sha256(path),
        "rows_read": rows_read,
        "t0": t0_raw,
        "skipped_rows": {"total": skipped_total, "by_reason": dict(skipped), "first": skipped_first},
        "sorted_by_loader": bool(out_of_order),
        "out_of_order_rows": out_of_order,
    }
    if fmt.failed_if_zero_output:
        meta["failed_rows"] = failed
    if filters:
        meta["filters"] = filters
        meta["filtered_rows"] = filtered
    if fmt.total_column is not None:
        meta["total_tokens_mismatch_rows"] = total_mismatch
    meta["lineage"] = []
    return Trace(name=name or path.stem, requests=requests, source=source or f"{fmt.name} CSV {path}",
                 synthetic=False, meta=meta)


# ---- Azure LLM Inference 2023 ------------------------------------------------------------------------------------

def load_azure(kind: Literal["code", "conv"], *, on_bad_row: OnBadRow = "raise", sort: bool = False) -> Trace:
    """The Azure LLM Inference trace 2023 (``kind``: ``"code"`` or ``"conv"``) from the data manifest.

    The file is resolved (mirror, cache or download) and checksum-verified by ``morphserve.data.mirror.resolve``.
    Columns ``TIMESTAMP,ContextTokens,GeneratedTokens``; timestamps are naive with 100 ns resolution.  Arrivals are in
    seconds from the first request; ``meta["t0"]`` is its raw timestamp.
    """
    if kind not in ("code", "conv"):
        raise TraceError(f"unknown Azure trace kind {kind!r}; expected 'code' or 'conv'")
    file_id = f"azure_{kind}"
    entry = manifest_entry(file_id)
    path = resolve(file_id)
    trace = load_csv_trace(path, AZURE_FORMAT, name=file_id, on_bad_row=on_bad_row, sort=sort,
                           source=f"Azure LLM Inference trace 2023 ({kind}), {entry.url} ({entry.license})")
    trace.meta["manifest_id"] = file_id
    return trace


# ---- BurstGPT ----------------------------------------------------------------------------------------------------

def load_burstgpt(path: Path | str | None = None, *, model: str | None = None, log_type: str | None = None,
                  on_bad_row: OnBadRow = "raise", sort: bool = False) -> Trace:
    """The official BurstGPT CSV (columns ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``).

    ``Timestamp`` is seconds from the start of the trace's first day; arrivals are re-based to the first request
    (``meta["t0"]`` keeps its raw value).  Failed requests (0 response tokens) are dropped and counted in
    ``meta["failed_rows"]``.  ``model`` (e.g. ``"ChatGPT"``) and ``log_type`` (e.g. ``"Conversation log"``) keep only
    matching rows.  The default path is ``resolve("burstgpt")``, which raises ``DataMissing`` unless a copy was placed
    at the mirror or cache path (the file is not mirrored and has no pinned checksum).
    """
    manifest_id = None
    if path is None:
        manifest_id = "burstgpt"
        path = resolve(manifest_id)
    filters = {k: v for k, v in (("Model", model), ("Log Type", log_type)) if v is not None}
    entry = manifest_entry("burstgpt")
    trace = load_csv_trace(path, BURSTGPT_FORMAT, name="burstgpt", on_bad_row=on_bad_row, sort=sort,
                           filters=filters, source=f"BurstGPT ({entry.homepage}, {entry.license}): {path}")
    if manifest_id is not None:
        trace.meta["manifest_id"] = manifest_id
    return trace


@dataclass(frozen=True)
class BurstGPTShape:
    """Parameters of :func:`synthetic_burstgpt` and where each one comes from.

    Sources: the BurstGPT paper (Wang et al., "BurstGPT: A Real-world Workload Dataset to Optimize LLM Serving
    Systems", arXiv 2401.17644) models request arrivals with a Gamma distribution, request lengths with a Zipf
    distribution, and shows ChatGPT response lengths as bimodal with a long tail.  Its benchmark generator
    (HPMLL/BurstGPT, ``example/src/burstgpt/config.py`` at commit 01131e1b, "Modeled Scaling") draws inter-arrival gaps
    from ``Gamma(shape=0.5, scale=2.0)`` and lengths from ``Zipf(a=1.1)`` below a 1024-token cap.  We did not have
    the paper's fitted per-service parameters or the trace itself offline, so:

    * ``gamma_shape`` = 0.5 and ``prompt_zipf_exponent`` = 1.1 with the cap 1024 are BurstGPT-Perf's defaults;
    * the response mixture (``output_*``) is this project's choice, made only to have the qualitative shape the paper
      reports (two modes, long tail); it is not fitted to BurstGPT data.

    Arrivals: a Gamma renewal process.  Gaps are i.i.d. ``Gamma(k, 1 / (k * mean_rate))``, so the mean rate is
    ``mean_rate`` and the coefficient of variation of the gaps is ``1 / sqrt(k)`` (sqrt(2) = 1.414 at k = 0.5, versus 1
    for Poisson).

    Prompt tokens: a truncated Zipf law, ``P(L = l) ~ l ** -prompt_zipf_exponent`` for ``prompt_min <= l <=
    prompt_max``.  With the defaults (exponent 1.1 on [1, 1024]) this gives, exactly from the pmf: P(L = 1) = 0.179,
    median 12, mean 101.8, 95th percentile 595 tokens: short prompts dominate and the tail is heavy.  (The MorphServe
    evaluation pads or truncates each prompt to a fixed length, so the arrivals matter more than these lengths.)

    Output tokens: with probability ``output_short_weight`` a short log-normal mode (median ``output_short_median``,
    log-std ``output_short_sigma``), else a long one (median ``output_long_median``, log-std ``output_long_sigma``);
    rounded to integers, at least 1, and capped at ``output_max``.  With the defaults the modes are at about 30 and
    350 tokens, the density of ``ln(L)`` between them dips to about a fifth of the short peak, and 39.6% of outputs are
    at most sqrt(30 * 350) = 102.5 tokens.
    """

    gamma_shape: float = 0.5
    prompt_zipf_exponent: float = 1.1
    prompt_min: int = 1
    prompt_max: int = 1024
    output_short_weight: float = 0.4
    output_short_median: float = 30.0
    output_short_sigma: float = 0.6
    output_long_median: float = 350.0
    output_long_sigma: float = 0.5
    output_max: int = 2048

    def __post_init__(self) -> None:
        positive = ("gamma_shape", "prompt_zipf_exponent", "output_short_median", "output_short_sigma",
                    "output_long_median", "output_long_sigma")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise TraceError(f"invalid BurstGPTShape.{name}={value!r}: must be a finite number > 0")
        if not 0.0 <= self.output_short_weight <= 1.0:
            raise TraceError(f"invalid BurstGPTShape.output_short_weight={self.output_short_weight!r}: must be in "
                             f"[0, 1]")
        if not (isinstance(self.prompt_min, int) and isinstance(self.prompt_max, int)
                and 1 <= self.prompt_min <= self.prompt_max):
            raise TraceError(f"invalid prompt range [{self.prompt_min!r}, {self.prompt_max!r}]: need integers "
                             f"1 <= prompt_min <= prompt_max")
        if not isinstance(self.output_max, int) or self.output_max < 1:
            raise TraceError(f"invalid BurstGPTShape.output_max={self.output_max!r}: must be an integer >= 1")

    def describe(self) -> str:
        return (f"Gamma renewal arrivals shape={self.gamma_shape} (gap CV {1 / math.sqrt(self.gamma_shape):.3f}); "
                f"Zipf prompt tokens a={self.prompt_zipf_exponent} on [{self.prompt_min}, {self.prompt_max}]; "
                f"bimodal log-normal output tokens {self.output_short_weight:g} x median {self.output_short_median:g} "
                f"(sigma {self.output_short_sigma:g}) + {1 - self.output_short_weight:g} x median "
                f"{self.output_long_median:g} (sigma {self.output_long_sigma:g}), max {self.output_max}")


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise TraceError(f"invalid {name}={value!r}: must be a finite number > 0")
    return float(value)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TraceError(f"invalid seed={seed!r}: must be an integer >= 0")
    return seed


def synthetic_burstgpt(duration_s: float, mean_rate: float, seed: int,
                       shape: BurstGPTShape = BurstGPTShape()) -> Trace:
    """A synthetic trace with BurstGPT's published shape over ``[0, duration_s]`` at ``mean_rate`` requests/s.

    See :class:`BurstGPTShape` for the model and the source of each parameter.  The renewal process starts at 0 (the
    first arrival is one gap after 0).  Deterministic in ``seed``.  The result is labelled ``synthetic=True`` with a
    ``source`` starting ``"synthetic: BurstGPT-shaped generator"``; both survive every transformation.
    """
    duration_s = _check_positive("duration_s", duration_s)
    mean_rate = _check_positive("mean_rate", mean_rate)
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    scale = 1.0 / (shape.gamma_shape * mean_rate)
    arrivals = np.cumsum(rng.gamma(shape.gamma_shape, scale, size=int(duration_s * mean_rate * 1.2) + 64))
    while arrivals[-1] < duration_s:  # rare: the first draw ended early; extend the same stream
        more = np.cumsum(rng.gamma(shape.gamma_shape, scale, size=int(duration_s * mean_rate * 0.5) + 64))
        arrivals = np.concatenate([arrivals, arrivals[-1] + more])
    arrivals = arrivals[arrivals <= duration_s]
    n = len(arrivals)
    if n == 0:
        raise TraceError(f"synthetic BurstGPT trace over {duration_s} s at {mean_rate} req/s (seed {seed}) produced no "
                         f"requests; use a longer duration or a higher rate")

    support = np.arange(shape.prompt_min, shape.prompt_max + 1)
    cdf = np.cumsum(support.astype(np.float64) ** -shape.prompt_zipf_exponent)
    cdf /= cdf[-1]
    prompts = support[np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(support) - 1)]

    short = rng.random(n) < shape.output_short_weight
    log_median = np.where(short, math.log(shape.output_short_median), math.log(shape.output_long_median))
    log_sigma = np.where(short, shape.output_short_sigma, shape.output_long_sigma)
    outputs = np.clip(np.rint(np.exp(log_median + log_sigma * rng.standard_normal(n))), 1, shape.output_max)

    requests = [TraceRequest(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]
    meta = {"generator": "synthetic_burstgpt", "seed": seed, "duration_s": duration_s, "mean_rate": mean_rate,
            "shape": {k: getattr(shape, k) for k in shape.__dataclass_fields__}, "lineage": []}
    return Trace(name="burstgpt_synthetic", requests=requests, synthetic=True, meta=meta, span_s=duration_s,
                 source=f"synthetic: BurstGPT-shaped generator ({shape.describe()}; seed {seed}); "
                        f"NOT the BurstGPT trace")


def burstgpt_or_synthetic(seed: int, *, duration_s: float, mean_rate: float, path: Path | str | None = None,
                          model: str | None = None, log_type: str | None = None, on_bad_row: OnBadRow = "raise",
                          shape: BurstGPTShape = BurstGPTShape()) -> Trace:
    """The real BurstGPT trace when it is available, else :func:`synthetic_burstgpt` (``duration_s``, ``mean_rate``,
    ``seed``).

    Only a missing file (``DataMissing`` from the manifest lookup, when ``path`` is None) falls back; a file that
    exists but is corrupt or malformed raises.  The fallback is logged as a warning and recorded in
    ``meta["fallback_reason"]``; the synthetic trace carries ``synthetic=True`` and its ``"synthetic: ..."`` source.
    """
    try:
        return load_burstgpt(path, model=model, log_type=log_type, on_bad_row=on_bad_row)
    except DataMissing as exc:
        log.warning("BurstGPT trace unavailable (%s); using the SYNTHETIC BurstGPT-shaped generator instead", exc)
        trace = synthetic_burstgpt(duration_s, mean_rate, seed, shape)
        trace.meta["fallback_reason"] = str(exc)
        return trace


# ---- windows -----------------------------------------------------------------------------------------------------

def _busiest_start(arrivals: list[float], length_s: float, last_start: float) -> float:
    """Start of the half-open window ``[s, s + length_s)`` with the most arrivals, among ``0 <= s <= last_start``;
    ties go to the earliest start.

    Some optimal window starts at an arrival or at ``last_start``: sliding any window right until its start meets its
    first arrival loses no arrival (its end only grows), unless it would pass ``last_start``.  So only those
    candidates are scored, with two pointers over the sorted arrivals: O(n).
    """
    candidates = [a for a in arrivals if a <= last_start]
    if not candidates or candidates[-1] != last_start:
        candidates.append(last_start)
    best_start, best_count = candidates[0], -1
    lo = hi = 0
    n = len(arrivals)
    for s in candidates:  # non-decreasing
        while lo < n and arrivals[lo] < s:
            lo += 1
        end = s + length_s
        while hi < n and arrivals[hi] < end:
            hi += 1
        if hi - lo > best_count:
            best_start, best_count = s, hi - lo
    return best_start


def select_window(trace: Trace, length_s: float = PAPER_WINDOW_S, rule: WindowRule = "busiest",
                  offset_s: float | None = None) -> Trace:
    """The requests arriving in a half-open window ``[start, start + length_s)``, re-based so the window starts at 0.

    The MorphServe paper replays a 72 s segment of each trace but does not say which.  Rules:

    * ``"busiest"`` (default): the window with the most arrivals among all windows that lie inside the trace's
      observation period ``[0, duration_s]``; ties go to the earliest window that starts at an arrival.  The
      paper evaluates behaviour under load pressure, and the busiest segment is the reproducible choice that
      exercises it; found in O(n).
    * ``"start"``: the first ``length_s`` seconds.
    * ``"offset"``: the window starting at ``offset_s``.

    Windows are half-open, so an arrival exactly at ``start + length_s`` is left out (also when that is the trace's
    last arrival).  The result's ``duration_s`` is ``length_s``.  Lineage records the rule and the window bounds in
    the parent's time.
    A window longer than the trace, out of range, or holding no request raises :class:`TraceError`.
    """
    length_s = _check_positive("length_s", length_s)
    total = trace.duration_s
    if length_s > total:
        raise TraceError(f"window length {length_s} s exceeds trace {trace.name!r} duration {total} s")
    last_start = total - length_s
    if rule == "busiest":
        if offset_s is not None:
            raise TraceError(f"offset_s={offset_s!r} is only used with rule='offset'")
        start = _busiest_start([r.arrival_s for r in trace.requests], length_s, last_start)
    elif rule == "start":
        if offset_s is not None:
            raise TraceError(f"offset_s={offset_s!r} is only used with rule='offset'")
        start = 0.0
    elif rule == "offset":
        if isinstance(offset_s, bool) or not isinstance(offset_s, (int, float)) or not math.isfinite(offset_s) \
                or not 0 <= offset_s <= last_start:
            raise TraceError(f"offset_s={offset_s!r} must be a number in [0, {last_start}] so that the {length_s} s "
                             f"window fits in trace {trace.name!r} ({total} s)")
        start = float(offset_s)
    else:
        raise TraceError(f"unknown window rule {rule!r}; expected 'busiest', 'start' or 'offset'")
    end = start + length_s
    requests = [TraceRequest(r.arrival_s - start, r.prompt_tokens, r.output_tokens)
                for r in trace.requests if start <= r.arrival_s < end]
    if not requests:
        raise TraceError(f"window [{start}, {end}) s of trace {trace.name!r} holds no request")
    step = {"op": "select_window", "rule": rule, "length_s": length_s, "start_s": start, "end_s": end}
    return _derive(trace, requests, length_s, f"window[{rule},{start:g}+{length_s:g}s]", step)


# ---- downsampling and rate scaling -------------------------------------------------------------------------------

def _rescale_time(trace: Trace, multiplier: float, name_suffix: str, step: dict[str, Any]) -> Trace:
    requests = [TraceRequest(r.arrival_s * multiplier, r.prompt_tokens, r.output_tokens) for r in trace.requests]
    span = trace.span_s * multiplier if trace.span_s is not None else None
    return _derive(trace, requests, span, name_suffix, step)


def downsample(trace: Trace, factor: float, mode: DownsampleMode = "thin", seed: int = 0) -> Trace:
    """Lower the trace's load ``factor`` times (``factor >= 1``).

    * ``"thin"`` (default): keep each request independently with probability ``1 / factor`` (seeded).  The number
      kept is random (binomial, mean ``n / factor``); the exact count is recorded in the lineage step (``requests``).
      Time is untouched: the trace keeps its duration and the timing of its bursts.
    * ``"stretch"``: multiply every arrival time (and the duration) by ``factor``.  Every request is kept; the rate
      falls exactly ``factor`` times, and the trace lasts ``factor`` times longer.

    Why thinning is the default: the paper says it replays a *72 s* segment "downsampled 4.75x" (Azure) or "1.75x"
    (BurstGPT).  Stretching would turn that segment into 342 s or 126 s of replay.  Thinning keeps the 72 s segment,
    and it keeps the timescale of the load changes: when a burst starts and how long it lasts.  A reactive controller
    with hysteresis (pressure must persist over several forward passes) has to follow those timescales, and
    stretching would slow every burst 4.75x and make them easier to follow.  The cost of thinning is sampling noise:
    independent thinning pushes the gap distribution toward exponential, so the inter-arrival CV of a bursty trace
    moves toward 1.  The bursts that survive are the ones visible as rate changes over seconds, not as clumps of
    back-to-back requests.  ``stretch`` is provided for the other reading.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1:
        raise TraceError(f"invalid downsampling factor={factor!r}: must be a finite number >= 1 "
                         f"(use scale_rate to raise the load)")
    factor = float(factor)
    if mode == "thin":
        seed = _check_seed(seed)
        keep = np.random.default_rng(seed).random(len(trace.requests)) < 1.0 / factor
        requests = [r for r, k in zip(trace.requests, keep) if k]
        if not requests:
            raise TraceError(f"thinning trace {trace.name!r} ({len(trace.requests)} requests) by {factor}x with seed "
                             f"{seed} kept no request")
        step = {"op": "downsample", "mode": "thin", "factor": factor, "seed": seed,
                "expected_requests": len(trace.requests) / factor}
        return _derive(trace, requests, trace.span_s, f"thin{factor:g}x@{seed}", step)
    if mode == "stretch":
        step = {"op": "downsample", "mode": "stretch", "factor": factor}
        return _rescale_time(trace, factor, f"stretch{factor:g}x", step)
    raise TraceError(f"unknown downsampling mode {mode!r}; expected 'thin' or 'stretch'")


def scale_rate(trace: Trace, factor: float) -> Trace:
    """Compress (``factor > 1``: faster arrivals) or expand (``factor < 1``) time: every arrival and the duration are
    divided by ``factor``, so the rate is multiplied by it; the requests and their order are unchanged.  Used to fit a
    trace to hardware faster or slower than the paper's."""
    factor = _check_positive("rate factor", factor)
    return _rescale_time(trace, 1.0 / factor, f"rate{factor:g}x", {"op": "scale_rate", "factor": factor})


def truncate(trace: Trace, max_requests: int) -> Trace:
    """The first ``max_requests`` requests (all of them when the trace is shorter).  The observation period of a cut
    trace ends at its last kept arrival."""
    if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
        raise TraceError(f"invalid max_requests={max_requests!r}: must be an integer >= 1")
    if max_requests >= len(trace.requests):
        requests, span = list(trace.requests), trace.span_s
    else:
        requests, span = trace.requests[:max_requests], None
    return _derive(trace, requests, span, f"first{max_requests}", {"op": "truncate", "max_requests": max_requests})
