"""The paper's four quality tasks as LongBench-format records, read from the verified files of the data manifest.

Every example is a :class:`TaskExample` with LongBench's fields (``context``, ``input``, ``answers``), so the prompt
templates of :mod:`morphserve.workloads.prompts` and the scorers of :mod:`morphserve.eval.scoring` treat all four tasks
alike.  How each task is built from its public source:

``gov_report``
    The 12 LongBench prompts of MiniLongBench (the context is cut out of ``origin_prompt`` with the gov_report
    template and must reproduce the prompt byte for byte; the answers are ``gold``) plus the L-Eval GovReport reports
    (``input`` is the report, ``outputs[0]`` the summary).  The L-Eval file holds 14 records but its lines 7 and 14
    are the same report with the same summary, so the task has **25** distinct examples (see *Duplicates*).
``qmsum``
    LongBench's construction from QMSum: per meeting, context = ``"\\n".join(f"{speaker}: {content}")`` over
    ``meeting_transcripts``; one example per query of ``general_query_list`` and ``specific_query_list`` (input =
    query, answer = its answer).  This reproduces all 6 MiniLongBench qmsum prompts byte for byte from the
    validation split.  The validation split has 272 queries; meeting 7 (line 7) asks "What was the general
    discussion of the meeting?" twice with two different answers, so the task has **271** examples, one of them with
    two references (the test split: 281 queries, 280 examples).
``dureader``
    LongBench's context format, checked against the 6 MiniLongBench dureader prompts: 20 articles
    ``文章{n}\\n标题：{title}\\n{paragraphs joined by " "}`` separated by blank lines.  The question's own documents
    come first, in file order, followed by distractor documents up to 20 articles, as in all 6 MiniLongBench prompts.
    Paragraphs are joined by a single space: six distractor documents of those prompts are documents of the DuReader
    demo files and their article bodies equal ``" ".join(paragraphs)`` exactly (a newline join does not match: every
    LongBench article is exactly three lines).  Distractors are documents of *other questions of the same pool*,
    drawn without replacement by ``random.Random(f"dureader:{split}:{question_id}")`` (deterministic across runs and
    Python versions), so no document crosses pools.  Input = question, answers = ``answers``, language zh.
    DuReader leaves some questions without any reference answer (``answers: []``, allowed by its schema): they
    cannot be scored, so they are *excluded* and reported (dev: 1 of 100, so **99**; train: 4 of 100, so **96**).
``multi_news``
    The 200 LongBench records as they are, including the literal ``NEWLINE_CHAR`` tokens of their contexts.

Pools.  ``pool="eval"`` is what quality is reported on; ``pool="calibration"`` is a disjoint pool for anything that
is *chosen* from data (layer orders, thresholds, strategy selection), so that no evaluation example is ever used to
choose.  Only two tasks have a second public split in the mirror: qmsum (eval = QMSum validation, the split LongBench
uses; calibration = QMSum test) and dureader (eval = demo dev; calibration = demo train).  gov_report and multi_news
have no calibration pool: asking for one raises :class:`TaskError` rather than carving one out of evaluation data.
Loading a calibration pool checks that it shares no meeting transcript (qmsum) or document (dureader) with the
evaluation pool and raises :class:`TaskError` if it does.

Duplicates.  Examples whose context and input are equal after whitespace normalisation are merged into the first
one: its answers gain the other's references (a duplicate reference is kept once).  A duplicate would otherwise weigh
one prompt twice in a task mean.  Each merge is reported in :attr:`TaskLoad.merged`.

Broken files.  A line that is not JSON, a missing or mistyped field, or an empty answer raises :class:`TaskError`
naming the file, the line (or record key) and the field.  With ``on_bad_record="skip"`` the record is skipped
instead, logged as a warning and listed in :attr:`TaskLoad.skipped`; nothing is dropped silently.  A file that cannot
be parsed at all (a MiniLongBench JSON document with a syntax error) always raises.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from morphserve.data.mirror import resolve
from morphserve.workloads.prompts import OPENCOMPASS_TEMPLATES, parse_prompt

log = logging.getLogger(__name__)

TASKS = ("gov_report", "qmsum", "dureader", "multi_news")
POOLS = ("eval", "calibration")
BAD_RECORD_POLICIES = ("raise", "skip")

Language = Literal["en", "zh"]
Pool = Literal["eval", "calibration"]

# Number of articles in every LongBench dureader context (the question's documents plus distractors).
DUREADER_ARTICLES = 20

# Where one article of a dureader context ends and the next begins.
_ARTICLE_BREAK = re.compile(r"\n\n(?=文章\d+\n标题：)")

# Manifest file ids read by each (task, pool).
TASK_FILES: dict[tuple[str, str], tuple[str, ...]] = {
    ("gov_report", "eval"): ("minilongbench_gov_report", "leval_gov_report"),
    ("qmsum", "eval"): ("qmsum_val",),
    ("qmsum", "calibration"): ("qmsum_test",),
    ("dureader", "eval"): ("dureader_dev",),
    ("dureader", "calibration"): ("dureader_train",),
    ("multi_news", "eval"): ("multi_news",),
}


class TaskError(ValueError):
    """A task, pool or task file that cannot be turned into examples; the message names the file, record and field."""


@dataclass(frozen=True)
class TaskExample:
    """One LongBench-format example.

    ``id`` is unique within a task and stable across runs; ``source`` names the file (manifest id) and record it was
    built from.  ``input`` is empty for the summarisation tasks whose template has no query (gov_report,
    multi_news).  ``answers`` holds one or more references; scores take the maximum over them.
    """

    task: str
    id: str
    context: str
    input: str
    answers: tuple[str, ...]
    language: Language
    source: str


@dataclass(frozen=True)
class Dropped:
    """A record that did not become an example of its own, and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class TaskLoad:
    """The examples of one (task, pool) and every record that did not become an example.

    ``skipped``: broken records skipped under ``on_bad_record="skip"``; ``excluded``: records that are valid but
    cannot be evaluated (a DuReader question without any reference answer); ``merged``: duplicates folded into an
    earlier example.
    """

    task: str
    pool: str
    files: tuple[str, ...]
    examples: tuple[TaskExample, ...]
    skipped: tuple[Dropped, ...] = ()
    excluded: tuple[Dropped, ...] = ()
    merged: tuple[Dropped, ...] = ()

    def summary(self) -> str:
        return (f"{self.task}/{self.pool}: {len(self.examples)} examples from {', '.join(self.files)}; "
                f"{len(self.merged)} duplicates merged, {len(self.excluded)} excluded, {len(self.skipped)} skipped")


