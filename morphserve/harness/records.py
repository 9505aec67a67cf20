"""What a replay writes: one record per workload request (a result or an explicit error), one row per engine step,
and the JSON/CSV files that hold them, each stamped with provenance.

Times in records are seconds relative to the replay's start (``t0``: the instant the workload's arrival offset 0
maps to on the engine's monotonic clock).  Durations (queueing delay, TTFT, TPOT, E2E, lag) are seconds.

Files (all written atomically: a temp file in the same folder, then ``os.replace``):

* JSON: ``{"provenance": {...}, <key>: <payload>}``.
* CSV: a first line ``# provenance: <one-line JSON>``, then a header row and the data rows.  Read them with
  :func:`read_csv` here, or ``pandas.read_csv(path, skiprows=1)``.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

PROVENANCE_PREFIX = "# provenance: "


class RecordStatus(str, enum.Enum):
    OK = "ok"  # the request finished (stop token, max_tokens or the context window)
    ERROR = "error"  # it did not: ``error_kind`` and ``error`` say why


class ErrorKind(str, enum.Enum):
    """Why a request of the workload produced no result."""

    REJECTED = "rejected"  # the engine refused it at admission (RequestError: prompt too long, needs too many blocks)
    ENGINE_FAILURE = "engine_failure"  # the engine raised while the request was queued or running
    NOT_SUBMITTED = "not_submitted"  # the driver could not hand it to the engine (the engine had already stopped)
    ABORTED = "aborted"  # the engine aborted it
    TIMEOUT = "timeout"  # no answer within the replay's drain timeout


@dataclass
class RequestRecord:
    """One workload request after the replay.  ``status == "ok"`` records carry every latency; error records
    carry ``error_kind``/``error`` and whatever timestamps exist; their ``finished_s`` is when the error happened
    (the engine's rejection, the failure answering the request) or, for ``timeout`` and ``not_submitted``, when the
    harness gave up on the request.  ``lag_s`` is how late the driver submitted it relative to its scheduled arrival
    (``submitted_s - scheduled_s``)."""

    request_id: str
    task: str | None
    example_id: str | None
    status: str
    error_kind: str | None
    error: str | None
    finish_reason: str | None
    scheduled_s: float  # the arrival time the workload asked for (also the arrival time given to the engine)
    submitted_s: float | None  # when the driver actually submitted it
    lag_s: float | None
    first_scheduled_s: float | None
    first_token_s: float | None
    finished_s: float | None
    queueing_delay_s: float | None
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    prompt_tokens: int  # as the engine tokenized it; the workload's count for requests the engine never tokenized
    output_tokens: int
    max_tokens: int
    num_preemptions: int
    text: str | None = None
    references: list[str] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == RecordStatus.OK.value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        missing = {f.name for f in fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING} - set(d)
        if unknown or missing:
            raise ValueError(f"request record {d.get('request_id')!r}: unknown fields {sorted(unknown)}, "
                             f"missing fields {sorted(missing)}")
        return cls(**d)


# The per-request CSV holds every scalar field; text, references and token times are in the JSON only.
REQUEST_CSV_COLUMNS = tuple(f.name for f in fields(RequestRecord)
                            if f.name not in ("text", "references", "token_times_s"))


@dataclass
class TimelineRow:
    """The engine's state at one step (from ``LLMEngine.step_stats``), sampled as the step finished.

    ``precisions`` is the per-layer precision map after the step (``"fp16,fp16,w4,..."``; empty when the engine
    exposes none) and ``num_fp16``/``num_w8``/``num_w4`` count its layers.  KV numbers are in blocks."""

    step: int
    t_s: float  # step start, relative to t0
    duration_s: float
    num_tokens: int
    num_seqs: int
    num_preempted: int
    num_waiting: int
    num_running: int
    kv_used_blocks: int
    kv_total_blocks: int
    kv_utilization: float
    num_fp16: int
    num_w8: int
    num_w4: int
    precisions: str


TIMELINE_CSV_COLUMNS = tuple(f.name for f in fields(TimelineRow))


# ---- files ---------------------------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(x: Any) -> Any:
    """NaN/inf become null: JSON has no spelling for them and a reader must not mistake them for numbers."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: str | Path, key: str, payload: Any, provenance: dict[str, Any]) -> Path:
    """Write ``{"provenance": provenance, key: payload}`` to ``path``."""
    if key == "provenance":
        raise ValueError("payload key 'provenance' is reserved")
    text = json.dumps(_json_safe({"provenance": provenance, key: payload}), indent=1, ensure_ascii=False,
                      allow_nan=False)
    _atomic_write(Path(path), text + "\n")
    return Path(path)


def read_json(path: str | Path, key: str) -> tuple[Any, dict[str, Any]]:
    """The payload under ``key`` and the provenance of a file written by :func:`write_json`."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(d, dict) or key not in d or "provenance" not in d:
        raise ValueError(f"{path}: expected a JSON object with keys 'provenance' and {key!r}")
    return d[key], d["provenance"]


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return v


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str],
              provenance: dict[str, Any]) -> Path:
    """Write ``rows`` (dicts holding at least ``columns``) under a provenance comment line and a header row.
    ``None`` is written as an empty cell; floats keep full precision."""
    buf = io.StringIO()
    buf.write(PROVENANCE_PREFIX + json.dumps(_json_safe(provenance), ensure_ascii=False, allow_nan=False) + "\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"CSV row lacks columns {missing}: {row!r}")
        w.writerow([_csv_cell(row[c]) for c in columns])
    _atomic_write(Path(path), buf.getvalue())
    return Path(path)


def read_csv(path: str | Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Rows (as strings; empty string = no value) and provenance of a file written by :func:`write_csv`."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        first = f.readline()
        if not first.startswith(PROVENANCE_PREFIX):
            raise ValueError(f"{path}: first line should start with {PROVENANCE_PREFIX!r}")
        prov = json.loads(first[len(PROVENANCE_PREFIX):])
        return list(csv.DictReader(f)), prov


def write_request_records(json_path: str | Path, csv_path: str | Path, records: Sequence[RequestRecord],
                          provenance: dict[str, Any]) -> None:
    rows = [r.to_dict() for r in records]
    write_json(json_path, "requests", rows, provenance)
    write_csv(csv_path, rows, REQUEST_CSV_COLUMNS, provenance)


def read_request_records(json_path: str | Path) -> tuple[list[RequestRecord], dict[str, Any]]:
    rows, prov = read_json(json_path, "requests")
    if not isinstance(rows, list):
        raise ValueError(f"{json_path}: 'requests' must be a list, got {type(rows).__name__}")
    return [RequestRecord.from_dict(r) for r in rows], prov


def write_timeline(csv_path: str | Path, rows: Sequence[TimelineRow], provenance: dict[str, Any]) -> Path:
    return write_csv(csv_path, (asdict(r) for r in rows), TIMELINE_CSV_COLUMNS, provenance)
