"""Perplexity with bootstrap confidence intervals over documents, and paired comparisons of configurations.

Input: per-document summed negative log-likelihoods ``nll[d]`` (nats) over ``tokens[d]`` predictions.  Perplexity
is ``exp(sum_d nll[d] / sum_d tokens[d])``.  Documents are the resampling unit (the evaluation windows are one per
document, :mod:`morphserve.importance.texts`, so they are independent draws): a bootstrap replicate draws as many
documents with replacement and recomputes the statistic; the interval is the percentile interval of ``resamples``
replicates.

*Paired* comparisons resample the *same* documents for both configurations, so the document-to-document variation
that both share (some texts are simply harder) cancels: the statistic is the perplexity ratio ``A / B``,
``exp((sum nll_A - sum nll_B) / sum tokens)`` over the drawn documents.  A comparison is a *win* for B only when the
whole interval of ``A / B - 1`` lies above 0, a *loss* when it lies below 0, and a *tie* otherwise: a difference
whose interval includes 0 is not counted either way.  ``draws(...)`` fixes the resampled indices once so that every
comparison of a study uses the same replicates (seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    value: float
    low: float
    high: float
    level: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level}


def draws(num_documents: int, resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """``[resamples, num_documents]`` document indices drawn with replacement (numpy's PCG64, ``seed``)."""
    if num_documents < 2 or resamples < 100:
        raise ValueError(f"a bootstrap needs >= 2 documents and >= 100 resamples, got {num_documents}, {resamples}")
    return np.random.default_rng(seed).integers(0, num_documents, size=(resamples, num_documents))


def _check(nll: Sequence[float], tokens: Sequence[int], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, t = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if a.shape != t.shape or a.ndim != 1 or a.shape[0] != idx.shape[1]:
        raise ValueError(f"per-document NLL {a.shape}, tokens {t.shape} and draws over {idx.shape[1]} documents "
                         f"do not match")
    if not np.isfinite(a).all() or (t <= 0).any():
        raise ValueError("per-document NLLs must be finite and token counts positive")
    return a, t


def _interval(value: float, replicates: np.ndarray, level: float) -> Interval:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(lo), float(hi), level)


def perplexity(nll: Sequence[float], tokens: Sequence[int], idx: np.ndarray, level: float = 0.95) -> Interval:
    """Perplexity of one configuration with its bootstrap interval."""
    a, t = _check(nll, tokens, idx)
    reps = np.exp(a[idx].sum(axis=1) / t[idx].sum(axis=1))
    return _interval(float(np.exp(a.sum() / t.sum())), reps, level)


def paired_ratio(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[int], idx: np.ndarray,
                 level: float = 0.95) -> Interval:
    """``ppl_A / ppl_B - 1`` with its paired bootstrap interval (same documents, same draws)."""
    a, t = _check(nll_a, tokens, idx)
    b, _ = _check(nll_b, tokens, idx)
    d = a - b
    reps = np.expm1(d[idx].sum(axis=1) / t[idx].sum(axis=1))
    return _interval(float(np.expm1(d.sum() / t.sum())), reps, level)


def paired_mean_ratio(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], tokens: Sequence[int],
                      idx: np.ndarray, level: float = 0.95) -> Interval:
    """The mean over several paired comparisons (e.g. over ``k``) of ``log(ppl_A / ppl_B)``, reported as
    ``exp(mean) - 1`` with a paired interval (the same draws for every pair)."""
    if not pairs:
        raise ValueError("no comparisons to average")
    t = np.asarray(tokens, dtype=np.float64)
    logs, reps = [], []
    for a_raw, b_raw in pairs:
        a, _ = _check(a_raw, tokens, idx)
        b, _ = _check(b_raw, tokens, idx)
        d = a - b
        logs.append(d.sum() / t.sum())
        reps.append(d[idx].sum(axis=1) / t[idx].sum(axis=1))
    return _interval(float(np.expm1(np.mean(logs))), np.expm1(np.mean(reps, axis=0)), level)


def verdict(ratio_other_vs_ref: Interval) -> str:
    """``"better"`` when the reference is better (the other's perplexity is higher over the whole interval),
    ``"worse"`` when it is lower over the whole interval, ``"tie"`` otherwise."""
    if ratio_other_vs_ref.low > 0:
        return "better"
    if ratio_other_vs_ref.high < 0:
        return "worse"
    return "tie"