# ---- record validation -------------------------------------------------------------------------------------------

class _BadRecord(Exception):
    """A record with a missing or mistyped field (internal; becomes a TaskError or a counted skip)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _get(rec: Any, field: str, path: str = "") -> Any:
    name = f"{path}{field}"
    if not isinstance(rec, dict):
        raise _BadRecord(path.rstrip(".") or "record", f"expected a JSON object, got {type(rec).__name__}")
    if field not in rec:
        raise _BadRecord(name, "missing")
    return rec[field]


def _text(rec: Any, field: str, path: str = "", *, allow_empty: bool = False) -> str:
    value = _get(rec, field, path)
    if not isinstance(value, str):
        raise _BadRecord(f"{path}{field}", f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not allow_empty and not value.strip():
        raise _BadRecord(f"{path}{field}", "empty")
    return value


def _list(rec: Any, field: str, path: str = "", *, allow_empty: bool = False) -> list[Any]:
    value = _get(rec, field, path)
    if not isinstance(value, list):
        raise _BadRecord(f"{path}{field}", f"expected a list, got {type(value).__name__} {value!r:.60}")
    if not allow_empty and not value:
        raise _BadRecord(f"{path}{field}", "empty list")
    return value


def _answers(rec: Any, field: str, path: str = "") -> tuple[str, ...]:
    """A non-empty list of non-empty reference strings."""
    values = _list(rec, field, path)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise _BadRecord(f"{path}{field}[{i}]", f"expected a string, got {type(v).__name__} {v!r:.60}")
        if not v.strip():
            raise _BadRecord(f"{path}{field}[{i}]", "empty answer")
    return tuple(values)


class _Collector:
    """Applies the bad-record policy: raise a TaskError, or record a counted skip."""

    def __init__(self, policy: str):
        if policy not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record={policy!r}; expected one of {', '.join(BAD_RECORD_POLICIES)}")
        self.policy = policy
        self.skipped: list[Dropped] = []
        self.excluded: list[Dropped] = []

    def reject(self, where: str, problem: str) -> None:
        message = f"{where}: {problem}"
        if self.policy == "raise":
            raise TaskError(message + " (pass on_bad_record='skip' to skip such records and have them counted)")
        log.warning("skipping bad task record: %s", message)
        self.skipped.append(Dropped(where, problem))


def _jsonl(path: Path, file_id: str, collector: _Collector) -> Iterator[tuple[str, int, Any]]:
    """(location, 1-based line number, parsed object) for every non-blank line; bad JSON goes to the collector."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{file_id} ({path}) line {lineno}"
            try:
                yield where, lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                collector.reject(where, f"invalid JSON: {exc}")


