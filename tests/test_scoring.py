"""morphserve.eval.scoring: LongBench-official and paper-style task scores, hand-computed cases, real answers."""

from __future__ import annotations

import os

import pytest

from morphserve.eval.scoring import (HEADLINE_SCHEME, SCHEMES, metric_name, score, score_all, score_report,
                                     scorer_versions, set_f1)
from morphserve.workloads.tasks import TASKS, load_task

needs_mirror = pytest.mark.skipif(not os.environ.get("MORPHSERVE_DATA_MIRROR"),
                                  reason="MORPHSERVE_DATA_MIRROR is not set (the task files come from the data mirror)")

SUMMARY = ("gov_report", "qmsum", "multi_news")
TEXT = "The committee approved the budget. Funding for schools rises by ten percent next year."


@pytest.mark.parametrize("task", SUMMARY)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_identical_text_scores_100_and_disjoint_text_0(task, scheme) -> None:
    # the rouge package divides by (p + r + 1e-8), so identity gives 100 * (1 - 5e-9)
    assert score(task, TEXT, [TEXT], scheme) == pytest.approx(100.0, abs=1e-6)
    assert score(task, "Zebras graze quietly", [TEXT], scheme) == 0.0


def test_hand_computed_rouge_l() -> None:
    # LCS("a b c d", "a c d e f") = "a c d": P = 3/4, R = 3/5, F = 2PR/(P+R) = 2/3 under both ROUGE implementations
    for scheme in ("longbench", "paper"):
        assert score("gov_report", "a b c d", ["a c d e f"], scheme) == pytest.approx(200 / 3, abs=1e-5)
    # case and stemming: rouge-score lowercases and stems (the cat wa run / the cat were run: LCS 3 of 4 -> 75);
    # LongBench's rouge package compares raw words (only "running" is shared: 1 of 4 -> 25)
    assert score("qmsum", "The cats were running", ["the cat was running"], "paper") == pytest.approx(75.0)
    assert score("qmsum", "The cats were running", ["the cat was running"], "longbench") == \
        pytest.approx(25.0, abs=1e-5)


def test_rouge_package_splits_sentences_at_periods() -> None:
    # summary-level ROUGE-L: union LCS per reference sentence; "b a" vs "a. b" -> each reference word matched once
    assert score("multi_news", "b a", ["a. b"], "longbench") == pytest.approx(100.0, abs=1e-5)
    assert score("multi_news", "b a", ["a b"], "longbench") == pytest.approx(50.0, abs=1e-5)


def test_set_f1_is_set_based_on_whitespace_tokens() -> None:
    # sets {a, b, c} and {b, c, d}: 2 common, P = R = 2/3 -> 66.67 (a bag-of-tokens F1 would give 57.14)
    assert score("dureader", "a b b c", ["b c d"], "paper") == pytest.approx(200 / 3)
    assert set_f1(["x"], ["x", "x"]) == 1.0 and set_f1([], ["x"]) == 0.0 and set_f1(["x"], ["y"]) == 0.0
    assert score("dureader", "A b", ["a b"], "paper") == pytest.approx(50.0)  # no lowercasing


def test_maximum_over_references() -> None:
    assert score("gov_report", "a b c d", ["x y z", "a c d e f", "q"]) == score("gov_report", "a b c d", ["a c d e f"])
    assert score("dureader", "是", ["否", "是"], "paper") == 100.0


def test_predictions_are_not_post_processed_for_these_tasks() -> None:
    # LongBench keeps only the first line for trec/triviaqa/samsum/lsht; for these tasks the whole text counts
    assert score("qmsum", "\nintroduction\nthe real answer", ["the real answer"]) > 0.0


def test_chinese_under_each_scheme() -> None:
    answer = "测试服就是体验服"
    # exact answer: high under every scheme
    for scheme in SCHEMES:
        assert score("dureader", answer, [answer], scheme) == pytest.approx(100.0, abs=1e-6)
    # the same answer with a full stop.  jieba words: 测试/服/就是/体验/服(/。); both the rouge package (exclusive
    # n-gram sets) and the set F1 count 4 distinct shared words: R = 4/4, P = 4/5 -> F = 800/9 = 88.89.  The paper's
    # whitespace F1 sees one different token and gives 0.
    assert score("dureader", answer + "。", [answer], "longbench") == pytest.approx(800 / 9, abs=1e-5)
    assert score("dureader", answer + "。", [answer], "paper_jieba") == pytest.approx(800 / 9)
    assert score("dureader", answer + "。", [answer], "paper") == 0.0
    # jieba: 测试/服/就是/体验/服 -> set {测试, 服, 就是, 体验}; "测试服" -> {测试, 服}: P = 1, R = 1/2 -> 66.67
    assert score("dureader", "测试服", [answer], "paper_jieba") == pytest.approx(200 / 3)
    # rouge-score's tokenizer drops every non-latin character: Chinese ROUGE-L is 0 even for identical text
    assert score("gov_report", answer, [answer], "paper") == 0.0


