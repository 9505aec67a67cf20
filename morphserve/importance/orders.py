"""Swap orders: permutations of the decoder layers, least important (swapped first) to most important.

Every order is built by an :class:`OrderStrategy` behind one interface: ``build(num_layers, precision, data)``
returns an :class:`OrderResult` (the permutation plus a JSON record of how it was chosen).  The first ``k`` layers
of an order are the layers quantized when ``k`` layers run at ``precision``; each order is nested by construction,
which runtime swapping needs (going from ``k`` to ``k + 1`` swaps one more layer).

====================  ===========================================================================================
strategy              how the order is chosen
====================  ===========================================================================================
``lis``               greedy on the Layer Importance Score ``0.25 LTS + 0.25 LRS + 0.5 MDS``
                      (:mod:`morphserve.importance.metrics`): at each step, for every remaining layer ``p``, MDS of
                      ``Q + {p}`` given the layers ``Q`` already chosen is measured; the three metrics are
                      normalised over the remaining layers; the layer with the lowest LIS is taken (ties: lower
                      raw MDS, then lower index).  LTS and LRS are static (FP16 input) and computed once.
``kl-greedy``         the same greedy loop on one criterion: the mean KL of next-token distributions of
                      ``Q + {p}`` against FP16 (ties: lower index).
``contiguous-block``  every prefix of the order is a contiguous block of layers.  The degradation (MDS, or KL) of
                      every block ``[a, b)`` is measured once on calibration windows: ``L (L + 1) / 2``
                      configurations, exactly the number of candidate configurations the LIS greedy evaluates
                      (``L + (L - 1) + ... + 1``), so both searches get the same budget.  The order is then the
                      nested chain of blocks (each one layer longer than the last, grown left or right) that
                      minimises ``sum_k log D(block_k)``, found exactly by dynamic programming over intervals.  The
                      log gives every ``k`` the same weight in relative terms (raw degradations grow by orders of
                      magnitude with ``k``, so a raw sum would let the deepest blocks decide everything).
``front-to-back``     ``0, 1, ..., L-1``: the paper's fallback when no profile exists.
``back-to-front``     ``L-1, ..., 0``: the order of the paper's public code release.
``random``            a seeded shuffle (``random.Random(seed)``).
====================  ===========================================================================================

Data-driven strategies take :class:`CalibrationData`, whose windows must come from a *calibration* pool
(:mod:`morphserve.importance.texts`); an order is never chosen on evaluation text.  LTS and LRS use all calibration
windows; the greedy and block searches use the first ``search_windows`` of them, because their cost is
``O(L^3)`` token-layers (see :class:`CalibrationData`).
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from morphserve.importance.metrics import (LIS_WEIGHTS, NORMALISATIONS, DegradationProbe, layer_scores,
                                           normalise)
from morphserve.importance.runner import LayerRunner
from morphserve.importance.texts import TokenWindows
from morphserve.memory.weight_arena import Precision


@dataclass(frozen=True)
class CalibrationData:
    """What a data-driven strategy may look at: the runner (model + staged variants) and calibration windows.

    ``search_windows``: how many of the windows (the first ones) the greedy and block searches use.  A greedy
    evaluates every remaining layer at every step, each from its own position to the last layer: about
    ``L (L + 1)^2 / 4`` token-layers per search token (7,200 for 30 layers, 240 full forwards), against ``2 L`` per
    calibration token for LTS and LRS together."""

    runner: LayerRunner
    windows: TokenWindows
    search_windows: int

    def __post_init__(self) -> None:
        if self.windows.pool != "calibration":
            raise ValueError(f"orders are chosen on calibration text only; these windows come from the "
                             f"{self.windows.task}/{self.windows.pool} pool")
        if not 1 <= self.search_windows <= self.windows.num_windows:
            raise ValueError(f"search_windows={self.search_windows} must be in [1, {self.windows.num_windows}]")

    def score_tokens(self) -> torch.Tensor:
        return self.windows.tensor()

    def search_tokens(self) -> torch.Tensor:
        return self.windows.tensor(0, self.search_windows)

    def provenance(self) -> dict[str, Any]:
        return {**self.windows.provenance(), "search_windows": self.search_windows,
                "search_tokens_sha256": self.windows.head(self.search_windows).tokens_sha256}


@dataclass
class OrderResult:
    """A swap order (least important first) and how it was chosen."""

    strategy: str
    precision: str
    order: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    token_layers: int = 0  # compute spent on calibration windows (decoder layers x tokens)

    def __post_init__(self) -> None:
        check_order(self.order, len(self.order))

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "precision": self.precision, "order": list(self.order),
                "settings": self.settings, "details": self.details, "seconds": self.seconds,
                "token_layers": self.token_layers}


def check_order(order: Sequence[int], num_layers: int) -> list[int]:
    """``order`` as a list; raises ValueError unless it is a permutation of ``0 .. num_layers - 1``."""
    order = [int(i) for i in order]
    if sorted(order) != list(range(num_layers)):
        raise ValueError(f"a swap order must be a permutation of 0..{num_layers - 1}, got {order}")
    return order


class OrderStrategy(ABC):
    """One way of choosing a swap order."""

    name: str
    uses_calibration: bool = False

    def settings(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _build(self, num_layers: int, precision: Precision,
               data: CalibrationData | None) -> tuple[list[int], dict[str, Any], int]:
        """(order, details, token-layers spent)."""

    def build(self, num_layers: int, precision: Precision, data: CalibrationData | None = None) -> OrderResult:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        precision = Precision(precision)
        if precision == Precision.FP16:
            raise ValueError("a swap order is for a quantized precision (w8 or w4), not fp16")
        if self.uses_calibration:
            if data is None:
                raise ValueError(f"order {self.name!r} is chosen on calibration data; none was given")
            if data.runner.num_layers != num_layers:
                raise ValueError(f"the runner's model has {data.runner.num_layers} layers, not {num_layers}")
        t0 = time.perf_counter()
        order, details, cost = self._build(num_layers, precision, data)
        settings = self.settings()
        if self.uses_calibration:
            assert data is not None
            settings = {**settings, "calibration": data.provenance()}
        return OrderResult(self.name, precision.value, check_order(order, num_layers), settings, details,
                           time.perf_counter() - t0, cost)


class FrontToBack(OrderStrategy):
    name = "front-to-back"

    def _build(self, num_layers, precision, data):
        return list(range(num_layers)), {}, 0


class BackToFront(OrderStrategy):
    name = "back-to-front"

    def _build(self, num_layers, precision, data):
        return list(reversed(range(num_layers))), {}, 0


class RandomOrder(OrderStrategy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng": "random.Random(seed).shuffle"}

    def _build(self, num_layers, precision, data):
        order = list(range(num_layers))
        random.Random(self.seed).shuffle(order)
        return order, {}, 0


# ---- greedy ------------------------------------------------------------------------------------------------------
StepScores = Callable[[list[int], list[int]], tuple[dict[int, float], dict[int, float], dict[str, Any]]]
"""``(chosen Q, remaining R) -> (score per p in R, tie-break per p in R, JSON record of the step)``."""


def greedy_order(num_layers: int, step_scores: StepScores, desc: str | None = None) -> tuple[list[int], list[dict]]:
    """Build an order one layer at a time: at each step ``step_scores(Q, R)`` scores every remaining layer *given
    the chosen list Q* and the lowest ``(score, tie-break, index)`` is taken.  Returns the order and one record
    per step (``chosen`` plus whatever ``step_scores`` recorded)."""
    chosen: list[int] = []
    remaining = list(range(num_layers))
    steps: list[dict] = []
    for step in tqdm(range(num_layers), desc=desc, unit="step", leave=False, disable=desc is None):
        scores, tiebreak, record = step_scores(list(chosen), list(remaining))
        missing = sorted(set(remaining) - set(scores))
        if missing:
            raise ValueError(f"greedy step {step}: no score for remaining layers {missing}")
        pick = min(remaining, key=lambda p: (scores[p], tiebreak.get(p, 0.0), p))
        steps.append({"step": step, "chosen": pick, "score": scores[pick], **record})
        chosen.append(pick)
        remaining.remove(pick)
    return chosen, steps


def _by_layer(values: dict[int, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in sorted(values.items())}


class LISOrder(OrderStrategy):
    """The paper's Layer Importance Score, greedy (module docstring)."""

    name = "lis"
    uses_calibration = True

    def __init__(self, weights: tuple[float, float, float] = LIS_WEIGHTS, normalisation: str = "rank"):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation {normalisation!r}: expected one of {', '.join(NORMALISATIONS)}")
        if len(weights) != 3 or any(w < 0 for w in weights) or not math.isclose(sum(weights), 1.0):
            raise ValueError(f"LIS weights (LTS, LRS, MDS) must be three non-negative numbers summing to 1, "
                             f"got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.normalisation = normalisation

    def settings(self) -> dict[str, Any]:
        return {"weights": {"lts": self.weights[0], "lrs": self.weights[1], "mds": self.weights[2]},
                "normalisation": self.normalisation, "normalised_over": "the remaining layers at each step",
                "sensitivity": "1 - cosine similarity, mean over tokens; higher = more important = swapped later",
                "mds": "1 - cos of final-normed hidden states, model with Q + {p} quantized vs FP16",
                "tie_break": "lower raw MDS, then lower layer index"}

    def _build(self, num_layers, precision, data):
        assert data is not None
        runner = data.runner
        static = layer_scores(runner, data.score_tokens(), precision)
        cost = 2 * num_layers * static.tokens
        probe = DegradationProbe(runner, data.search_tokens(), "mds")
        w_lts, w_lrs, w_mds = self.weights

        def step(chosen: list[int], remaining: list[int]):
            mds = probe.candidates(chosen, remaining, precision)
            n_lts = normalise({p: static.lts[p] for p in remaining}, self.normalisation)
            n_lrs = normalise({p: static.lrs[p] for p in remaining}, self.normalisation)
            n_mds = normalise(mds, self.normalisation)
            lis = {p: w_lts * n_lts[p] + w_lrs * n_lrs[p] + w_mds * n_mds[p] for p in remaining}
            return lis, mds, {"mds": _by_layer(mds), "lis": _by_layer(lis)}

        order, steps = greedy_order(num_layers, step, desc=f"LIS greedy {precision.value}")
        mds_alone = [steps[0]["mds"][str(p)] for p in range(num_layers)]  # step 0: Q is empty

        def over_all(values: list[float]) -> list[float]:
            n = normalise(dict(enumerate(values)), self.normalisation)
            return [n[p] for p in range(num_layers)]

        details = {
            "lts": static.lts, "lrs": static.lrs, "mds_alone": mds_alone,
            "normalised_all_layers": {"lts": over_all(static.lts), "lrs": over_all(static.lrs),
                                      "mds_alone": over_all(mds_alone)},
            "score_tokens": static.tokens, "search_tokens": probe.tokens, "steps": steps,
        }
        return order, details, cost + probe.stats.token_layers


class KLGreedyOrder(OrderStrategy):
    """Greedy on the KL of next-token distributions against FP16 (module docstring)."""

    name = "kl-greedy"
    uses_calibration = True

    def settings(self) -> dict[str, Any]:
        return {"criterion": "mean over tokens of KL(P_fp16 || P_{Q+p}) of next-token distributions, nats",
                "tie_break": "lower layer index"}

    def _build(self, num_layers, precision, data):
        assert data is not None
        probe = DegradationProbe(data.runner, data.search_tokens(), "kl")

        def step(chosen: list[int], remaining: list[int]):
            kl = probe.candidates(chosen, remaining, precision)
            return kl, {}, {"kl": _by_layer(kl)}

        order, steps = greedy_order(num_layers, step, desc=f"KL greedy {precision.value}")
        return order, {"search_tokens": probe.tokens, "steps": steps}, probe.stats.token_layers


# ---- contiguous block --------------------------------------------------------------------------------------------
def all_blocks(num_layers: int) -> list[tuple[int, int]]:
    """Every contiguous block ``[a, b)`` of layers, ``L (L + 1) / 2`` of them."""
    return [(a, b) for a in range(num_layers) for b in range(a + 1, num_layers + 1)]


def nested_block_chain(num_layers: int, cost: dict[tuple[int, int], float]) -> list[int]:
    """The order whose prefixes are contiguous blocks and whose blocks' summed ``cost`` is least.

    ``cost[(a, b)]`` is given for every block ``[a, b)``.  Dynamic programming over intervals:
    ``best(a, b) = cost(a, b) + min(best(a + 1, b), best(a, b - 1))``, single layers being the base case; ties
    prefer growing the block to the right (adding layer ``b - 1`` last)."""
    missing = [blk for blk in all_blocks(num_layers) if blk not in cost]
    if missing:
        raise ValueError(f"no cost for blocks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    best: dict[tuple[int, int], float] = {}
    came_from: dict[tuple[int, int], tuple[int, int] | None] = {}
    for length in range(1, num_layers + 1):
        for a in range(0, num_layers - length + 1):
            b = a + length
            if length == 1:
                best[(a, b)], came_from[(a, b)] = cost[(a, b)], None
                continue
            left, right = (a + 1, b), (a, b - 1)  # the block before layer a, resp. layer b - 1, was added
            prev = right if best[right] <= best[left] else left
            best[(a, b)], came_from[(a, b)] = cost[(a, b)] + best[prev], prev
    order: list[int] = []
    blk: tuple[int, int] | None = (0, num_layers)
    while blk is not None:
        prev = came_from[blk]
        if prev is None:
            order.append(blk[0])
        else:
            order.append(blk[0] if prev == (blk[0] + 1, blk[1]) else blk[1] - 1)
        blk = prev
    return order[::-1]


class ContiguousBlockOrder(OrderStrategy):
    """Nested contiguous blocks chosen on calibration data with the LIS search budget (module docstring)."""

    name = "contiguous-block"
    uses_calibration = True

    def __init__(self, measure: str = "mds"):
        if measure not in DegradationProbe.MEASURES:
            raise ValueError(f"block measure {measure!r}: expected one of {', '.join(DegradationProbe.MEASURES)}")
        self.measure = measure

    def settings(self) -> dict[str, Any]:
        return {"measure": self.measure, "objective": "min over nested contiguous chains of sum_k log D(block_k)",
                "search": "every block [a, b) evaluated once: L (L + 1) / 2 configurations, as many as LIS"}

    def _build(self, num_layers, precision, data):
        assert data is not None
        probe = DegradationProbe(data.runner, data.search_tokens(), self.measure)
        blocks = all_blocks(num_layers)
        configs = [tuple(precision if a <= i < b else Precision.FP16 for i in range(num_layers)) for a, b in blocks]
        values = probe.configs(configs, desc=f"contiguous blocks {precision.value}")
        floor = min((v for v in values if v > 0), default=1.0) * 1e-3  # a block measured as exactly 0: log(0) guard
        cost = {blk: math.log(max(v, floor)) for blk, v in zip(blocks, values)}
        order = nested_block_chain(num_layers, cost)
        details = {"search_tokens": probe.tokens,
                   "blocks": [{"start": a, "stop": b, self.measure: v} for (a, b), v in zip(blocks, values)]}
        return order, details, probe.stats.token_layers


STRATEGIES: dict[str, Callable[..., OrderStrategy]] = {
    "lis": LISOrder, "kl-greedy": KLGreedyOrder, "contiguous-block": ContiguousBlockOrder,
    "front-to-back": FrontToBack, "back-to-front": BackToFront, "random": RandomOrder,
}


def make_strategy(name: str, **kwargs: Any) -> OrderStrategy:
    """The strategy called ``name`` (a key of :data:`STRATEGIES`) with its keyword settings."""
    try:
        return STRATEGIES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown order strategy {name!r}; expected one of {', '.join(STRATEGIES)}") from None
