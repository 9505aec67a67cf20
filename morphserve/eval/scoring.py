"""Task-quality scores of generated answers, under two named schemes, in percent (0 to 100).

Every score is the maximum over an example's references (LongBench's rule, applied to every scheme), times 100.
Predictions are scored exactly as given: LongBench post-processes predictions (``prediction.lstrip('\\n')
.split('\\n')[0]``) only for trec, triviaqa, samsum and lsht, none of which is among these four tasks.

``"longbench"`` - **the headline** (:data:`HEADLINE_SCHEME`): LongBench's official ``eval.py``/``metrics.py``
(THUDM/LongBench).  gov_report, qmsum and multi_news use ``rouge_score``: ROUGE-L F of the ``rouge`` package
(``Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]``; the package splits both texts into sentences at
"." and computes summary-level union-LCS over whitespace words, case-sensitive, no stemming).  dureader uses
``rouge_zh_score``: both texts segmented by jieba (``cut_all=False``), joined by spaces, then the same ROUGE-L.
As in LongBench, any exception of the ``rouge`` package scores 0.  That happens for an empty prediction (or one made
only of "." and whitespace), and for a "sentence" so long that the package's recursive LCS reconstruction exceeds
Python's recursion limit, which can happen to unpunctuated Chinese text of several hundred words.  :func:`score_all`
counts these failures by kind, so a zero caused by the scorer is never mistaken for a wrong answer.
Why headline: it is the reference implementation of the benchmark whose data and prompts these tasks use, so the
numbers are comparable with published LongBench results; it gives meaningful scores for the Chinese task (jieba
words); and the paper's own scoring code is not public, so the ``"paper"`` scheme below is a reconstruction.

``"paper"`` - the paper's metrics as its text describes them ("ROUGE-L for summaries, F1 for QA"), computed as the
usual Hugging Face ``evaluate`` code computes them, without depending on ``evaluate``.  Summaries: Google's
``rouge-score`` package, ``RougeScorer(["rougeL"], use_stemmer=True)`` F-measure (``evaluate``'s rouge wraps this
scorer; note that ``evaluate``'s own default is ``use_stemmer=False``).  Its tokenizer lowercases, keeps only
``[a-z0-9]`` runs and Porter-stems them.  DuReader (QA): set-based token F1 over whitespace tokens:
``P = set(pred.split())``, ``R = set(ref.split())``, ``c = |P & R|``; the score is 0 when ``c == 0``, else
``2 * (c/|P|) * (c/|R|) / (c/|P| + c/|R|)``.  There is no lowercasing, punctuation removal or normalisation.

``"paper_jieba"`` - identical to ``"paper"`` except that DuReader's tokens are jieba words (``cut_all=False``,
whitespace-only words dropped) instead of whitespace tokens.  Chinese has no spaces, so under ``"paper"`` a whole
answer is one token and DuReader's F1 is 100 for an exact string match and 0 for almost anything else (and the
``rouge-score`` tokenizer would drop every Chinese character, scoring 0).  This variant makes the paper-style DuReader
number meaningful; it is reported beside the faithful one, never instead of it.  The paper's MLSys text describes an
English-translated DuReader; none is public, so these tasks use the original Chinese.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from morphserve.workloads.tasks import TASKS

SUMMARY_TASKS = ("gov_report", "qmsum", "multi_news")
SCHEMES = ("longbench", "paper", "paper_jieba")
HEADLINE_SCHEME = "longbench"
SCALE = 100.0  # scores are percentages

_SCORER_PACKAGES = ("rouge", "rouge-score", "jieba", "nltk")


# ---- the scoring libraries (imported on first use: rouge-score pulls in nltk, which is slow to import) -----------

@functools.lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge import Rouge

    return Rouge()


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@functools.lru_cache(maxsize=1)
def _jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading messages go to stderr at DEBUG level otherwise
    jieba.initialize()
    return jieba


def jieba_words(text: str) -> list[str]:
    """jieba's words of ``text`` (precise mode, ``cut_all=False``), as LongBench segments Chinese."""
    return list(_jieba().cut(text, cut_all=False))


def scorer_versions() -> dict[str, str]:
    """Installed versions of the scoring packages (part of a score's provenance)."""
    out = {}
    for name in _SCORER_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# ---- the metrics (each returns a fraction in [0, 1] and, for LongBench's rouge, the failure if any) ---------------

def _longbench_rouge(prediction: str, reference: str) -> tuple[float, str | None]:
    """LongBench ``rouge_score``: the rouge package's ROUGE-L F; 0 on any exception (reported as the second item)."""
    try:
        scores = _rouge().get_scores([prediction], [reference], avg=True)
    except Exception as exc:  # LongBench: bare except -> 0.0; the kind of failure is kept for reporting
        return 0.0, type(exc).__name__
    return float(scores["rouge-l"]["f"]), None


def _longbench_rouge_zh(prediction: str, reference: str) -> tuple[float, str | None]:
    """LongBench ``rouge_zh_score``: jieba words joined by spaces, then the rouge package's ROUGE-L F."""
    return _longbench_rouge(" ".join(jieba_words(prediction)), " ".join(jieba_words(reference)))


