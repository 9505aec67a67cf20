"""Loader, prompt and scoring hooks of the ``morphserve_*`` lm-eval tasks (see ``README.md`` beside this file).

The documents of a task are the requests of one workload file (``morphserve workload``) for that task, validated by
:func:`morphserve.workloads.builder.load_workload`: the prompt is the record's already templated and truncated
``prompt``, the references are its ``references``, and each document keeps ``max_tokens``/``ignore_eos`` so that
the ``morphserve`` model generates exactly what a replay of the workload generates.  Scores come from
:func:`morphserve.eval.quality.request_scores`, the function the replay's ``quality.json`` uses, one metric per
scoring scheme (percent; lm-eval's ``mean`` over documents).
"""

from __future__ import annotations

import os
from typing import Any

WORKLOAD_ENV = "MORPHSERVE_WORKLOAD"


def load_docs(workload: str | None = None, morphserve_task: str | None = None, **_: Any) -> Any:
    """``custom_dataset`` hook: ``{"test": Dataset}`` of the workload's requests for ``morphserve_task``.

    The workload file comes from lm-eval's ``--metadata '{"workload": "PATH"}'`` or, failing that, the
    ``MORPHSERVE_WORKLOAD`` environment variable.  Other metadata keys (lm-eval passes its own) are ignored.
    """
    import datasets

    from morphserve.workloads.builder import load_workload

    path = workload or os.environ.get(WORKLOAD_ENV)
    if not path:
        raise ValueError(f"no workload file for lm-eval task morphserve_{morphserve_task}: pass --metadata "
                         f"'{{\"workload\": \"PATH\"}}' or set {WORKLOAD_ENV}=PATH")
    if morphserve_task is None:
        raise ValueError("the task YAML must set dataset_kwargs.morphserve_task")
    w = load_workload(path, require_summary=False)
    docs = [r.to_dict() for r in w.requests if r.task == morphserve_task]
    if not docs:
        tasks = sorted({r.task for r in w.requests})
        raise ValueError(f"workload {path} has no {morphserve_task!r} requests (it has {', '.join(tasks)})")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def doc_to_text(doc: dict[str, Any]) -> str:
    return doc["prompt"]


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["references"][0]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    from morphserve.eval.quality import request_scores

    return request_scores(doc["task"], results[0], doc["references"])