def _json_document(path: Path, file_id: str) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{file_id} ({path}) line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None


# ---- per-task builders -------------------------------------------------------------------------------------------

def _gov_report(paths: Mapping[str, Path], collector: _Collector) -> list[TaskExample]:
    examples = []
    file_id = "minilongbench_gov_report"
    doc = _json_document(paths[file_id], file_id)
    if not isinstance(doc, dict):
        raise TaskError(f"{file_id} ({paths[file_id]}): expected a JSON object of records, got {type(doc).__name__}")
    for key, rec in doc.items():
        where = f"{file_id} ({paths[file_id]}) record {key!r}"
        try:
            prompt = _text(rec, "origin_prompt")
            try:
                context, _ = parse_prompt("gov_report", prompt, OPENCOMPASS_TEMPLATES)
            except ValueError as exc:
                raise _BadRecord("origin_prompt", str(exc)) from None
            answers = _answers(rec, "gold")
        except _BadRecord as bad:
            collector.reject(where, str(bad))
            continue
        examples.append(TaskExample("gov_report", f"gov_report/minilongbench/{key}", context, "", answers, "en",
                                    f"{file_id} record {key}"))
    file_id = "leval_gov_report"
    for where, lineno, rec in _jsonl(paths[file_id], file_id, collector):
        try:
            report = _text(rec, "input")
            summary = _answers(rec, "outputs")[0]
        except _BadRecord as bad:
            collector.reject(where, str(bad))
            continue
        examples.append(TaskExample("gov_report", f"gov_report/leval/{lineno}", report, "", (summary,), "en",
                                    f"{file_id} line {lineno}"))
    return examples


def _qmsum_context(rec: Any) -> str:
    turns = _list(rec, "meeting_transcripts")
    lines = []
    for i, turn in enumerate(turns):
        path = f"meeting_transcripts[{i}]."
        lines.append(f"{_text(turn, 'speaker', path)}: {_text(turn, 'content', path, allow_empty=True)}")
    return "\n".join(lines)


def _qmsum(paths: Mapping[str, Path], collector: _Collector) -> list[TaskExample]:
    (file_id,) = paths
    split = file_id.removeprefix("qmsum_")
    examples = []
    for where, lineno, rec in _jsonl(paths[file_id], file_id, collector):
        try:
            context = _qmsum_context(rec)
            queries = []
            for kind in ("general", "specific"):
                field = f"{kind}_query_list"
                for i, q in enumerate(_list(rec, field, allow_empty=True)):
                    path = f"{field}[{i}]."
                    queries.append((kind, i, _text(q, "query", path), (_text(q, "answer", path),)))
            if not queries:
                raise _BadRecord("general_query_list", "the meeting has no queries")
        except _BadRecord as bad:
            collector.reject(where, str(bad))
            continue
        for kind, i, query, answers in queries:
            examples.append(TaskExample("qmsum", f"qmsum/{split}/{lineno}/{kind}{i}", context, query, answers, "en",
                                        f"{file_id} line {lineno} {kind}_query_list[{i}]"))
    return examples


def dureader_article(number: int, title: str, paragraphs: list[str] | tuple[str, ...]) -> str:
    """One article of a LongBench dureader context: ``文章{number}\\n标题：{title}\\n{paragraphs joined by " "}``."""
    return f"文章{number}\n标题：{title}\n{' '.join(paragraphs)}"