def _rouge_l_stemmed(prediction: str, reference: str) -> float:
    """Google rouge-score ROUGE-L F-measure with Porter stemming."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def set_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """F1 between the *sets* of tokens (each distinct token counts once), in [0, 1]."""
    pred, ref = set(prediction_tokens), set(reference_tokens)
    common = len(pred & ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _metric(task: str, scheme: str, prediction: str, reference: str) -> tuple[float, str | None]:
    if scheme == "longbench":
        return (_longbench_rouge_zh if task == "dureader" else _longbench_rouge)(prediction, reference)
    if task in SUMMARY_TASKS:
        return _rouge_l_stemmed(prediction, reference), None
    if scheme == "paper":
        return set_f1(prediction.split(), reference.split()), None
    return set_f1([w for w in jieba_words(prediction) if w.strip()],
                  [w for w in jieba_words(reference) if w.strip()]), None


def metric_name(task: str, scheme: str = HEADLINE_SCHEME) -> str:
    """A human-readable name of the metric that ``scheme`` uses for ``task``."""
    _check(task, scheme)
    if scheme == "longbench":
        if task == "dureader":
            return "ROUGE-L F on jieba words (LongBench rouge_zh_score, rouge package)"
        return "ROUGE-L F (LongBench rouge_score, rouge package)"
    if task in SUMMARY_TASKS:
        return "ROUGE-L F (rouge-score, Porter stemming)"
    if scheme == "paper":
        return "set F1 on whitespace tokens"
    return "set F1 on jieba words"


# ---- public API --------------------------------------------------------------------------------------------------

def _check(task: str, scheme: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scoring scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def _check_pair(prediction: Any, answers: Any, where: str = "") -> None:
    if not isinstance(prediction, str):
        raise ValueError(f"{where}prediction must be a string, got {type(prediction).__name__} {prediction!r:.60}")
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
        raise ValueError(f"{where}answers must be a list of reference strings, got {type(answers).__name__} "
                         f"{answers!r:.60}")
    if not answers:
        raise ValueError(f"{where}answers is empty: a prediction needs at least one reference")
    for i, a in enumerate(answers):
        if not isinstance(a, str):
            raise ValueError(f"{where}answers[{i}] must be a string, got {type(a).__name__} {a!r:.60}")


def _score_one(task: str, prediction: str, answers: Sequence[str], scheme: str) -> tuple[float, list[str]]:
    best, failures = 0.0, []
    for reference in answers:
        value, failure = _metric(task, scheme, prediction, reference)
        best = max(best, value)
        if failure is not None:
            failures.append(failure)
    return SCALE * best, failures


def score(task: str, prediction: str, answers: Sequence[str], scheme: str = HEADLINE_SCHEME) -> float:
    """The score of one prediction against its references: the maximum over ``answers``, in percent [0, 100]."""
    _check(task, scheme)
    _check_pair(prediction, answers)
    return _score_one(task, prediction, answers, scheme)[0]


def score_all(task: str, predictions: Sequence[str], answers_list: Sequence[Sequence[str]],
              scheme: str = HEADLINE_SCHEME) -> dict[str, Any]:
    """Score every prediction against its own references.

    Returns ``{"task", "scheme", "metric", "unit": "percent", "n", "mean", "per_example", "scorer_failures"}``:
    ``mean`` is the plain mean of ``per_example`` (LongBench rounds it to 2 decimals for display; this does not);
    ``scorer_failures`` counts, by exception type, the (example, reference) pairs that the rouge package could not
    score and that therefore count 0 as in LongBench (always empty for the ``rouge-score``/F1 metrics).
    """
    _check(task, scheme)
    if isinstance(predictions, str) or isinstance(answers_list, str):
        raise ValueError("predictions and answers_list must be lists (one entry per example), not a string")
    if len(predictions) != len(answers_list):
        raise ValueError(f"{len(predictions)} predictions for {len(answers_list)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    per_example, failures = [], Counter()
    for i, (prediction, answers) in enumerate(zip(predictions, answers_list)):
        _check_pair(prediction, answers, f"example {i}: ")
        value, failed = _score_one(task, prediction, answers, scheme)
        per_example.append(value)
        failures.update(failed)
    return {
        "task": task,
        "scheme": scheme,
        "metric": metric_name(task, scheme),
        "unit": "percent",
        "n": len(per_example),
        "mean": sum(per_example) / len(per_example),
        "per_example": per_example,
        "scorer_failures": dict(sorted(failures.items())),
    }


def score_report(task: str, predictions: Sequence[str], answers_list: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Every scheme's :func:`score_all` for the same predictions, with the headline named and the scorer versions."""
    schemes = {s: score_all(task, predictions, answers_list, s) for s in SCHEMES}
    return {
        "task": task,
        "headline_scheme": HEADLINE_SCHEME,
        "headline_mean": schemes[HEADLINE_SCHEME]["mean"],
        "schemes": schemes,
        "scorer_versions": scorer_versions(),
    }
