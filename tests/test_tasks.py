"""morphserve.workloads.tasks: the four quality tasks built from the real mirror files, and broken task files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from morphserve.data.mirror import resolve
from morphserve.workloads.prompts import LONGBENCH_TEMPLATES, OPENCOMPASS_TEMPLATES, format_prompt, parse_prompt
from morphserve.workloads.tasks import (DUREADER_ARTICLES, TASKS, TaskError, TaskExample, dureader_article,
                                        load_task, load_task_report, pool_overlap)

needs_mirror = pytest.mark.skipif(not os.environ.get("MORPHSERVE_DATA_MIRROR"),
                                  reason="MORPHSERVE_DATA_MIRROR is not set (the task files come from the data mirror)")

ARTICLE = re.compile(r"文章(\d+)\n标题：[^\n]*\n[^\n]*")


def _minilongbench(task: str) -> dict[str, dict]:
    return json.loads(resolve(f"minilongbench_{task}").read_text(encoding="utf-8"))


def _jsonl_rows(file_id: str) -> list[dict]:
    """The records of a JSON-lines mirror file (split at "\\n" only: DuReader text holds U+2028)."""
    return [json.loads(line) for line in resolve(file_id).read_text(encoding="utf-8").split("\n") if line.strip()]


def _articles(context: str) -> list[str]:
    return context.split("\n\n")


# ---- counts and accounting on the real files ---------------------------------------------------------------------

@needs_mirror
@pytest.mark.parametrize("task, pool, examples, merged, excluded", [
    ("gov_report", "eval", 25, 1, 0),     # 12 MiniLongBench + 14 L-Eval, L-Eval lines 7 and 14 identical
    ("qmsum", "eval", 271, 1, 0),         # 272 validation queries, one asked twice in a meeting
    ("qmsum", "calibration", 280, 1, 0),  # 281 test queries
    ("dureader", "eval", 99, 0, 1),       # 100 dev questions, one without any answer
    ("dureader", "calibration", 96, 0, 4),
    ("multi_news", "eval", 200, 0, 0),
])
def test_counts_and_every_record_accounted(task, pool, examples, merged, excluded) -> None:
    load = load_task_report(task, pool)
    assert (len(load.examples), len(load.merged), len(load.excluded), len(load.skipped)) == \
        (examples, merged, excluded, 0)
    ids = [ex.id for ex in load.examples]
    assert len(set(ids)) == len(ids)
    assert all(ex.task == task and ex.context.strip() and ex.answers and all(a.strip() for a in ex.answers)
               for ex in load.examples)
    assert {ex.language for ex in load.examples} == {"zh" if task == "dureader" else "en"}
    assert load_task(task, pool) == list(load.examples)


@needs_mirror
def test_gov_report_sources_and_duplicate() -> None:
    load = load_task_report("gov_report")
    ids = [ex.id for ex in load.examples]
    assert sum(i.startswith("gov_report/minilongbench/") for i in ids) == 12
    assert sum(i.startswith("gov_report/leval/") for i in ids) == 13
    assert "gov_report/leval/14" not in ids
    (dup,) = load.merged
    assert dup.source == "leval_gov_report line 14" and "gov_report/leval/7" in dup.reason
    # no report of L-Eval appears among the MiniLongBench ones (whitespace-insensitive, any 200-char window)
    mini = [" ".join(ex.context.split()) for ex in load.examples if "minilongbench" in ex.id]
    for ex in load.examples:
        if "leval" in ex.id:
            flat = " ".join(ex.context.split())
            for probe in (flat[1000:1200], flat[len(flat) // 2:len(flat) // 2 + 200]):
                assert not any(probe in m for m in mini), ex.id


@needs_mirror
def test_qmsum_duplicate_query_keeps_both_references() -> None:
    examples = {ex.id: ex for ex in load_task("qmsum")}
    merged = examples["qmsum/val/7/general0"]
    assert merged.input == "What was the general discussion of the meeting?"
    assert len(merged.answers) == 2 and merged.answers[0] != merged.answers[1]
    assert "qmsum/val/7/specific0" not in examples


@pytest.mark.parametrize("task", ["gov_report", "multi_news"])
def test_tasks_without_a_calibration_pool_refuse_it(task) -> None:
    with pytest.raises(TaskError, match=f"'{task}' has no calibration pool.*dureader, qmsum"):
        load_task(task, "calibration")


def test_unknown_task_pool_and_policy_are_named() -> None:
    with pytest.raises(TaskError, match="'narrativeqa'"):
        load_task("narrativeqa")
    with pytest.raises(TaskError, match="'test'"):
        load_task("qmsum", "test")
    with pytest.raises(ValueError, match="'ignore'"):
        load_task("multi_news", on_bad_record="ignore")
    with pytest.raises(TaskError, match="unknown task file ids \\['qmsum_train'\\]"):
        load_task("qmsum", files={"qmsum_train": "/nonexistent"})


# ---- templates reproduce MiniLongBench's prompts byte for byte ----------------------------------------------------

@needs_mirror
def test_gov_report_minilongbench_prompts_reproduced() -> None:
    examples = {ex.id: ex for ex in load_task("gov_report")}
    for key, rec in _minilongbench("gov_report").items():
        ex = examples[f"gov_report/minilongbench/{key}"]
        assert format_prompt(ex, LONGBENCH_TEMPLATES) == rec["origin_prompt"]
        assert list(ex.answers) == rec["gold"]


@needs_mirror
def test_qmsum_minilongbench_prompts_reproduced_from_the_validation_split() -> None:
    by_prompt = {format_prompt(ex): ex for ex in load_task("qmsum")}
    mini = _minilongbench("qmsum")
    assert len(mini) == 6
    for rec in mini.values():
        ex = by_prompt[rec["origin_prompt"]]  # KeyError: the prompt is not reproduced byte for byte
        assert list(ex.answers) == rec["gold"]


@needs_mirror
def test_multi_news_minilongbench_prompts_reproduced_and_opencompass_newline() -> None:
    examples = load_task("multi_news")
    by_prompt = {format_prompt(ex, OPENCOMPASS_TEMPLATES): ex for ex in examples}
    mini = _minilongbench("multi_news")
    assert len(mini) == 11
    for rec in mini.values():
        ex = by_prompt[rec["origin_prompt"]]
        assert list(ex.answers) == rec["gold"]
        # LongBench's own template differs only by the trailing newline OpenCompass adds
        assert format_prompt(ex, LONGBENCH_TEMPLATES) + "\n" == rec["origin_prompt"]
    assert {t for t in TASKS if LONGBENCH_TEMPLATES[t] != OPENCOMPASS_TEMPLATES[t]} == {"multi_news"}


@needs_mirror
def test_multi_news_keeps_newline_char_tokens_verbatim() -> None:
    rows = _jsonl_rows("multi_news")
    examples = load_task("multi_news")
    assert [ex.context for ex in examples] == [r["context"] for r in rows]
    assert [ex.id for ex in examples] == [f"multi_news/{r['_id']}" for r in rows]
    assert sum(ex.context.count("NEWLINE_CHAR") for ex in examples) == \
        sum(r["context"].count("NEWLINE_CHAR") for r in rows) > 1000


@needs_mirror
def test_dureader_minilongbench_prompts_parse_and_reproduce() -> None:
    for key, rec in _minilongbench("dureader").items():
        prompt = rec["origin_prompt"]
        context, question = parse_prompt("dureader", prompt)
        ex = TaskExample("dureader", key, context, question, tuple(rec["gold"]), "zh", "minilongbench")
        assert format_prompt(ex) == prompt
        articles = _articles(context)
        assert len(articles) == DUREADER_ARTICLES
        for n, article in enumerate(articles, 1):
            m = ARTICLE.fullmatch(article)
            assert m and int(m.group(1)) == n, article[:80]


@needs_mirror
def test_dureader_article_format_matches_minilongbench_documents_exactly() -> None:
    """Six distractor documents of the MiniLongBench dureader prompts are documents of the demo files: the loader's
    article format must reproduce them byte for byte (paragraphs joined by one space)."""
    documents = {}
    for file_id in ("dureader_dev", "dureader_train"):
        for rec in _jsonl_rows(file_id):
            for doc in rec["documents"]:
                documents.setdefault(doc["title"], doc["paragraphs"])
    matched = 0
    for rec in _minilongbench("dureader").values():
        context, _ = parse_prompt("dureader", rec["origin_prompt"])
        for n, article in enumerate(_articles(context), 1):
            title = article.split("\n")[1].removeprefix("标题：")
            if title in documents:
                assert dureader_article(n, title, documents[title]) == article
                matched += 1
    assert matched == 6


@needs_mirror
def test_dureader_context_own_documents_first_then_pool_distractors() -> None:
    dev = _jsonl_rows("dureader_dev")
    own = {str(r["question_id"]): r for r in dev}
    pool_docs = {dureader_article(0, d["title"], d["paragraphs"]).split("\n", 1)[1]
                 for r in dev for d in r["documents"]}
    examples = load_task("dureader")
    for ex in examples:
        rec = own[ex.id.rsplit("/", 1)[1]]
        assert ex.input == rec["question"] and list(ex.answers) == rec["answers"]
        articles = _articles(ex.context)
        assert len(articles) == DUREADER_ARTICLES
        docs = rec["documents"]
        for n, doc in enumerate(docs, 1):
            assert articles[n - 1] == dureader_article(n, doc["title"], doc["paragraphs"])
        own_bodies = {dureader_article(0, d["title"], d["paragraphs"]).split("\n", 1)[1] for d in docs}
        for article in articles[len(docs):]:
            body = article.split("\n", 1)[1]
            assert body in pool_docs and body not in own_bodies
    assert load_task("dureader") == examples  # distractors are deterministic


@needs_mirror
@pytest.mark.parametrize("task", ["qmsum", "dureader"])
def test_calibration_pool_is_disjoint_from_evaluation_pool(task) -> None:
    evaluation, calibration = load_task(task, "eval"), load_task(task, "calibration")
    assert pool_overlap(task, evaluation, calibration) == []
    assert not {ex.id for ex in evaluation} & {ex.id for ex in calibration}
    # the check does find shared material
    assert len(pool_overlap(task, evaluation, evaluation[:3])) >= 3


# ---- broken task files -------------------------------------------------------------------------------------------

_DROP = object()  # a field value meaning "leave the field out"


def _multi_news_record(i: int, **changes) -> dict:
    rec = {"input": "", "context": f"Passage 1:\nstory {i} NEWLINE_CHAR more", "answers": [f"summary {i}"],
           "length": 5, "dataset": "multi_news", "language": "en", "all_classes": None, "_id": f"id{i}"}
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not _DROP}


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
                    encoding="utf-8")
    return path


def test_bad_json_line_raises_naming_file_and_line(tmp_path) -> None:
    path = _write_jsonl(tmp_path / "mn.jsonl", [_multi_news_record(0), '{"context": "cut off', _multi_news_record(2)])
    with pytest.raises(TaskError, match=rf"multi_news \({re.escape(str(path))}\) line 2: invalid JSON"):
        load_task("multi_news", files={"multi_news": path})


def test_bad_json_line_is_a_counted_skip_when_asked(tmp_path, caplog) -> None:
    path = _write_jsonl(tmp_path / "mn.jsonl", [_multi_news_record(0), "not json", "", _multi_news_record(3)])
    load = load_task_report("multi_news", files={"multi_news": path}, on_bad_record="skip")
    assert [ex.id for ex in load.examples] == ["multi_news/id0", "multi_news/id3"]
    (skip,) = load.skipped
    assert "line 2" in skip.source and "invalid JSON" in skip.reason
    assert "skipping bad task record" in caplog.text and "line 2" in caplog.text


@pytest.mark.parametrize("change, message", [
    (dict(answers=_DROP), "line 1: answers: missing"),
    (dict(answers=[]), "line 1: answers: empty list"),
    (dict(answers=["ok", "  "]), r"line 1: answers\[1\]: empty answer"),
    (dict(answers="a summary"), "line 1: answers: expected a list, got str"),
    (dict(context=""), "line 1: context: empty"),
    (dict(context=7), "line 1: context: expected a string, got int"),
    (dict(_id=_DROP), "line 1: _id: missing"),
])
def test_multi_news_bad_fields_are_named(tmp_path, change, message) -> None:
    path = _write_jsonl(tmp_path / "mn.jsonl", [_multi_news_record(0, **change), _multi_news_record(1)])
    with pytest.raises(TaskError, match=message):
        load_task("multi_news", files={"multi_news": path})
    load = load_task_report("multi_news", files={"multi_news": path}, on_bad_record="skip")
    assert [ex.id for ex in load.examples] == ["multi_news/id1"] and len(load.skipped) == 1


def test_all_records_bad_is_an_error_even_when_skipping(tmp_path) -> None:
    path = _write_jsonl(tmp_path / "mn.jsonl", ["{", "["])
    with pytest.raises(TaskError, match="no usable examples"):
        load_task("multi_news", files={"multi_news": path}, on_bad_record="skip")


def test_duplicate_ids_are_an_error(tmp_path) -> None:
    path = _write_jsonl(tmp_path / "mn.jsonl", [_multi_news_record(0), _multi_news_record(1, _id="id0")])
    with pytest.raises(TaskError, match="'multi_news/id0' occurs twice"):
        load_task("multi_news", files={"multi_news": path})


def _meeting(queries: list[dict], specific: list[dict] | None = None) -> dict:
    return {"topic_list": [], "meeting_transcripts": [{"speaker": "A", "content": "hello ."},
                                                      {"speaker": "B", "content": "hi ."}],
            "general_query_list": queries, "specific_query_list": specific or []}


def test_qmsum_bad_query_names_its_field(tmp_path) -> None:
    good = _meeting([{"query": "Summarize.", "answer": "They greet."}])
    bad = _meeting([{"query": "Summarize.", "answer": "They greet."}], [{"query": "Who spoke?"}])
    path = _write_jsonl(tmp_path / "q.jsonl", [good, bad])
    with pytest.raises(TaskError, match=r"line 2: specific_query_list\[0\]\.answer: missing"):
        load_task("qmsum", files={"qmsum_val": path})
    load = load_task_report("qmsum", files={"qmsum_val": path}, on_bad_record="skip")
    (ex,) = load.examples
    assert (ex.id, ex.context, ex.input, ex.answers) == ("qmsum/val/1/general0", "A: hello .\nB: hi .",
                                                        "Summarize.", ("They greet.",))
    assert len(load.skipped) == 1


def test_qmsum_bad_transcript_turn_names_its_field(tmp_path) -> None:
    meeting = _meeting([{"query": "q", "answer": "a"}])
    meeting["meeting_transcripts"][1] = {"speaker": "B"}
    path = _write_jsonl(tmp_path / "q.jsonl", [meeting])
    with pytest.raises(TaskError, match=r"line 1: meeting_transcripts\[1\]\.content: missing"):
        load_task("qmsum", files={"qmsum_val": path})


def _dureader_record(qid: int, answers, n_docs: int = 5) -> dict:
    return {"question_id": qid, "question": f"问题{qid}", "answers": answers,
            "documents": [{"title": f"标题{qid}-{d}", "paragraphs": [f"段落{qid}-{d}-a", f"段落{qid}-{d}-b"]}
                          for d in range(n_docs)]}


def test_dureader_question_without_answer_is_excluded_but_empty_answer_is_an_error(tmp_path) -> None:
    records = [_dureader_record(q, [f"答案{q}"]) for q in range(5)] + [_dureader_record(5, [])]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    load = load_task_report("dureader", files={"dureader_dev": path})
    assert len(load.examples) == 5 and len(load.excluded) == 1 and "question_id 5" in load.excluded[0].source
    ex = load.examples[0]
    assert _articles(ex.context)[:2] == ["文章1\n标题：标题0-0\n段落0-0-a 段落0-0-b",
                                         "文章2\n标题：标题0-1\n段落0-1-a 段落0-1-b"]
    assert len(_articles(ex.context)) == DUREADER_ARTICLES
    assert all("标题0-" not in a for a in _articles(ex.context)[5:])  # distractors come from other questions

    records[2] = _dureader_record(2, [""])
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(TaskError, match=r"line 3: answers\[0\]: empty answer"):
        load_task("dureader", files={"dureader_dev": path})


def test_dureader_pool_too_small_for_distractors_is_named(tmp_path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [_dureader_record(q, ["答"], n_docs=2) for q in range(3)])
    with pytest.raises(TaskError, match="only 4 documents of other questions to pad question_id 0 to 20"):
        load_task("dureader", files={"dureader_dev": path})


def test_calibration_pool_sharing_a_document_with_eval_is_refused(tmp_path) -> None:
    dev = [_dureader_record(q, ["答"]) for q in range(5)]
    train = [_dureader_record(q + 100, ["答"]) for q in range(4)] + [_dureader_record(2, ["答"])]
    files = {"dureader_dev": _write_jsonl(tmp_path / "dev.jsonl", dev),
             "dureader_train": _write_jsonl(tmp_path / "train.jsonl", train)}
    with pytest.raises(TaskError, match="calibration pool shares material with the evaluation pool"):
        load_task("dureader", "calibration", files=files)


def test_minilongbench_broken_document_and_foreign_prompt(tmp_path) -> None:
    leval = _write_jsonl(tmp_path / "l.jsonl", [{"input": "report", "outputs": ["summary"], "instructions": []}])
    broken = tmp_path / "g.json"
    broken.write_text('{"0": {"origin_prompt": "x",\n "gold": [}', encoding="utf-8")
    files = {"minilongbench_gov_report": broken, "leval_gov_report": leval}
    with pytest.raises(TaskError, match=r"minilongbench_gov_report .* line 2 column \d+: invalid JSON"):
        load_task("gov_report", files=files)
    foreign = tmp_path / "g2.json"
    prompt = LONGBENCH_TEMPLATES["qmsum"].format(context="A: hi", input="q")
    foreign.write_text(json.dumps({"0": {"origin_prompt": prompt, "gold": ["s"]}}), encoding="utf-8")
    files["minilongbench_gov_report"] = foreign
    with pytest.raises(TaskError, match="record '0': origin_prompt: gov_report prompt does not start with"):
        load_task("gov_report", files=files)
    load = load_task_report("gov_report", files=files, on_bad_record="skip")
    assert [ex.id for ex in load.examples] == ["gov_report/leval/1"] and len(load.skipped) == 1


def test_leval_record_without_outputs_is_named(tmp_path) -> None:
    mini = tmp_path / "g.json"
    mini.write_text(json.dumps({"0": {"origin_prompt": LONGBENCH_TEMPLATES["gov_report"].format(context="r", input=""),
                                      "gold": ["s"]}}), encoding="utf-8")
    leval = _write_jsonl(tmp_path / "l.jsonl", [{"input": "report", "outputs": []}])
    with pytest.raises(TaskError, match=r"leval_gov_report .* line 1: outputs: empty list"):
        load_task("gov_report", files={"minilongbench_gov_report": mini, "leval_gov_report": leval})