def _dureader_document(doc: Any, path: str) -> tuple[str, tuple[str, ...]]:
    title = _text(doc, "title", path, allow_empty=True)
    paragraphs = _list(doc, "paragraphs", path)
    for i, p in enumerate(paragraphs):
        if not isinstance(p, str):
            raise _BadRecord(f"{path}paragraphs[{i}]", f"expected a string, got {type(p).__name__}")
    return title, tuple(paragraphs)


def _dureader(paths: Mapping[str, Path], collector: _Collector) -> list[TaskExample]:
    (file_id,) = paths
    split = file_id.removeprefix("dureader_")
    questions = []  # (qid, question, own documents, answers, lineno)
    for where, lineno, rec in _jsonl(paths[file_id], file_id, collector):
        try:
            qid = _get(rec, "question_id")
            if not isinstance(qid, (int, str)) or isinstance(qid, bool):
                raise _BadRecord("question_id", f"expected an integer or string, got {type(qid).__name__}")
            question = _text(rec, "question")
            docs = tuple(_dureader_document(d, f"documents[{i}].") for i, d in enumerate(_list(rec, "documents")))
            if len(docs) > DUREADER_ARTICLES:
                raise _BadRecord("documents", f"{len(docs)} documents; a LongBench context holds "
                                              f"{DUREADER_ARTICLES} articles")
            if _list(rec, "answers", allow_empty=True) == []:
                collector.excluded.append(Dropped(f"{file_id} line {lineno} question_id {qid}",
                                                  f"DuReader gives no reference answer for {question!r}"))
                continue
            answers = _answers(rec, "answers")
        except _BadRecord as bad:
            collector.reject(where, str(bad))
            continue
        questions.append((qid, question, docs, answers, lineno))

    examples = []
    for qid, question, docs, answers, lineno in questions:
        others = [d for other_qid, _, other_docs, _, _ in questions if other_qid != qid for d in other_docs]
        need = DUREADER_ARTICLES - len(docs)
        if len(others) < need:
            raise TaskError(f"{file_id} ({paths[file_id]}): only {len(others)} documents of other questions to pad "
                            f"question_id {qid} to {DUREADER_ARTICLES} articles; need {need}")
        distractors = random.Random(f"dureader:{split}:{qid}").sample(others, need)
        context = "\n\n".join(dureader_article(n, title, paragraphs)
                              for n, (title, paragraphs) in enumerate(docs + tuple(distractors), 1))
        examples.append(TaskExample("dureader", f"dureader/{split}/{qid}", context, question, answers, "zh",
                                    f"{file_id} line {lineno} question_id {qid}"))
    return examples


def _multi_news(paths: Mapping[str, Path], collector: _Collector) -> list[TaskExample]:
    (file_id,) = paths
    examples = []
    for where, lineno, rec in _jsonl(paths[file_id], file_id, collector):
        try:
            context = _text(rec, "context")
            query = _text(rec, "input", allow_empty=True)
            answers = _answers(rec, "answers")
            uid = _text(rec, "_id")
        except _BadRecord as bad:
            collector.reject(where, str(bad))
            continue
        examples.append(TaskExample("multi_news", f"multi_news/{uid}", context, query, answers, "en",
                                    f"{file_id} line {lineno}"))
    return examples


_BUILDERS: dict[str, Callable[[Mapping[str, Path], _Collector], list[TaskExample]]] = {
    "gov_report": _gov_report,
    "qmsum": _qmsum,
    "dureader": _dureader,
    "multi_news": _multi_news,
}


# ---- duplicates and pools ----------------------------------------------------------------------------------------

def _key(text: str) -> str:
    return " ".join(text.split())


def _merge_duplicates(examples: list[TaskExample]) -> tuple[list[TaskExample], list[Dropped]]:
    first: dict[tuple[str, str], int] = {}
    kept: list[TaskExample] = []
    merged: list[Dropped] = []
    for ex in examples:
        key = (_key(ex.context), _key(ex.input))
        if key not in first:
            first[key] = len(kept)
            kept.append(ex)
            continue
        target = kept[first[key]]
        new = tuple(a for a in ex.answers if a not in target.answers)
        kept[first[key]] = dataclasses.replace(target, answers=target.answers + new)
        merged.append(Dropped(ex.source, f"same context and input as {target.id} ({target.source}); "
                                         f"{len(new)} new reference(s) added to it"))
    return kept, merged


