"""Open-loop, real-time replay of a workload into a running engine, and the files a replay writes.

The driver (:func:`replay`) submits request *i* of the workload to a :class:`~morphserve.engine.serving.ServingEngine`
at ``t0 + arrival_s[i]`` on the engine's own clock (``time.monotonic`` unless the engine was given another), and
never waits for a response before submitting the next one: arrivals do not depend on how fast the engine serves,
which is what makes queueing visible.  The arrival time handed to the engine is the *scheduled* one, so queueing
delay, TTFT and E2E count from when the request should have arrived.  If the driver itself is late (it sleeps until
each arrival, and shares the interpreter with the engine thread), each submission's lag is recorded; a replay in
which any lag exceeds the tolerance *fell behind*, says so in its aggregates and emits a warning.  There is no way
to replay faster than real time: open-loop real time is the point (a workload's rate is set when it is built).

Nothing is lost: every workload request ends in exactly one :class:`~morphserve.harness.records.RequestRecord`,
either a result or an error record (rejected by the engine, engine failure, not submitted because the engine had
stopped, aborted, or no answer within ``drain_timeout_s``), and the aggregates count each kind.

While the replay runs, :class:`StepTimeline` samples the engine after every step: its step statistics (KV blocks in
use and in total, queue length, running requests, tokens) and, when the engine has a weight arena, the per-layer
precision map.

:func:`run_replay` is the whole experiment: load and validate the workload, build the engine, warm it up, freeze its
warm heap (:meth:`LLMEngine.warmed_up <morphserve.engine.engine.LLMEngine.warmed_up>`; held until the caller closes
the engine), replay, aggregate, and write ``requests.json``, ``requests.csv``, ``aggregates.json``,
``timeline.csv`` and (when the requests carry references) ``quality.json``, all stamped with provenance.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from morphserve.engine.engine import LLMEngine
from morphserve.engine.request import FinishReason, RequestOutput
from morphserve.engine.sampling_params import SamplingParams
from morphserve.engine.serving import ServingEngine
from morphserve.harness.metrics import LAG_TOLERANCE_S, SLO, aggregate, timeline_summary
from morphserve.harness.records import (ErrorKind, RecordStatus, RequestRecord, TimelineRow, write_json,
                                        write_request_records, write_timeline)
from morphserve.workloads.builder import Workload, WorkloadError, WorkloadRequest, load_workload

log = logging.getLogger(__name__)

START_LEAD_S = 0.05  # t0 is this far after the replay is set up, so the first arrival is never already late
POLL_S = 0.1  # how often the drain loop checks that the engine is still alive
OK_FINISH = {FinishReason.STOP.value, FinishReason.LENGTH.value, FinishReason.MAX_MODEL_LEN.value}


class ReplayBehindWarning(UserWarning):
    """The driver submitted some requests later than their scheduled arrival by more than the tolerance."""


# ---- the engine's timeline -----------------------------------------------------------------------------------

class StepTimeline:
    """Samples the engine after each of its steps, on the engine thread.

    It wraps the engine instance's ``step`` (``ServingEngine`` calls ``engine.step()``), so each row is taken right
    after the step that produced it, including the precision map the layers had when the step finished.  Use as a
    context manager around the replay; the original ``step`` is restored on exit."""

    def __init__(self, engine: LLMEngine, t0: float):
        self.engine = engine
        self.t0 = t0
        self.rows: list[TimelineRow] = []
        self._last_step = engine.step_stats[-1].step if engine.step_stats else 0
        arena = getattr(getattr(engine, "model", None), "arena", None)
        self._precisions: Callable[[], list[str]] | None = getattr(arena, "precisions", None)
        self._original: Callable[[], list[RequestOutput]] | None = None

    def __enter__(self) -> "StepTimeline":
        if "step" in vars(self.engine):
            raise RuntimeError("the engine's step is already wrapped (two timelines on one engine)")
        original = self.engine.step

        def step() -> list[RequestOutput]:
            out = original()
            self._sample()
            return out

        self._original = original
        self.engine.step = step  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        vars(self.engine).pop("step", None)

    def _sample(self) -> None:
        stats = self.engine.step_stats[-1] if self.engine.step_stats else None
        if stats is None or stats.step == self._last_step:
            return  # the call scheduled nothing (idle): no step happened
        self._last_step = stats.step
        prec = list(self._precisions()) if self._precisions is not None else []
        self.rows.append(TimelineRow(
            step=stats.step, t_s=stats.start - self.t0, duration_s=stats.duration, num_tokens=stats.num_tokens,
            num_seqs=stats.num_seqs, num_preempted=stats.num_preempted, num_waiting=stats.num_waiting,
            num_running=stats.num_running, kv_used_blocks=stats.kv_used_blocks,
            kv_total_blocks=stats.kv_total_blocks,
            kv_utilization=stats.kv_used_blocks / stats.kv_total_blocks if stats.kv_total_blocks else 0.0,
            num_fp16=prec.count("fp16"), num_w8=prec.count("w8"), num_w4=prec.count("w4"),
            precisions=",".join(prec)))


# ---- the driver ----------------------------------------------------------------------------------------------

@dataclass
class ReplayResult:
    """What a replay produced.  ``t0`` is the engine-clock instant of arrival offset 0; ``wall_s`` how long the
    replay took (first submission to last answer)."""

    records: list[RequestRecord]
    timeline: list[TimelineRow]
    t0: float
    wall_s: float
    lag_tolerance_s: float
    warnings: list[str] = field(default_factory=list)

    @property
    def fell_behind(self) -> bool:
        return any(r.lag_s is not None and r.lag_s > self.lag_tolerance_s for r in self.records)


def _engine_alive(server: ServingEngine) -> bool:
    """Whether the serving loop is still running (a failed loop refuses new submissions and has answered every
    pending future; the driver checks it to stop waiting and to record engine failures)."""
    return server.alive


def _sleep_until(clock: Callable[[], float], target: float) -> None:
    while (left := target - clock()) > 0:
        time.sleep(left)


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else t - t0


def _error_record(wr: WorkloadRequest, kind: ErrorKind, error: str, t0: float, submitted: float | None,
                  finished: float | None) -> RequestRecord:
    return RequestRecord(
        request_id=wr.request_id, task=wr.task, example_id=wr.example_id, status=RecordStatus.ERROR.value,
        error_kind=kind.value, error=error, finish_reason=None, scheduled_s=wr.arrival_s,
        submitted_s=_rel(submitted, t0), lag_s=None if submitted is None else submitted - (t0 + wr.arrival_s),
        first_scheduled_s=None, first_token_s=None, finished_s=_rel(finished, t0), queueing_delay_s=None,
        ttft_s=None, tpot_s=None, e2e_s=None, prompt_tokens=wr.prompt_tokens, output_tokens=0,
        max_tokens=wr.max_tokens, num_preemptions=0, text=None, references=list(wr.references))


def output_record(wr: WorkloadRequest, out: RequestOutput, t0: float, submitted: float) -> RequestRecord:
    """The record of a request the engine answered (a result, or an error record for a rejection or abort)."""
    m = out.metrics
    if out.finish_reason not in OK_FINISH:
        kind = ErrorKind.ABORTED if out.finish_reason == FinishReason.ABORTED.value else ErrorKind.REJECTED
        rec = _error_record(wr, kind, out.error or f"finish_reason={out.finish_reason!r}", t0, submitted,
                            m.finished_time)
        rec.finish_reason = out.finish_reason
        rec.output_tokens = len(out.output_token_ids)
        return rec
    return RequestRecord(
        request_id=wr.request_id, task=wr.task, example_id=wr.example_id, status=RecordStatus.OK.value,
        error_kind=None, error=None, finish_reason=out.finish_reason, scheduled_s=wr.arrival_s,
        submitted_s=submitted - t0, lag_s=submitted - (t0 + wr.arrival_s),
        first_scheduled_s=_rel(m.first_scheduled_time, t0), first_token_s=_rel(m.first_token_time, t0),
        finished_s=_rel(m.finished_time, t0), queueing_delay_s=m.queueing_delay, ttft_s=m.ttft, tpot_s=m.tpot,
        e2e_s=m.e2e, prompt_tokens=len(out.prompt_token_ids), output_tokens=len(out.output_token_ids),
        max_tokens=wr.max_tokens, num_preemptions=m.num_preemptions, text=out.text,
        references=list(wr.references), token_times_s=[t - t0 for t in m.token_times])


def sampling_params(wr: WorkloadRequest) -> SamplingParams:
    """Greedy decoding with the request's limits (the paper's fixed-length setting uses ``ignore_eos``)."""
    return SamplingParams(max_tokens=wr.max_tokens, ignore_eos=wr.ignore_eos)


def replay(workload: Workload, server: ServingEngine, *, lag_tolerance_s: float = LAG_TOLERANCE_S,
           drain_timeout_s: float | None = None, progress: bool = True) -> ReplayResult:
    """Replay ``workload`` open-loop in real time into the running ``server``; every request gets one record.

    ``drain_timeout_s`` bounds the wait for answers after the last submission (None: wait while the engine is
    alive); requests still unanswered then get ``timeout`` error records and stay in the engine.
    """
    if lag_tolerance_s < 0:
        raise ValueError(f"lag_tolerance_s={lag_tolerance_s!r} must be >= 0")
    if drain_timeout_s is not None and drain_timeout_s <= 0:
        raise ValueError(f"drain_timeout_s={drain_timeout_s!r} must be positive (or None)")
    if not _engine_alive(server):
        raise RuntimeError("the serving engine is not running: start it before replaying into it")
    engine = server.engine
    clock = engine.clock
    n = len(workload.requests)
    records: dict[str, RequestRecord] = {}
    futures: dict[Future, tuple[WorkloadRequest, float]] = {}
    bar = tqdm(total=n, desc="replay", unit="req", disable=not progress)
    bar_lock = threading.Lock()
    answered_at: dict[Future, float] = {}  # when each future resolved (an engine failure's time)

    def advance(*_: object) -> None:
        with bar_lock:
            bar.update(1)

    def answered(fut: Future) -> None:
        answered_at[fut] = clock()
        advance()

    t0 = clock() + START_LEAD_S
    with StepTimeline(engine, t0) as timeline:
        for wr in workload.requests:
            target = t0 + wr.arrival_s
            _sleep_until(clock, target)
            now = clock()
            if not _engine_alive(server):
                records[wr.request_id] = _error_record(wr, ErrorKind.NOT_SUBMITTED,
                                                       "the engine had stopped before this request's arrival",
                                                       t0, None, now)
                advance()
                continue
            try:
                fut = server.submit(wr.prompt, sampling_params(wr), request_id=wr.request_id, arrival_time=target)
            except RuntimeError as e:
                records[wr.request_id] = _error_record(wr, ErrorKind.NOT_SUBMITTED, str(e), t0, None, now)
                advance()
                continue
            futures[fut] = (wr, now)
            fut.add_done_callback(answered)
        last_submit = clock()
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            if pending and not _engine_alive(server):
                _, pending = wait(pending, timeout=POLL_S)  # the failing loop answers its futures first
                if pending:
                    log.error("the engine loop ended with %d requests unanswered", len(pending))
                break
            if pending and drain_timeout_s is not None and clock() - last_submit > drain_timeout_s:
                break
    end = clock()
    bar.close()
    for fut, (wr, submitted) in futures.items():
        if not fut.done():
            kind = ErrorKind.TIMEOUT if _engine_alive(server) else ErrorKind.ENGINE_FAILURE
            why = (f"no answer within drain_timeout_s={drain_timeout_s} after the last submission"
                   if kind is ErrorKind.TIMEOUT else "the engine loop ended without answering")
            records[wr.request_id] = _error_record(wr, kind, why, t0, submitted, end)
        elif fut.exception() is not None:
            e = fut.exception()
            records[wr.request_id] = _error_record(wr, ErrorKind.ENGINE_FAILURE, f"{type(e).__name__}: {e}", t0,
                                                   submitted, answered_at.get(fut, end))
        else:
            records[wr.request_id] = output_record(wr, fut.result(), t0, submitted)
    ordered = [records[wr.request_id] for wr in workload.requests]
    assert len(ordered) == n == len(records), "every workload request must end in exactly one record"
    result = ReplayResult(ordered, timeline.rows, t0, end - t0, lag_tolerance_s)
    _warn(result)
    return result


def _warn(result: ReplayResult) -> None:
    lags = [r.lag_s for r in result.records if r.lag_s is not None]
    late = [x for x in lags if x > result.lag_tolerance_s]
    if late:
        msg = (f"replay fell behind schedule: {len(late)} of {len(lags)} submissions were more than "
               f"{result.lag_tolerance_s * 1e3:.0f} ms late (max {max(late) * 1e3:.1f} ms); their latencies include "
               f"the driver's delay")
        result.warnings.append(msg)
        warnings.warn(msg, ReplayBehindWarning, stacklevel=3)
    errors = [r for r in result.records if not r.ok]
    if errors:
        kinds: dict[str, int] = {}
        for r in errors:
            kinds[r.error_kind or "?"] = kinds.get(r.error_kind or "?", 0) + 1
        msg = f"{len(errors)} of {len(result.records)} requests ended in error records: {kinds}"
        result.warnings.append(msg)
        log.warning("%s", msg)


# ---- the whole experiment ------------------------------------------------------------------------------------

RESULT_FILES = {"requests_json": "requests.json", "requests_csv": "requests.csv", "aggregates": "aggregates.json",
                "timeline": "timeline.csv", "quality": "quality.json"}


def check_model(workload: Workload, engine: LLMEngine) -> None:
    """The workload's prompts were cut and counted with one model's tokenizer: replaying them into another model
    would silently change every length, so that raises."""
    model = (workload.summary or {}).get("model")
    if model is None:
        return
    mine = engine.model_config
    if model.get("config_name") != mine.name or model.get("vocab_size") != mine.vocab_size:
        raise WorkloadError(f"workload {workload.path} was built for model {model.get('name')!r} "
                            f"({model.get('config_name')!r}, vocab {model.get('vocab_size')}) but the engine serves "
                            f"{mine.name!r} (vocab {mine.vocab_size}); rebuild the workload for this model")


def warm_up(engine: LLMEngine, workload: Workload, num_requests: int) -> int:
    """Serve up to ``num_requests`` of the workload's prompts (the first ones the engine accepts; 2 output tokens
    each) before the replay, so the first measured requests do not pay one-time costs (allocator growth, first-call
    kernel setup).  Their steps precede ``t0`` and are not in the timeline.  Returns how many were served."""
    from morphserve.engine.engine import RequestError

    params = SamplingParams(max_tokens=2, ignore_eos=True)
    served = 0
    for wr in workload.requests:
        if served == num_requests:
            break
        try:
            engine.add_request(wr.prompt, params, request_id=f"warmup-{served}")
        except RequestError:
            continue  # the replay will record this request's rejection; warm up with another one
        served += 1
    engine.run_until_done()
    return served


def run_replay(workload: Workload | str | Path, out_dir: str | Path, engine: LLMEngine, *, slo: SLO = SLO(),
               lag_tolerance_s: float = LAG_TOLERANCE_S, warmup_requests: int = 1,
               drain_timeout_s: float | None = None, score_quality: bool = True,
               progress: bool = True) -> dict[str, Any]:
    """Replay ``workload`` into ``engine`` (run on a :class:`ServingEngine`) and write the result files to
    ``out_dir``; returns ``{"files": {...}, "aggregates": {...}, "warnings": [...]}``.  The engine's heap is frozen
    after the warm-up (unless its config opts out); the caller releases it with ``engine.close()``."""
    from morphserve.provenance import provenance

    if not isinstance(workload, Workload):
        workload = load_workload(workload)
    check_model(workload, engine)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warmed = warm_up(engine, workload, warmup_requests) if warmup_requests else 0
    heap_frozen = engine.warmed_up()
    server = ServingEngine(engine)
    server.start()
    result: ReplayResult | None = None
    try:
        result = replay(workload, server, lag_tolerance_s=lag_tolerance_s, drain_timeout_s=drain_timeout_s,
                        progress=progress)
    finally:
        timed_out = result is not None and any(r.error_kind == ErrorKind.TIMEOUT.value for r in result.records)
        if timed_out and _engine_alive(server):
            # ServingEngine.stop() waits for every request; the timed-out ones may never finish
            log.warning("requests timed out: the engine thread is left to finish them in the background")
        else:
            server.stop()
    summary = workload.summary or {}
    config = {
        "engine": engine.config.to_dict(),
        "workload": {"path": str(workload.path) if workload.path else None,
                     "sha256": summary.get("workload", {}).get("sha256"),
                     "requests": len(workload), "spec": summary.get("spec"), "synthetic": summary.get("synthetic"),
                     "seed": summary.get("seed")},
        "slo": slo.to_dict(),
        "lag_tolerance_s": lag_tolerance_s,
        "warmup_requests": warmed,
        "heap_frozen": heap_frozen,
        "drain_timeout_s": drain_timeout_s,
    }
    prov = provenance(config, engine.device, summary.get("seed"), engine.synthetic_weights)
    files = {k: out / v for k, v in RESULT_FILES.items()}
    write_request_records(files["requests_json"], files["requests_csv"], result.records, prov)
    aggregates = aggregate(result.records, slo, lag_tolerance_s)
    aggregates["engine"] = timeline_summary(result.timeline)
    aggregates["replay"] = {"wall_s": result.wall_s, "warnings": result.warnings}
    write_json(files["aggregates"], "aggregates", aggregates, prov)
    write_timeline(files["timeline"], result.timeline, prov)
    if score_quality:
        from morphserve.eval.quality import score_records, write_quality

        write_quality(files["quality"], score_records(result.records), prov)
    else:
        del files["quality"]
    return {"files": {k: str(v) for k, v in files.items()}, "aggregates": aggregates, "warnings": result.warnings}