def test_scorer_failures_score_zero_and_are_counted() -> None:
    result = score_all("qmsum", ["", "a b"], [["a b"], ["a b"]], "longbench")
    assert result["per_example"][0] == 0.0 and result["scorer_failures"] == {"ValueError": 1}
    long_prediction = " ".join(f"w{i}" for i in range(700))  # one "sentence" of 700 words: the rouge package's
    long_reference = " ".join(f"w{i}" for i in range(0, 1400, 2))  # recursive LCS reconstruction overflows
    result = score_all("gov_report", [long_prediction], [[long_reference]], "longbench")
    assert result["per_example"] == [0.0] and result["scorer_failures"] == {"RecursionError": 1}
    paper = score_all("gov_report", [long_prediction], [[long_reference]], "paper")
    assert paper["per_example"][0] == pytest.approx(100 * 2 * 350 / 1400) and paper["scorer_failures"] == {}


def test_score_all_mean_and_fields() -> None:
    result = score_all("gov_report", ["a b c d", TEXT], [["a c d e f"], [TEXT]], "paper")
    assert result["per_example"] == pytest.approx([200 / 3, 100.0])
    assert result["mean"] == pytest.approx((200 / 3 + 100) / 2)
    assert (result["n"], result["unit"], result["scheme"]) == (2, "percent", "paper")
    assert result["metric"] == metric_name("gov_report", "paper")


def test_score_report_names_the_headline() -> None:
    report = score_report("dureader", ["是的"], [["是的"]])
    assert report["headline_scheme"] == HEADLINE_SCHEME == "longbench"
    assert set(report["schemes"]) == set(SCHEMES)
    assert report["headline_mean"] == report["schemes"]["longbench"]["mean"]
    assert report["scorer_versions"] == scorer_versions()
    assert all(v != "not installed" for v in scorer_versions().values())


def test_metric_names() -> None:
    names = {(t, s): metric_name(t, s) for t in TASKS for s in SCHEMES}
    assert names[("dureader", "longbench")] == "ROUGE-L F on jieba words (LongBench rouge_zh_score, rouge package)"
    assert names[("dureader", "paper")] == "set F1 on whitespace tokens"
    assert names[("dureader", "paper_jieba")] == "set F1 on jieba words"
    assert names[("multi_news", "paper")] == names[("multi_news", "paper_jieba")] == \
        "ROUGE-L F (rouge-score, Porter stemming)"


@pytest.mark.parametrize("call, message", [
    (lambda: score("trec", "x", ["x"]), "unknown task 'trec'"),
    (lambda: score("qmsum", "x", ["x"], "bleu"), "unknown scoring scheme 'bleu'"),
    (lambda: score("qmsum", "x", "x"), "answers must be a list of reference strings, got str"),
    (lambda: score("qmsum", "x", []), "answers is empty"),
    (lambda: score("qmsum", None, ["x"]), "prediction must be a string, got NoneType"),
    (lambda: score("qmsum", "x", ["x", 3]), r"answers\[1\] must be a string, got int"),
    (lambda: score_all("qmsum", ["x"], [["x"], ["y"]]), "1 predictions for 2 answer lists"),
    (lambda: score_all("qmsum", [], []), "no predictions"),
    (lambda: score_all("qmsum", ["x", 5], [["x"], ["y"]]), "example 1: prediction must be a string"),
])
def test_bad_input_is_named(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@needs_mirror
@pytest.mark.parametrize("task", TASKS)
def test_real_references_score_themselves_high_and_others_low(task) -> None:
    examples = load_task(task)[:12]
    answers = [ex.answers for ex in examples]
    own = score_all(task, [a[0] for a in answers], answers)
    assert own["mean"] == pytest.approx(100.0, abs=1e-5) and own["scorer_failures"] == {}
    shifted = score_all(task, [a[0] for a in answers[1:] + answers[:1]], answers)
    assert shifted["mean"] < 40.0
    assert min(own["per_example"]) > max(shifted["per_example"])