def _content_units(example: TaskExample) -> set[str]:
    """What must not be shared between pools: the meeting (qmsum) or each document (dureader)."""
    if example.task == "dureader":  # each article without its "文章{n}" line: the numbering differs by example
        return {_key(a.split("\n", 1)[1]) for a in _ARTICLE_BREAK.split(example.context)}
    return {_key(example.context)}


def pool_overlap(task: str, eval_examples: list[TaskExample] | tuple[TaskExample, ...],
                 calibration_examples: list[TaskExample] | tuple[TaskExample, ...]) -> list[tuple[str, str]]:
    """(eval id, calibration id) pairs that share a meeting transcript or a document, or ask the same question about
    the same material; empty when the pools are disjoint."""
    owner: dict[str, str] = {}
    for ex in eval_examples:
        for unit in _content_units(ex):
            owner.setdefault(unit, ex.id)
    pairs = []
    for ex in calibration_examples:
        hits = sorted({owner[u] for u in _content_units(ex) if u in owner})
        pairs.extend((h, ex.id) for h in hits)
    return pairs


# ---- public entry points -----------------------------------------------------------------------------------------

def _check_name(name: str, pool: str) -> tuple[str, ...]:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    if pool not in POOLS:
        raise TaskError(f"unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
    try:
        return TASK_FILES[(name, pool)]
    except KeyError:
        with_calibration = sorted(t for t, p in TASK_FILES if p == "calibration")
        raise TaskError(f"task {name!r} has no calibration pool: every example of it is an evaluation example and "
                        f"must not be used to choose anything; calibration pools exist for "
                        f"{', '.join(with_calibration)}") from None


def load_task_report(name: str, pool: Pool = "eval", *, on_bad_record: str = "raise",
                     files: Mapping[str, str | Path] | None = None) -> TaskLoad:
    """Build the examples of task ``name`` in ``pool`` and account for every record that did not become one.

    ``files`` replaces manifest ids by local paths (ids as in :data:`TASK_FILES`); without it every file is resolved
    and checksum-verified through :func:`morphserve.data.mirror.resolve`.  A calibration pool is checked against
    the evaluation pool (built from the same ``files`` mapping) and raises TaskError if they share material.
    """
    file_ids = _check_name(name, pool)
    collector = _Collector(on_bad_record)
    files = dict(files or {})
    unknown = sorted(set(files) - {f for ids in TASK_FILES.values() for f in ids})
    if unknown:
        raise TaskError(f"files names unknown task file ids {unknown}; known: "
                        f"{', '.join(sorted({f for ids in TASK_FILES.values() for f in ids}))}")
    paths = {fid: Path(files[fid]) if fid in files else resolve(fid) for fid in file_ids}
    examples, merged = _merge_duplicates(_BUILDERS[name](paths, collector))
    seen: dict[str, str] = {}
    for ex in examples:
        if ex.id in seen:
            raise TaskError(f"{name}/{pool}: example id {ex.id!r} occurs twice ({seen[ex.id]} and {ex.source})")
        seen[ex.id] = ex.source
    if not examples:
        raise TaskError(f"{name}/{pool}: no usable examples in {', '.join(str(p) for p in paths.values())}")
    if pool == "calibration":
        evaluation = load_task_report(name, "eval", on_bad_record=on_bad_record, files=files).examples
        shared = pool_overlap(name, evaluation, examples)
        if shared:
            raise TaskError(f"{name}: the calibration pool shares material with the evaluation pool "
                            f"({len(shared)} pairs, e.g. {shared[0][0]} and {shared[0][1]})")
    result = TaskLoad(name, pool, tuple(str(p) for p in paths.values()), tuple(examples), tuple(collector.skipped),
                      tuple(collector.excluded), tuple(merged))
    log.info("%s", result.summary())
    for d in result.excluded + result.merged:
        log.info("%s/%s: %s: %s", name, pool, d.source, d.reason)
    return result


def load_task(name: str, pool: Pool = "eval", *, on_bad_record: str = "raise",
              files: Mapping[str, str | Path] | None = None) -> list[TaskExample]:
    """The examples of task ``name`` (one of :data:`TASKS`) in ``pool`` ("eval" or "calibration"), in file order.

    See :func:`load_task_report` for the arguments and for the records that did not become examples.
    """
    return list(load_task_report(name, pool, on_bad_record=on_bad_record, files=files).examples)
