"""Task quality of a replay: every request's output scored against its references, per task, under every scheme.

Scores come from :mod:`morphserve.eval.scoring` (percent, the maximum over a request's references) under each of its
schemes; the headline scheme (:data:`~morphserve.eval.scoring.HEADLINE_SCHEME`) is named in the output.  A task's
mean is the plain mean over its scored requests, in workload order.  Requests that ended in an error record have no
output: they are not scored (a zero would mix serving failures into quality) and are counted per task as
``errors``, so a quality number always says how many requests it stands for.

:func:`request_scores` is the single per-request scoring function: the replay's ``quality.json`` and the lm-eval
tasks (``morphserve/eval/lm_eval_tasks``) both use it, so the two paths give the same numbers for the same outputs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from morphserve.eval.scoring import HEADLINE_SCHEME, SCHEMES, metric_name, score_all, scorer_versions
from morphserve.harness.records import RequestRecord, read_request_records, write_json

QUALITY_FILE = "quality.json"


def request_scores(task: str, prediction: str, references: Sequence[str]) -> dict[str, float]:
    """One output's score under every scheme: ``{scheme: percent}``."""
    return {s: score_all(task, [prediction], [list(references)], s)["per_example"][0] for s in SCHEMES}


def score_records(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Per-request and per-task scores of a replay's records (see the module docstring)."""
    by_task: dict[str, list[RequestRecord]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    for r in records:
        if r.task is None:
            raise ValueError(f"request {r.request_id!r} has no task: it cannot be scored")
        if r.ok:
            if r.text is None:
                raise ValueError(f"request {r.request_id!r} finished without output text")
            if not r.references:
                raise ValueError(f"request {r.request_id!r} ({r.task}) has no references to score against")
            by_task[r.task].append(r)
        else:
            errors[r.task] += 1
    tasks: dict[str, Any] = {}
    per_request: list[dict[str, Any]] = []
    for task in sorted(set(by_task) | set(errors)):
        recs = by_task.get(task, [])
        entry: dict[str, Any] = {"scored": len(recs), "errors": errors.get(task, 0), "headline_scheme": HEADLINE_SCHEME,
                                 "headline_mean": None, "schemes": {}}
        if recs:
            scored = {s: score_all(task, [r.text for r in recs], [r.references for r in recs], s) for s in SCHEMES}
            entry["headline_mean"] = scored[HEADLINE_SCHEME]["mean"]
            entry["schemes"] = {s: {"metric": d["metric"], "unit": d["unit"], "mean": d["mean"],
                                    "scorer_failures": d["scorer_failures"]} for s, d in scored.items()}
            for i, r in enumerate(recs):
                per_request.append({"request_id": r.request_id, "task": task, "example_id": r.example_id,
                                    "scores": {s: scored[s]["per_example"][i] for s in SCHEMES}})
        else:
            entry["schemes"] = {s: {"metric": metric_name(task, s), "unit": "percent", "mean": None,
                                    "scorer_failures": {}} for s in SCHEMES}
        tasks[task] = entry
    order = {r.request_id: i for i, r in enumerate(records)}
    per_request.sort(key=lambda d: order[d["request_id"]])
    return {"headline_scheme": HEADLINE_SCHEME, "schemes": list(SCHEMES), "tasks": tasks,
            "per_request": per_request, "scorer_versions": scorer_versions()}


def write_quality(path: str | Path, quality: dict[str, Any], provenance: dict[str, Any]) -> Path:
    return write_json(path, "quality", quality, provenance)


def score_results_file(requests_json: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Score a replay's ``requests.json``; writes ``quality.json`` beside it (or to ``out``) with the replay's
    provenance plus the scorer versions."""
    requests_json = Path(requests_json)
    records, prov = read_request_records(requests_json)
    quality = score_records(records)
    path = Path(out) if out is not None else requests_json.with_name(QUALITY_FILE)
    return write_quality(path, quality, prov), quality
