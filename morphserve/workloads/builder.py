"""Workloads: a request-arrival trace paired with real task inputs, written as a file that a replay serves as is.

Building (:func:`build_workload`, from a :class:`WorkloadSpec`):

1. **Trace.**  The Azure LLM Inference 2023 trace (``azure-conv`` or ``azure-code``) or BurstGPT (``burstgpt``: the
   real file when it is available, else the *synthetic* BurstGPT-shaped generator, flagged as such), cut to a window
   (the paper's 72 s by default, :func:`~morphserve.workloads.traces.select_window`), downsampled (the paper's 4.75x
   for Azure, 1.75x for BurstGPT; ``thin`` or ``stretch``), rate-scaled to the hardware (``rate_scale`` multiplies
   the arrival rate, i.e. divides every arrival time) and optionally cut to its first ``max_requests``.
2. **Task inputs.**  Each trace request gets one example of one of ``tasks`` (chosen uniformly at random per request
   when there are several).  Examples are drawn from a seeded permutation of the task's pool without replacement;
   when a pool is exhausted a fresh permutation starts, so no example repeats before every example of its pool was
   used once.  Everything is a pure function of ``seed``.
3. **Lengths.**  ``lengths="fixed"`` (the paper): every prompt is cut to the same budget and every response has the
   same length, by attention type of the model (512/256 tokens for MHA models, 1024/512 for GQA models:
   :func:`~morphserve.workloads.prompts.prompt_length_for`, :func:`~morphserve.workloads.prompts.response_length_for`),
   unless ``prompt_tokens``/``output_tokens`` override them.  ``lengths="trace"``: each request takes its prompt
   budget and its response length from its trace request.  Responses always have exactly ``max_tokens`` tokens
   (``ignore_eos``), as in the paper's fixed-length setting, so load does not depend on what the model writes.
   Prompts are built by :func:`~morphserve.workloads.prompts.build_prompt`: LongBench's template, middle truncation
   with the model's own tokenizer, an exact token count.  A prompt shorter than its budget is kept as it is (never
   padded) and counted in the summary.  Prompt plus response must fit the model's context window: in ``fixed`` mode
   a budget that does not fit raises; in ``trace`` mode the prompt budget of such a request is reduced to fit and the
   request is counted as clipped.

Files: ``<name>.jsonl`` holds one request per line (:class:`WorkloadRequest`: arrival offset, templated prompt,
its token count, ``max_tokens``, ``ignore_eos``, task, example id and references) and ``<name>.summary.json`` holds
the request count, rate, duration, length statistics, the trace's summary and lineage, synthetic flags, the seed, the
spec and provenance, plus the sha256 of the JSONL file.  :func:`load_workload` validates every line and field and the
summary's checksum; a broken file raises :class:`WorkloadError` naming the line and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from morphserve.harness.metrics import distribution
from morphserve.harness.records import read_json, write_json

if TYPE_CHECKING:
    from morphserve.workloads.tasks import TaskExample
    from morphserve.workloads.traces import Trace

TRACES = ("azure-conv", "azure-code", "burstgpt")
LENGTH_MODES = ("fixed", "trace")
# The paper's downsampling factors per trace family (Section 6 of the reference notes).
PAPER_DOWNSAMPLE = {"azure-conv": 4.75, "azure-code": 4.75, "burstgpt": 1.75}
SUMMARY_SUFFIX = ".summary.json"


class WorkloadError(ValueError):
    """A workload spec or file that cannot be used; the message names the bad value (and the file line)."""


# ---- the spec ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a workload (with the model's tokenizer).

    ``downsample=None`` uses the paper's factor for the trace (:data:`PAPER_DOWNSAMPLE`).  ``synthetic_rate_rps`` is
    the mean rate of the synthetic BurstGPT-shaped trace, used (and required) only when ``trace="burstgpt"`` and the
    real BurstGPT file is unavailable; the synthetic trace then spans exactly the window.
    """

    trace: str = "azure-conv"
    window_s: float = 72.0
    window_rule: str = "busiest"
    window_offset_s: float | None = None
    downsample: float | None = None
    downsample_mode: str = "thin"
    rate_scale: float = 1.0
    max_requests: int | None = None
    tasks: tuple[str, ...] = ("qmsum",)
    pool: str = "eval"
    lengths: str = "fixed"
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    chat: bool = False
    synthetic_rate_rps: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trace not in TRACES:
            raise WorkloadError(f"unknown trace {self.trace!r}; expected one of {', '.join(TRACES)}")
        if self.lengths not in LENGTH_MODES:
            raise WorkloadError(f"unknown lengths mode {self.lengths!r}; expected one of {', '.join(LENGTH_MODES)}")
        if not self.tasks or isinstance(self.tasks, str):
            raise WorkloadError(f"tasks must be a non-empty tuple of task names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise WorkloadError(f"tasks {self.tasks!r} name a task twice")
        for name in ("prompt_tokens", "output_tokens", "max_requests"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise WorkloadError(f"{name}={v!r} must be an integer >= 1 (or None)")
        if self.lengths == "trace" and (self.prompt_tokens is not None or self.output_tokens is not None):
            raise WorkloadError("prompt_tokens/output_tokens override the fixed lengths; with lengths='trace' every "
                                "request takes its lengths from the trace")
        for name in ("window_s", "rate_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise WorkloadError(f"{name}={v!r} must be a positive number")
        if self.downsample is not None and (not isinstance(self.downsample, (int, float))
                                            or not math.isfinite(self.downsample) or self.downsample < 1):
            raise WorkloadError(f"downsample={self.downsample!r} must be a number >= 1 (or None for the paper's)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise WorkloadError(f"seed={self.seed!r} must be an integer >= 0")

    @property
    def downsample_factor(self) -> float:
        return PAPER_DOWNSAMPLE[self.trace] if self.downsample is None else float(self.downsample)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        return d


# ---- one request of a workload -------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkloadRequest:
    """One line of a workload file.  ``arrival_s`` is seconds after the replay starts; ``prompt`` is the final text
    the engine is given (templated, truncated) and ``prompt_tokens`` its exact token count with the model's tokenizer;
    ``trace_prompt_tokens``/``trace_output_tokens`` are the lengths the trace request had (None when not from a
    trace)."""

    request_id: str
    arrival_s: float
    task: str
    example_id: str
    language: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    ignore_eos: bool
    references: tuple[str, ...]
    trace_prompt_tokens: int | None = None
    trace_output_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["references"] = list(self.references)
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(WorkloadRequest)}
_OPTIONAL = {"trace_prompt_tokens", "trace_output_tokens"}


def _check_int(v: Any, minimum: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= minimum


# (check, what it must be) per field
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "request_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "arrival_s": (lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                  "a finite number of seconds >= 0"),
    "task": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "example_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "language": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "prompt": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "prompt_tokens": (lambda v: _check_int(v, 1), "an integer >= 1"),
    "max_tokens": (lambda v: _check_int(v, 1), "an integer >= 1"),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
    "references": (lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(r, str) for r in v),
                   "a non-empty list of strings"),
    "trace_prompt_tokens": (lambda v: v is None or _check_int(v, 1), "null or an integer >= 1"),
    "trace_output_tokens": (lambda v: v is None or _check_int(v, 1), "null or an integer >= 1"),
}


def parse_request(obj: Any, where: str) -> WorkloadRequest:
    """Validate one decoded JSONL line; raises WorkloadError naming ``where`` and the bad field."""
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise WorkloadError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(_FIELDS)}")
    for name in _FIELDS:
        if name not in obj:
            if name in _OPTIONAL:
                continue
            raise WorkloadError(f"{where}: field {name!r} is missing")
        check, what = _CHECKS[name]
        if not check(obj[name]):
            raise WorkloadError(f"{where}: field {name!r} must be {what}, got {obj[name]!r:.80}")
    d = dict(obj)
    d["arrival_s"] = float(d["arrival_s"])
    d["references"] = tuple(d["references"])
    return WorkloadRequest(**d)


# ---- a whole workload ----------------------------------------------------------------------------------------

@dataclass
class Workload:
    """The requests of a workload in arrival order, and its summary (None for workloads built in memory)."""

    requests: list[WorkloadRequest]
    summary: dict[str, Any] | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        validate_requests(self.requests, str(self.path or "workload"))

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def model(self) -> str | None:
        """The model whose tokenizer built the prompts (from the summary)."""
        return None if self.summary is None else self.summary.get("model", {}).get("name")


def validate_requests(requests: Sequence[WorkloadRequest], where: str) -> None:
    """Cross-request checks: at least one request, unique ids, arrivals in non-decreasing order."""
    if not requests:
        raise WorkloadError(f"{where}: the workload has no requests")
    seen: dict[str, int] = {}
    prev = -math.inf
    for i, r in enumerate(requests):
        if r.request_id in seen:
            raise WorkloadError(f"{where}: request {i} (line {i + 1}): request_id {r.request_id!r} repeats "
                                f"request {seen[r.request_id]} (line {seen[r.request_id] + 1})")
        seen[r.request_id] = i
        if r.arrival_s < prev:
            raise WorkloadError(f"{where}: request {i} (line {i + 1}): arrival_s {r.arrival_s} is earlier than "
                                f"the previous request's {prev}; requests must be in arrival order")
        prev = r.arrival_s


def summary_path(workload_path: str | Path) -> Path:
    """``x.jsonl`` -> ``x.summary.json``."""
    p = Path(workload_path)
    return p.with_name(p.name.removesuffix(".jsonl") + SUMMARY_SUFFIX)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_requests(path: str | Path) -> list[WorkloadRequest]:
    """The requests of a workload JSONL file, every line and field validated (blank lines are not allowed: a
    workload file is written by :func:`write_workload`, and a blank line means it was edited or cut)."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"workload file {path} does not exist")
    requests = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path} line {lineno}"
            if not line.strip():
                raise WorkloadError(f"{where}: blank line")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
            requests.append(parse_request(obj, where))
    validate_requests(requests, str(path))
    return requests


def load_workload(path: str | Path, require_summary: bool = True) -> Workload:
    """Read and validate a workload file and its summary; the summary's sha256 and request count must match."""
    path = Path(path)
    requests = read_requests(path)
    spath = summary_path(path)
    summary = None
    if spath.is_file():
        try:
            summary, prov = read_json(spath, "summary")
        except ValueError as e:
            raise WorkloadError(str(e)) from None
        summary = {**summary, "provenance": prov}
        want = summary.get("workload", {}).get("sha256")
        got = _sha256(path)
        if want != got:
            raise WorkloadError(f"{path}: sha256 {got} differs from {spath}'s {want!r}: the workload file was "
                                f"changed after it was built")
        n = summary.get("workload", {}).get("requests")
        if n != len(requests):
            raise WorkloadError(f"{path}: {len(requests)} requests but {spath} says {n!r}")
    elif require_summary:
        raise WorkloadError(f"workload summary {spath} does not exist (it is written next to the workload file)")
    return Workload(requests, summary, path)


def write_workload(workload: Workload, path: str | Path, provenance: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<path>`` (JSONL) and its summary (with the file's sha256 and ``provenance``)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise WorkloadError(f"workload file name {path.name!r} must end in .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in workload.requests:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(path)
    summary = dict(workload.summary or {})
    summary.pop("provenance", None)
    summary["workload"] = {**summary.get("workload", {}), "file": path.name, "sha256": _sha256(path),
                           "requests": len(workload.requests)}
    spath = write_json(summary_path(path), "summary", summary, provenance)
    workload.summary = {**summary, "provenance": provenance}
    workload.path = path
    return path, spath


# ---- building ------------------------------------------------------------------------------------------------

def load_trace(spec: WorkloadSpec) -> Trace:
    """The spec's trace after window, downsampling, rate scaling and truncation (lineage in ``meta``)."""
    from morphserve.workloads import traces as T

    if spec.trace in ("azure-conv", "azure-code"):
        trace = T.load_azure(spec.trace.split("-")[1])
    else:
        try:
            trace = T.load_burstgpt()
        except T.DataMissing as e:
            if spec.synthetic_rate_rps is None:
                raise WorkloadError(f"the BurstGPT trace is not available ({e}); pass synthetic_rate_rps to use the "
                                    f"SYNTHETIC BurstGPT-shaped generator instead") from None
            trace = T.burstgpt_or_synthetic(spec.seed, duration_s=spec.window_s, mean_rate=spec.synthetic_rate_rps)
    trace = T.select_window(trace, spec.window_s, spec.window_rule, spec.window_offset_s)
    if spec.downsample_factor != 1.0:
        trace = T.downsample(trace, spec.downsample_factor, spec.downsample_mode, seed=spec.seed)
    if spec.rate_scale != 1.0:
        trace = T.scale_rate(trace, spec.rate_scale)
    if spec.max_requests is not None:
        trace = T.truncate(trace, spec.max_requests)
    return trace


class _ExampleSampler:
    """Per task: a seeded permutation of the pool, drawn without replacement, re-permuted when exhausted."""

    def __init__(self, examples: Sequence[TaskExample], rng: np.random.Generator):
        self.examples = list(examples)
        self.rng = rng
        self.order: list[int] = []
        self.used: set[str] = set()

    def next(self) -> TaskExample:
        if not self.order:
            self.order = list(self.rng.permutation(len(self.examples)))
        ex = self.examples[int(self.order.pop(0))]
        self.used.add(ex.id)
        return ex


def _lengths_for(spec: WorkloadSpec, model_config: Any) -> tuple[int | None, int | None]:
    if spec.lengths == "trace":
        return None, None
    from morphserve.workloads.prompts import prompt_length_for, response_length_for

    prompt = spec.prompt_tokens if spec.prompt_tokens is not None else prompt_length_for(model_config)
    output = spec.output_tokens if spec.output_tokens is not None else response_length_for(model_config)
    if prompt + output > model_config.max_position_embeddings:
        raise WorkloadError(f"prompt_tokens={prompt} + output_tokens={output} exceed the context window of "
                            f"{model_config.name!r} ({model_config.max_position_embeddings} tokens)")
    return prompt, output


def build_workload(spec: WorkloadSpec, model: str, *, trace: Trace | None = None,
                   examples: dict[str, Sequence[TaskExample]] | None = None, progress: bool = True) -> Workload:
    """Build the workload of ``spec`` for ``model`` (a model name or checkpoint directory: its tokenizer cuts the
    prompts and its config fixes the paper's lengths).  ``trace`` and ``examples`` (task name -> examples) replace
    the spec's trace and task pools (tests use small ones); the summary records that they were given."""
    from morphserve.model.weight_source import open_source
    from morphserve.workloads.prompts import build_prompt

    source = open_source(model, seed=0)
    model_config = source.config
    tokenizer = source.tokenizer()
    trace_given = trace is not None
    trace = load_trace(spec) if trace is None else trace
    pools: dict[str, list[TaskExample]] = {}
    for name in spec.tasks:
        if examples is not None:
            if name not in examples:
                raise WorkloadError(f"examples given for {sorted(examples)} but the spec asks for task {name!r}")
            pools[name] = list(examples[name])
        else:
            from morphserve.workloads.tasks import load_task

            pools[name] = load_task(name, spec.pool)
        if not pools[name]:
            raise WorkloadError(f"task {name!r} has no examples")
    fixed_prompt, fixed_output = _lengths_for(spec, model_config)
    ctx = model_config.max_position_embeddings

    task_rng = np.random.default_rng([spec.seed, 0])
    samplers = {name: _ExampleSampler(pools[name], np.random.default_rng([spec.seed, 1, i]))
                for i, name in enumerate(spec.tasks)}
    cache: dict[tuple[str, str, int], tuple[str, int]] = {}
    requests: list[WorkloadRequest] = []
    clipped = 0
    budgets: list[int] = []
    width = max(5, len(str(len(trace.requests) - 1)))
    for i, tr in enumerate(tqdm(trace.requests, desc="workload", unit="req", disable=not progress)):
        task = spec.tasks[int(task_rng.integers(len(spec.tasks)))] if len(spec.tasks) > 1 else spec.tasks[0]
        ex = samplers[task].next()
        if fixed_prompt is not None:
            budget, max_tokens = fixed_prompt, fixed_output
        else:
            max_tokens = min(tr.output_tokens, ctx - 2)
            budget = min(tr.prompt_tokens, ctx - max_tokens)
            if (budget, max_tokens) != (tr.prompt_tokens, tr.output_tokens):
                clipped += 1
        key = (task, ex.id, budget)
        if key not in cache:
            cache[key] = build_prompt(ex, tokenizer, budget, chat=spec.chat)
        text, n = cache[key]
        budgets.append(budget)
        requests.append(WorkloadRequest(
            request_id=f"r{i:0{width}d}", arrival_s=float(tr.arrival_s), task=task, example_id=ex.id,
            language=ex.language, prompt=text, prompt_tokens=n, max_tokens=max_tokens, ignore_eos=True,
            references=tuple(ex.answers), trace_prompt_tokens=tr.prompt_tokens,
            trace_output_tokens=tr.output_tokens))
    summary = _summary(spec, requests, budgets, clipped, trace, model, model_config, source, pools, samplers)
    # a trace or examples passed in by the caller replace the spec's: say so, the spec no longer describes them
    summary["inputs"] = {"trace_given": trace_given, "examples_given": examples is not None}
    return Workload(requests, summary)


def _summary(spec: WorkloadSpec, requests: list[WorkloadRequest], budgets: list[int], clipped: int, trace: Any,
             model: str, model_config: Any, source: Any, pools: dict[str, list[Any]],
             samplers: dict[str, _ExampleSampler]) -> dict[str, Any]:
    arrivals = [r.arrival_s for r in requests]
    duration = trace.duration_s
    shorter = sum(r.prompt_tokens < b for r, b in zip(requests, budgets))
    return {
        "workload": {
            "requests": len(requests),
            "duration_s": duration,
            "rate_rps": len(requests) / duration if duration > 0 else None,
            "first_arrival_s": arrivals[0],
            "last_arrival_s": arrivals[-1],
        },
        "model": {"name": model, "config_name": model_config.name, "attention": model_config.attention,
                  "max_position_embeddings": model_config.max_position_embeddings,
                  "vocab_size": model_config.vocab_size, "synthetic_weights": bool(source.synthetic)},
        "lengths": {
            "mode": spec.lengths,
            "chat_template": spec.chat,
            "prompt_budget": distribution(budgets),
            "prompt_tokens": distribution([r.prompt_tokens for r in requests]),
            "max_tokens": distribution([r.max_tokens for r in requests]),
            "prompts_shorter_than_budget": shorter,
            "clipped_to_context": clipped,
            "ignore_eos": True,
        },
        "tasks": {name: {"requests": sum(r.task == name for r in requests), "pool": spec.pool,
                         "pool_size": len(pools[name]), "distinct_examples": len(samplers[name].used)}
                  for name in spec.tasks},
        "trace": {**trace.summary(), "meta": trace.meta},
        "synthetic": {"trace": bool(trace.synthetic), "weights": bool(source.synthetic)},
        "seed": spec.seed,
        "spec": spec.to_dict(),
    }
