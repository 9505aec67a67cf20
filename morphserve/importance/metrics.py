"""Layer importance metrics: LTS, LRS, MDS (the paper's three cosine metrics), KL, and their normalisation.

Conventions (decided here; the paper leaves them open):

* **Sensitivity, not similarity.**  Every metric is reported as a *sensitivity* ``1 - cos``: 0 when the two
  vectors point the same way, larger when they differ.  Higher means more important, i.e. swapped *later*; a
  greedy order takes the least sensitive layer first.
* **Token aggregation.**  The cosine is taken per token over the hidden dimension and averaged over every token of
  every calibration window (``mean_t (1 - cos_t)``, equal to ``1 - mean_t cos_t``).  Calibration windows are cut
  to a fixed length from long documents, so there is no padding to exclude.
* **Numerics.**  ``1 - cos`` of nearly parallel vectors cancels catastrophically when ``cos`` is computed first
  (a W8 layer moves the residual stream by ~1e-7 in these units, float32's resolution).  :func:`cosine_distance`
  uses the equivalent ``0.5 * || a/|a| - b/|b| ||^2`` in float64, which keeps full relative precision.

The metrics, for layer ``p`` at precision ``P`` (``x_p``: the FP16 model's residual stream entering layer ``p``):

* **LTS** (transformation): ``1 - cos(x_p, f_p(x_p))`` with the FP16 layer ``f_p``: how much the layer changes its
  input (an identity layer scores 0).
* **LRS** (replacement): ``1 - cos(f_p(x_p), f^P_p(x_p))``: FP16 and quantized layer on the *same FP16 input*
  ``x_p``, so the score is the layer's own replacement error, not drift accumulated by quantized layers before it.
  Outputs are residual streams (the layer's update plus its input), which measures the error relative to the
  stream that the next layers read.
* **MDS** (model degradation): ``1 - cos(h, h_{Q+p})`` of the *final-normed hidden states* (the LM head's input)
  of the FP16 model ``h`` and of the model with the layers ``Q + {p}`` at ``P``, where ``Q`` is the set a greedy
  search has already chosen.  It is re-evaluated for every remaining ``p`` at every greedy step
  (:func:`degradation_scores`); the cosine measure follows the paper, which found cosine better than L2.
* **KL** (not part of LIS; the criterion of the KL-greedy order): mean over tokens of
  ``KL(softmax(z) || softmax(z_{Q+p}))`` of the next-token distributions, in nats.

**Normalisation** (:func:`normalise`): raw ranges differ by orders of magnitude (measured on SmolLM2-135M over
16 x 256 QMSum calibration tokens: LTS 0.019 to 0.98, W4 LRS 6.4e-4 to 4.4e-3, W8 LRS 4.8e-6 to 3.4e-5), so a raw
weighted sum would be decided by LTS alone.  Each metric is mapped to ``[0, 1]`` over the set of layers being
compared, by rank (default: ties get their average rank, then ``rank / (n - 1)``) or min-max
(``(v - min) / (max - min)``).  Rank is the default because LTS has outliers: on SmolLM2-135M layer 0 scores 0.98
and layer 29 0.29 while 26 of the other 28 layers lie between 0.019 and 0.072, so under min-max those 26 are
squeezed into the bottom 6% of the range, and LTS then has almost no say among the candidates a greedy search
actually picks from.  With ranks the weights 0.25 / 0.25 / 0.5 mean what they say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from morphserve.importance.runner import LayerRunner, quantized_config
from morphserve.importance.sweep import SweepStats, sweep
from morphserve.memory.weight_arena import Precision

NORMALISATIONS = ("rank", "minmax")
LIS_WEIGHTS = (0.25, 0.25, 0.5)  # LTS, LRS, MDS


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ``1 - cos(a, b)`` over the last dimension, in float64, as ``0.5 * ||a/|a| - b/|b|||^2``.  A zero row
    has no direction: it raises rather than returning an arbitrary value."""
    if a.shape != b.shape:
        raise ValueError(f"cosine distance of tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    if bool((na == 0).any()) or bool((nb == 0).any()):
        raise ValueError("cosine distance of a zero vector is undefined")
    return 0.5 * (a64 / na - b64 / nb).pow(2).sum(dim=-1)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-row ``KL(softmax(ref_logits) || softmax(logits))`` in nats, both ``[N, V]``; the log-softmax of both is
    taken in float64 (so equal logits give exactly 0).  Rows are processed ``chunk`` at a time."""
    if ref_logits.shape != logits.shape or ref_logits.dim() != 2:
        raise ValueError(f"KL needs two [N, V] tensors of the same shape, got {tuple(ref_logits.shape)} and "
                         f"{tuple(logits.shape)}")
    out = []
    for s in range(0, logits.shape[0], chunk):
        lp_ref = F.log_softmax(ref_logits[s:s + chunk].double(), dim=-1)
        lp = F.log_softmax(logits[s:s + chunk].double(), dim=-1)
        out.append((lp_ref.exp() * (lp_ref - lp)).sum(dim=-1))
    return torch.cat(out)


def normalise(values: Mapping[int, float], method: str = "rank") -> dict[int, float]:
    """``values`` (layer -> raw sensitivity) mapped to ``[0, 1]`` over the given layers (module docstring).

    A single layer, or layers that all tie, map to 0."""
    if method not in NORMALISATIONS:
        raise ValueError(f"normalisation {method!r}: expected one of {', '.join(NORMALISATIONS)}")
    if not values:
        raise ValueError("cannot normalise an empty set of scores")
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"non-finite scores {bad}")
    keys = list(values)
    n = len(keys)
    if method == "minmax":
        lo, hi = min(values.values()), max(values.values())
        return {k: (values[k] - lo) / (hi - lo) if hi > lo else 0.0 for k in keys}
    if n == 1:
        return {keys[0]: 0.0}
    ordered = sorted(keys, key=lambda k: values[k])
    rank: dict[int, float] = {}
    i = 0
    while i < n:  # average rank over ties
        j = i
        while j + 1 < n and values[ordered[j + 1]] == values[ordered[i]]:
            j += 1
        for k in ordered[i:j + 1]:
            rank[k] = (i + j) / 2
        i = j + 1
    return {k: rank[k] / (n - 1) for k in keys}


@dataclass(frozen=True)
class LayerScores:
    """Per-layer LTS and LRS sensitivities (index = layer) on one calibration set, for one precision."""

    precision: Precision
    lts: list[float]
    lrs: list[float]
    tokens: int


@torch.no_grad()
def layer_scores(runner: LayerRunner, tokens: torch.Tensor, precision: Precision) -> LayerScores:
    """LTS and LRS of every layer (module docstring) in one FP16 pass over ``tokens`` (``[B, T]`` windows):
    layer ``p``'s FP16 input is recorded, and both its FP16 and its ``precision`` variant run on it."""
    if precision == Precision.FP16:
        raise ValueError("LRS compares a layer with its quantized variant: precision must be w8 or w4, not fp16")
    x = runner.embed(tokens)
    lts, lrs = [], []
    for p in range(runner.num_layers):
        y = runner.layer(p, Precision.FP16, x)
        y_q = runner.layer(p, precision, x)  # the same FP16 input: the layer's own error only
        lts.append(float(cosine_distance(x, y).mean()))
        lrs.append(float(cosine_distance(y, y_q).mean()))
        x = y
    return LayerScores(precision, lts, lrs, int(tokens.numel()))


class DegradationProbe:
    """Model-level degradation of configurations ``Q + {p}`` against the FP16 model, on fixed windows.

    ``measure="mds"``: mean-token ``1 - cos`` of the final-normed hidden states; ``measure="kl"``: mean-token KL of
    the next-token distributions.  The FP16 reference (final hidden states, and log-probabilities for KL) is
    computed once (its logits too, for KL); every call then runs one :func:`sweep` over its candidates."""

    MEASURES = ("mds", "kl")

    def __init__(self, runner: LayerRunner, tokens: torch.Tensor, measure: str = "mds"):
        if measure not in self.MEASURES:
            raise ValueError(f"degradation measure {measure!r}: expected one of {', '.join(self.MEASURES)}")
        self.runner = runner
        self.measure = measure
        self.x0 = runner.embed(tokens)
        self.tokens = int(tokens.numel())
        (self.ref_hidden,) = runner.run(tokens)
        self.ref_logits = (runner.logits(self.ref_hidden.reshape(-1, self.ref_hidden.shape[-1]))
                           if measure == "kl" else None)
        self.stats = SweepStats()

    def _reduce(self, hidden: torch.Tensor) -> float:
        if self.measure == "mds":
            return float(cosine_distance(self.ref_hidden, hidden).mean())
        assert self.ref_logits is not None
        flat = hidden.reshape(-1, hidden.shape[-1])
        return float(kl_divergence(self.ref_logits, self.runner.logits(flat)).mean())

    def configs(self, configs: Sequence[Sequence[Precision]], desc: str | None = None) -> list[float]:
        """The measure of each configuration."""
        values, stats = sweep(self.runner, self.x0, configs, self._reduce, desc)
        self.stats.add(stats)
        return values

    def candidates(self, chosen: Sequence[int], candidates: Sequence[int], precision: Precision,
                   desc: str | None = None) -> dict[int, float]:
        """The measure of ``chosen + {p}`` at ``precision`` for every ``p`` in ``candidates``."""
        overlap = sorted(set(chosen) & set(candidates))
        if overlap:
            raise ValueError(f"layers {overlap} are both chosen and candidates")
        n = self.runner.num_layers
        configs = [quantized_config(n, [*chosen, p], precision) for p in candidates]
        return dict(zip(candidates, self.configs(configs, desc)))


def degradation_scores(runner: LayerRunner, tokens: torch.Tensor, precision: Precision, chosen: Sequence[int],
                       candidates: Sequence[int], measure: str = "mds") -> dict[int, float]:
    """MDS (or KL) of ``chosen + {p}`` for every candidate ``p`` (one-off; searches keep a DegradationProbe)."""
    return DegradationProbe(runner, tokens, measure).candidates(chosen, candidates, precision)
