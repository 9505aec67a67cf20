"""LLM-PQ-style offline precision planner: one static precision per decoder layer, chosen once, before serving.

LLM-PQ (Zhao et al., arXiv 2403.01136) assigns a bit width to every layer offline, with an integer program, under
each device's memory and for a known workload (batch size, prompt and generation lengths).  This baseline keeps
its single-device core: for a model, a memory budget and an expected load it picks a static map
``layer -> {fp16, w8, w4}`` and installs it in the MorphServe engine as a static system (no swap ever happens
afterwards).

**The integer program** (solved exactly by :func:`scipy.optimize.milp`, HiGHS branch and bound)::

    binary x[l, p]                 layer l runs at precision p            (l < L, p in the allowed precisions)
    sum_p x[l, p] = 1              for every layer                        (one-hot)
    sum_{l,p} size[l, p] x[l, p] <= capacity                              (the memory knapsack, integers)
    minimise  sum_{l,p} (loss[l, p] + latency_weight * seconds[p]) x[l, p]

* ``loss[l, p]`` is the predicted quality loss of layer ``l`` at ``p`` (0 at FP16), from the layer-importance
  profile (:class:`QualityScores`, below).  The loss of a map is taken as the sum of its layers' losses, as in
  LLM-PQ's indicator.
* ``seconds[p]`` is the optional phase-aware latency term (:class:`PhaseCost`): the prefill of the load is
  compute-bound (its matmul FLOPs at a per-precision fraction of the device's peak), each decode step is
  memory-bound (the layer's weight bytes at the device's bandwidth).  Off unless a :class:`PhaseCost` is given.

**The memory constraint** (:class:`MemoryModel`).  Weight bytes are ``layout_for(p, cfg, dtype).nbytes`` per layer
(the engine's own per-precision layouts) plus the non-layer weights (embeddings, final norm, untied LM head).  The
load (:class:`Load`) needs ``num_seqs * ceil((prompt_tokens + output_tokens) / block_size)`` KV blocks: the engine
gives every sequence whole blocks, and this many sequences of this length held at once is the peak the plan must
serve.  Two granularities:

* ``pooled`` (LLM-PQ's model, and the issue's statement):
  ``weight_bytes(map) + reserve + needed_blocks * block_bytes <= budget``, i.e. freed weight bytes and the KV cache
  share one pool; ``size[l, p]`` = the layer's bytes, ``capacity = budget - reserve - other weights - needed KV``.
* ``per-slot`` (how this engine realises a map; the plugin uses it): the weight arena keeps every layer's slot at
  FP16 size, the KV pool gets what the budget leaves after FP16 weights (:meth:`MemoryModel.base_kv_blocks`,
  exactly :meth:`morphserve.engine.config.EngineConfig.kv_blocks`), and a quantized layer's free slot tail becomes
  as many *whole* KV blocks as it holds (:meth:`MemoryModel.slot_kv_blocks`, exactly what
  :meth:`morphserve.memory.kv_resizer.KVResizer.grow` carves).  ``size[l, p] = -slot_kv_blocks(l, p)``,
  ``capacity = base_kv_blocks - needed``.  It implies the pooled constraint and is never looser.

Sizes are integers; before solving they are shifted per layer (by the layer's smallest size: the one-hot row makes
that a constant) and divided by their common divisor, which keeps the knapsack row exact in floating point.  Costs
are scaled so that the largest is 1e6, so HiGHS's absolute MIP gap (1e-6) is 1e-12 of the largest cost, and the
relative gap is set to 0: the returned map is optimal up to that.  The solver's map is rounded and checked against
the constraint in integer arithmetic.  A budget that even the smallest map (normally all-W4) does not meet raises
:class:`InfeasiblePlan` (a ValueError) naming the numbers, before the solver runs.

**Quality scores** (:class:`QualityScores`): the loss of layer ``l`` at ``p`` is the profile's ``mds_alone[l]``
(:mod:`morphserve.importance.profile`): ``1 - cos`` of the model's final-normed hidden states with layer ``l``
alone at ``p`` against FP16, on calibration text; it is in the same units at W8 and W4, so it compares precisions
as well as layers.  Profiles are per precision (``<cache>/profiles/<model>/w8.json`` and ``w4.json``, written by
``morphserve profile``).  A precision without a profile gets a documented proxy from the measured weight error
(:func:`weight_errors`: relative squared error ``e[l, p]`` of the layer's projection weights after quantization,
from the engine's own staged variants, data-free):

* W8 without a profile, W4 with one: ``loss[l, W8] = mds_alone_W4[l] * e[l, W8] / e[l, W4]`` (and symmetrically).
  ``1 - cos`` grows as the square of a small perturbation and ``e`` is a squared relative error, so the ratio
  rescales the measured W4 degradation of that layer to W8 under a linear, small-noise model.
* No profile at all (e.g. synthetic weights, for which the workflow writes none): ``loss[l, p] = e[l, p]``, a
  data-free indicator in the spirit of LLM-PQ's variance indicator (weight quantization noise; without activation
  statistics every layer's error counts alike).

**The plugin** :func:`attach` (``system_plugins: {llm-pq: "baselines.llm_pq:attach"}``) plans for the engine it is
given and installs the plan through :func:`morphserve.systems.attach_static` (the same staged variants, layer
swapper, KV resizer and ``Morpher.apply_now`` as the static systems).  Its load (:func:`load_for_engine`): the
engine's batch limit, ``max_num_seqs`` sequences each filling the context window (``max_model_len`` tokens), or the
load named by a system-name suffix ``-s<seqs>-p<prompt>-o<output>`` (``llm-pq-s8-p256-o32``).  Its budget: the
engine's ``memory_budget_bytes``, or, for an engine sized otherwise, its FP16 weights plus its KV pool (plus the
activation reserve on CUDA).  Its scores: profile documents passed as ``profiles=`` (e.g. the ``profile`` field of
the workflow's importance file), else the engine's model's profile files (found by
:func:`morphserve.importance.profile.profile_path`, as ``morphserve profile`` writes them), with the proxies above.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and kernels)
from morphserve.memory.kv_resizer import ReleasePolicy
from morphserve.memory.weight_arena import ALIGN, Precision, layout_for
from morphserve.model.config import ModelConfig
from morphserve.systems import attach_static

log = logging.getLogger(__name__)

QUANTIZED = (Precision.W8, Precision.W4)
ALL_PRECISIONS = (Precision.FP16, Precision.W8, Precision.W4)
GRANULARITIES = ("pooled", "per-slot")
COST_SCALE = 1e6  # the largest objective coefficient after scaling (see the module docstring)
LOAD_SUFFIX = re.compile(r"-s(\d+)-p(\d+)-o(\d+)$")
_CODE = {Precision.FP16: "F", Precision.W8: "8", Precision.W4: "4"}


class InfeasiblePlan(ValueError):
    """No precision map meets the memory budget with the expected load (not even the smallest one)."""


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _precisions(values: Sequence[Any], what: str) -> tuple[Precision, ...]:
    out = []
    for v in values:
        try:
            out.append(Precision(v))
        except ValueError:
            raise ValueError(f"{what}: unknown precision {v!r}; expected one of "
                             f"{', '.join(p.value for p in Precision)}") from None
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{what}: a non-empty list of distinct precisions is needed, got {list(values)!r}")
    return tuple(out)


# ---- the expected load -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """The load a plan must hold at once: ``num_seqs`` sequences of ``prompt_tokens + output_tokens`` tokens each.

    The KV need is ``num_seqs * ceil((prompt_tokens + output_tokens) / block_size)`` blocks (every sequence gets whole
    blocks).  The split into prompt and output matters only to the latency term (:class:`PhaseCost`)."""

    num_seqs: int
    prompt_tokens: int
    output_tokens: int = 0

    def __post_init__(self) -> None:
        _int("num_seqs", self.num_seqs, 1)
        _int("prompt_tokens", self.prompt_tokens, 1)
        _int("output_tokens", self.output_tokens, 0)

    @property
    def tokens_per_seq(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def kv_blocks(self, block_size: int) -> int:
        _int("block_size", block_size, 1)
        return self.num_seqs * -(-self.tokens_per_seq // block_size)

    def to_dict(self) -> dict[str, int]:
        return {"num_seqs": self.num_seqs, "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens}


# ---- memory -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryModel:
    """The bytes of one model's weights at each precision and of its KV blocks, under one memory budget.

    ``reserve_bytes``: kept free of weights and KV (the engine's activation reserve on CUDA, 0 on CPU).
    ``slot_offsets``: each layer slot's device address modulo 256 (the KV resizer starts a slot's blocks on a
    256-byte boundary); None means aligned.  See the module docstring for both granularities."""

    cfg: ModelConfig
    dtype: torch.dtype
    budget_bytes: int
    block_size: int = 16
    reserve_bytes: int = 0
    slot_offsets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _int("budget_bytes", self.budget_bytes, 1)
        _int("reserve_bytes", self.reserve_bytes, 0)
        bs = _int("block_size", self.block_size, 1)
        if bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two, got {bs}")
        offsets = self.slot_offsets
        if offsets is not None and (len(offsets) != self.cfg.num_layers
                                    or any(not 0 <= _int("slot offset", o, 0) < ALIGN for o in offsets)):
            raise ValueError(f"slot_offsets must hold {self.cfg.num_layers} values in [0, {ALIGN}), got {offsets!r}")

    @classmethod
    def for_engine(cls, engine) -> MemoryModel:
        """The memory model of an (all-FP16) engine: its budget, or its FP16 weights plus its KV pool (plus the
        CUDA activation reserve) when it was sized by block count, KV bytes or free memory."""
        from morphserve.engine.config import ACTIVATION_RESERVE_BYTES

        arena = engine.model.arena
        reserve = ACTIVATION_RESERVE_BYTES if engine.device.type == "cuda" else 0
        blocks = engine.pool.num_blocks
        cfg = engine.config
        budget = cfg.memory_budget_bytes if cfg.num_kv_blocks is None and cfg.kv_cache_bytes is None else None
        if budget is None:  # the pool was sized otherwise: the budget it amounts to
            budget = engine.model.weight_bytes() + reserve + blocks * engine.pool.block_bytes
        offsets = tuple(arena.slot(i).data_ptr() % ALIGN for i in range(arena.cfg.num_layers))
        mem = cls(arena.cfg, arena.dtype, int(budget), cfg.block_size, reserve, offsets)
        if mem.fp16_weight_bytes != engine.model.weight_bytes() or mem.block_bytes != engine.pool.block_bytes \
                or mem.base_kv_blocks() != blocks:
            raise ValueError(f"the engine does not match its memory model: weights {engine.model.weight_bytes()} vs "
                             f"{mem.fp16_weight_bytes} bytes, KV block {engine.pool.block_bytes} vs "
                             f"{mem.block_bytes} bytes, KV pool {blocks} vs {mem.base_kv_blocks()} blocks (is the "
                             f"engine all-FP16, with no KV extension attached?)")
        return mem

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    def layer_bytes(self, precision: Precision) -> int:
        """Bytes of one decoder layer at ``precision`` (its layout, aligned)."""
        return layout_for(Precision(precision), self.cfg, self.dtype).nbytes

    @property
    def slot_bytes(self) -> int:
        return self.layer_bytes(Precision.FP16)

    @property
    def other_weight_bytes(self) -> int:
        """Embeddings (twice when the LM head is untied) and the final norm: never quantized."""
        c = self.cfg
        return (c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size) \
            * self.dtype.itemsize

    @property
    def fp16_weight_bytes(self) -> int:
        return self.other_weight_bytes + self.num_layers * self.slot_bytes

    @property
    def block_bytes(self) -> int:
        from morphserve.memory.kv_pool import KVPool

        return KVPool.block_nbytes(self.cfg, self.block_size, self.dtype)

    def weight_bytes(self, precisions: Sequence[Precision]) -> int:
        """Weight bytes of the map ``precisions`` (one per layer) plus the non-layer weights."""
        self._check_map(precisions)
        return self.other_weight_bytes + sum(self.layer_bytes(p) for p in precisions)

    def base_kv_blocks(self) -> int:
        """KV blocks the budget leaves an all-FP16 engine (:meth:`EngineConfig.kv_blocks`'s budget rule)."""
        return (self.budget_bytes - self.reserve_bytes - self.fp16_weight_bytes) // self.block_bytes

    def slot_kv_blocks(self, layer: int, precision: Precision) -> int:
        """Whole KV blocks the free tail of ``layer``'s slot holds at ``precision`` (0 at FP16)."""
        used = self.layer_bytes(precision)
        offset = self.slot_offsets[layer] if self.slot_offsets is not None else 0
        start = (-(offset + used)) % ALIGN
        return max(0, self.slot_bytes - used - start) // self.block_bytes

    def kv_blocks(self, precisions: Sequence[Precision], granularity: str = "pooled") -> int:
        """KV blocks available under the map ``precisions`` (negative when the weights alone exceed the budget)."""
        _granularity(granularity)
        if granularity == "pooled":
            return (self.budget_bytes - self.reserve_bytes - self.weight_bytes(precisions)) // self.block_bytes
        self._check_map(precisions)
        return self.base_kv_blocks() + sum(self.slot_kv_blocks(i, p) for i, p in enumerate(precisions))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.cfg.name, "dtype": str(self.dtype).removeprefix("torch."),
                "budget_bytes": self.budget_bytes, "reserve_bytes": self.reserve_bytes,
                "block_size": self.block_size, "block_bytes": self.block_bytes,
                "other_weight_bytes": self.other_weight_bytes,
                "layer_bytes": {p.value: self.layer_bytes(p) for p in ALL_PRECISIONS}}

    def _check_map(self, precisions: Sequence[Precision]) -> None:
        if len(precisions) != self.num_layers:
            raise ValueError(f"a precision map needs one precision per layer: got {len(precisions)} for "
                             f"{self.num_layers} layers")


def _granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    return granularity


# ---- the phase-aware latency term --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhaseCost:
    """LLM-PQ's phase-aware cost, per decoder layer and precision, for one pass of the load (:class:`Load`).

    * prefill (compute-bound): ``num_seqs * prompt_tokens * 2 * matmul_params / (peak_flops * efficiency[p])``;
    * decode (memory-bound): ``output_tokens * layer_bytes[p] / memory_bandwidth`` (the batch decodes together, so
      each step reads the layer's weights once).

    Only terms that depend on the precision are counted (attention over the KV cache, norms and the LM head are the
    same for every map).  ``efficiency[p]``: the fraction of ``peak_flops`` the precision's prefill GEMMs reach
    (dequantization overhead; 1.0 where not given).  ``weight`` converts seconds into the objective's quality-loss
    units."""

    peak_flops: float
    memory_bandwidth: float
    weight: float
    efficiency: dict[Precision, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory_bandwidth"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"latency weight must be a non-negative number, got {self.weight!r}")
        for p, e in self.efficiency.items():
            Precision(p)
            if not isinstance(e, (int, float)) or not 0 < e <= 1:
                raise ValueError(f"efficiency of {p!r} must be in (0, 1], got {e!r}")

    def seconds(self, memory: MemoryModel, load: Load) -> dict[Precision, float]:
        """Predicted precision-dependent seconds of one layer at each precision."""
        from morphserve.quant.layouts import projection_shapes

        params = sum(n * k for n, k in projection_shapes(memory.cfg).values())
        out = {}
        for p in ALL_PRECISIONS:
            eff = float(self.efficiency.get(p, self.efficiency.get(p.value, 1.0)))
            prefill = load.num_seqs * load.prompt_tokens * 2.0 * params / (self.peak_flops * eff)
            decode = load.output_tokens * memory.layer_bytes(p) / self.memory_bandwidth
            out[p] = prefill + decode
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"peak_flops": self.peak_flops, "memory_bandwidth": self.memory_bandwidth, "weight": self.weight,
                "efficiency": {Precision(p).value: e for p, e in self.efficiency.items()}}


# ---- quality scores ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QualityScores:
    """Predicted quality loss of every decoder layer at each quantized precision (FP16: 0 by definition), and where
    each precision's numbers came from."""

    loss: dict[Precision, tuple[float, ...]]
    source: dict[Precision, str]

    def __post_init__(self) -> None:
        if not self.loss:
            raise ValueError("quality scores for no precision")
        lengths = set()
        for p, values in self.loss.items():
            if Precision(p) not in QUANTIZED:
                raise ValueError(f"quality scores are for quantized precisions (w8, w4), got {p!r}")
            bad = [(i, v) for i, v in enumerate(values) if not isinstance(v, (int, float)) or not math.isfinite(v)
                   or v < 0]
            if bad:
                raise ValueError(f"{Precision(p).value} loss of layer {bad[0][0]} is {bad[0][1]!r}: scores must be "
                                 f"finite and non-negative")
            lengths.add(len(values))
            if p not in self.source:
                raise ValueError(f"no source given for the {Precision(p).value} scores")
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"every precision needs one score per layer, got lengths "
                             f"{ {Precision(p).value: len(v) for p, v in self.loss.items()} }")

    @classmethod
    def of(cls, loss: dict[Any, Sequence[float]], source: dict[Any, str] | str) -> QualityScores:
        """Build from plain values (precisions as names or :class:`Precision`, any sequences)."""
        conv = {Precision(p): tuple(float(v) for v in vals) for p, vals in loss.items()}
        src = {p: source for p in conv} if isinstance(source, str) else {Precision(p): s for p, s in source.items()}
        return cls(conv, src)

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.loss.values())))

    def layer_loss(self, layer: int, precision: Precision) -> float:
        p = Precision(precision)
        if p == Precision.FP16:
            return 0.0
        try:
            return self.loss[p][layer]
        except KeyError:
            raise ValueError(f"no quality scores for {p.value} (have "
                             f"{', '.join(q.value for q in self.loss)})") from None

    def to_dict(self) -> dict[str, Any]:
        return {"loss": {p.value: list(v) for p, v in self.loss.items()},
                "source": {p.value: s for p, s in self.source.items()}}


def profile_losses(doc: dict[str, Any], num_layers: int, where: str = "profile") -> list[float]:
    """The per-layer loss a profile document gives: ``scores.mds_alone`` (each layer alone at the profile's
    precision, ``1 - cos`` of the final hidden states against FP16)."""
    values = ((doc.get("scores") or {}).get("mds_alone") if isinstance(doc, dict) else None)
    if not isinstance(values, list) or len(values) != num_layers:
        raise ValueError(f"{where}: scores.mds_alone must list {num_layers} values, got {values!r}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: scores.mds_alone[{i}] = {v!r} is not a finite non-negative number")
        out.append(float(v))
    return out


def document_losses(documents: dict[Any, dict[str, Any]],
                    num_layers: int) -> dict[Precision, tuple[list[float], str]]:
    """``{precision: (losses, source)}`` from profile documents given directly (e.g. the ``profile`` field of the
    workflow's importance file), keyed by precision; each must be a profile of that precision for ``num_layers``
    layers."""
    from morphserve.importance.profile import PROFILE_FORMAT

    found = {}
    for key, doc in documents.items():
        p = Precision(key)
        if p not in QUANTIZED:
            raise ValueError(f"profile documents are for w8 or w4, got one keyed {key!r}")
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, dict) or doc.get("format") != PROFILE_FORMAT or doc.get("precision") != p.value \
                or model.get("num_layers") != num_layers:
            raise ValueError(f"the document given as the {p.value} profile is not a {PROFILE_FORMAT!r} document of "
                             f"precision {p.value!r} for {num_layers} layers (format "
                             f"{doc.get('format') if isinstance(doc, dict) else None!r}, precision "
                             f"{doc.get('precision') if isinstance(doc, dict) else None!r}, layers "
                             f"{model.get('num_layers') if isinstance(model, dict) else None!r})")
        where = f"profile document of {model.get('name')!r} at {p.value}, given to the planner"
        found[p] = (profile_losses(doc, num_layers, where), where)
    return found


def read_profile_losses(model: str, num_layers: int, root: Path | None = None,
                        precisions: Sequence[Precision] = QUANTIZED) -> dict[Precision, tuple[list[float], str]]:
    """``{precision: (losses, source)}`` for every precision whose profile of ``model`` exists where
    :func:`~morphserve.importance.profile.profile_path` puts it (round-to-nearest variants, the engine's).  A
    profile that exists but is for another model, precision, variant or layer count raises
    :class:`~morphserve.importance.profile.ProfileError` (through
    :func:`~morphserve.importance.profile.load_order`, which checks all of that)."""
    from morphserve.importance.profile import load_order, profile_path, read_profile

    found = {}
    for p in precisions:
        path = profile_path(model, p, root)
        if path.is_file():
            load_order(model, p, num_layers, path=path)
            found[Precision(p)] = (profile_losses(read_profile(path), num_layers, str(path)), f"profile {path}")
    return found


@torch.no_grad()
def weight_errors(model, staged, precisions: Sequence[Precision] = QUANTIZED) -> dict[Precision, list[float]]:
    """Relative squared error of every layer's projection weights at each precision, from the staged variants:
    ``e[l, p] = sum_proj ||W - deq(Q_p(W))||^2 / sum_proj ||W||^2`` (Frobenius; float64), computed on the model's
    device.  ``model`` must be all-FP16 (its arena holds the reference weights)."""
    from morphserve.quant.layouts import PROJECTIONS
    from morphserve.quant.variants import dequantize_variant

    out: dict[Precision, list[float]] = {Precision(p): [] for p in precisions}
    for i, lw in enumerate(model.arena.layers):
        if lw.precision != Precision.FP16:
            raise ValueError(f"layer {i} is at {lw.precision.value}: weight errors are measured against FP16")
        ref = {n: lw[n].double() for n in PROJECTIONS}
        norm = sum(float(t.pow(2).sum()) for t in ref.values())
        if norm == 0:
            raise ValueError(f"layer {i} has all-zero projection weights: its relative error is undefined")
        for p, values in out.items():
            tensors = {k: v.to(model.device) for k, v in staged.tensors(i, p).items()}
            dense = dequantize_variant(tensors, p, model.cfg)
            values.append(sum(float((dense[n].double() - ref[n]).pow(2).sum()) for n in PROJECTIONS) / norm)
    return out


def combine_scores(profiles: dict[Precision, tuple[list[float], str]],
                   errors: dict[Precision, list[float]] | None) -> QualityScores:
    """W8 and W4 losses from the profiles found, with the weight-error proxies of the module docstring for a
    precision without one (``errors`` is needed then)."""
    loss: dict[Precision, tuple[float, ...]] = {}
    source: dict[Precision, str] = {}
    for p, (values, path) in profiles.items():
        loss[p], source[p] = tuple(values), f"{path}: scores.mds_alone"
    missing = [p for p in QUANTIZED if p not in loss]
    if missing and errors is None:
        raise ValueError(f"no profile for {', '.join(p.value for p in missing)} and no weight errors to derive a "
                         f"proxy from")
    for p in missing:
        known = [q for q in QUANTIZED if q in profiles]
        if known:
            q = known[0]
            values = []
            for i, (s, ep, eq) in enumerate(zip(loss[q], errors[p], errors[q], strict=True)):
                if eq <= 0:
                    raise ValueError(f"layer {i}: {q.value} weight error is {eq!r}; the {p.value} proxy "
                                     f"{q.value}-loss x e_{p.value}/e_{q.value} is undefined")
                values.append(s * ep / eq)
            loss[p] = tuple(values)
            source[p] = (f"proxy: {q.value} profile's mds_alone x (relative squared weight error at {p.value} / at "
                         f"{q.value}), per layer")
        else:
            loss[p] = tuple(errors[p])
            source[p] = ("proxy (no profile): relative squared error of the layer's projection weights at "
                         f"{p.value}, data-free")
    return QualityScores(loss, source)


# ---- the integer program ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    """The solver's answer: one choice (column index) per row, its objective (original units) and the solver's
    report."""

    choice: tuple[int, ...]
    objective: float
    size: int
    status: str
    message: str
    mip_gap: float | None
    seconds: float


def solve_assignment(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], capacity: int,
                     time_limit: float | None = None) -> Assignment:
    """Exactly solve ``min sum_l costs[l][c_l]`` over one choice ``c_l`` per row subject to
    ``sum_l sizes[l][c_l] <= capacity``, as a binary integer program with :func:`scipy.optimize.milp`
    (module docstring).  Raises :class:`InfeasiblePlan` when no choice meets the capacity."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"costs must be a non-empty [layers, choices] table, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError(f"costs must be finite, got {c.tolist()}")
    rows, cols = c.shape
    if len(sizes) != rows or any(len(r) != cols for r in sizes):
        raise ValueError(f"sizes must be a [{rows}, {cols}] table like costs, got {[len(r) for r in sizes]}")
    s = [[_int(f"sizes[{i}][{j}]", v, -2 ** 62) for j, v in enumerate(r)] for i, r in enumerate(sizes)]
    capacity = _int("capacity", capacity, -2 ** 62)
    low = [min(r) for r in s]
    if sum(low) > capacity:
        raise InfeasiblePlan(f"no assignment fits: the smallest total size is {sum(low)}, the capacity {capacity}")
    # exact integer row: shift every row by its minimum (a constant under one-hot), divide by the common divisor
    shifted = [[v - m for v in r] for r, m in zip(s, low, strict=True)]
    g = math.gcd(*[v for r in shifted for v in r]) or 1
    room = (capacity - sum(low)) // g
    a = np.array([v // g for r in shifted for v in r], dtype=np.float64)
    cmax = float(np.abs(c).max())
    scale = COST_SCALE / cmax if cmax > 0 else 1.0
    onehot = np.kron(np.eye(rows), np.ones(cols))
    t0 = time.perf_counter()
    res = milp(c.ravel() * scale, integrality=np.ones(rows * cols), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(onehot, 1, 1), LinearConstraint(a[None, :], -np.inf, room)],
               options={"mip_rel_gap": 0.0, **({"time_limit": time_limit} if time_limit is not None else {})})
    seconds = time.perf_counter() - t0
    if res.status == 2:
        raise InfeasiblePlan(f"the solver found no assignment within capacity {capacity}: {res.message}")
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"the MILP solver did not prove an optimum (status {res.status}): {res.message}")
    x = np.rint(res.x).reshape(rows, cols).astype(int)
    if (x.sum(axis=1) != 1).any() or np.abs(res.x.reshape(rows, cols) - x).max() > 1e-6:
        raise RuntimeError(f"the MILP solution is not one-hot per row: {res.x.tolist()}")
    choice = tuple(int(j) for j in x.argmax(axis=1))
    size = sum(s[i][j] for i, j in enumerate(choice))
    if size > capacity:
        raise RuntimeError(f"the MILP solution's size {size} exceeds the capacity {capacity} (solver tolerance)")
    objective = math.fsum(float(c[i, j]) for i, j in enumerate(choice))
    return Assignment(choice, objective, size, "optimal", str(res.message),
                      None if getattr(res, "mip_gap", None) is None else float(res.mip_gap), seconds)


# ---- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A static precision map chosen for a memory budget and a load (JSON-serialisable through :meth:`to_dict`).

    ``objective`` = ``quality_loss`` + the latency term's weight x ``latency_s`` (0 without one).  ``kv_blocks`` is
    the KV capacity under the map at ``granularity``; ``kv_blocks_left`` what the load leaves of it."""

    precisions: tuple[Precision, ...]
    objective: float
    quality_loss: float
    latency_s: float | None
    weight_bytes: int
    budget_bytes: int
    kv_blocks: int
    kv_blocks_needed: int
    granularity: str
    load: Load
    solver: dict[str, Any]
    scores: QualityScores
    memory: dict[str, Any]

    @property
    def kv_blocks_left(self) -> int:
        return self.kv_blocks - self.kv_blocks_needed

    @property
    def code(self) -> str:
        """One character per layer: F (fp16), 8 (w8), 4 (w4), as in the morpher's timeline."""
        return "".join(_CODE[p] for p in self.precisions)

    @property
    def counts(self) -> dict[str, int]:
        return {p.value: sum(q == p for q in self.precisions) for p in ALL_PRECISIONS}

    def to_dict(self) -> dict[str, Any]:
        return {"precisions": [p.value for p in self.precisions], "code": self.code, "counts": self.counts,
                "objective": self.objective, "quality_loss": self.quality_loss, "latency_s": self.latency_s,
                "weight_bytes": self.weight_bytes, "budget_bytes": self.budget_bytes, "kv_blocks": self.kv_blocks,
                "kv_blocks_needed": self.kv_blocks_needed, "kv_blocks_left": self.kv_blocks_left,
                "granularity": self.granularity, "load": self.load.to_dict(), "solver": dict(self.solver),
                "scores": self.scores.to_dict(), "memory": dict(self.memory)}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def knapsack(memory: MemoryModel, load: Load, granularity: str,
             precisions: Sequence[Precision]) -> tuple[list[list[int]], int]:
    """``(size[l][j], capacity)`` of the memory constraint for the allowed ``precisions`` (module docstring)."""
    need = load.kv_blocks(memory.block_size)
    if _granularity(granularity) == "pooled":
        capacity = memory.budget_bytes - memory.reserve_bytes - memory.other_weight_bytes - need * memory.block_bytes
        return [[memory.layer_bytes(p) for p in precisions] for _ in range(memory.num_layers)], capacity
    base = memory.base_kv_blocks()
    if base < 1:
        raise InfeasiblePlan(f"budget {memory.budget_bytes} bytes: the engine keeps every slot at FP16 size "
                             f"({memory.fp16_weight_bytes} bytes of weights) plus a {memory.reserve_bytes}-byte "
                             f"reserve, which leaves {base} KV blocks of {memory.block_bytes} bytes; it needs >= 1")
    return [[-memory.slot_kv_blocks(i, p) for p in precisions] for i in range(memory.num_layers)], base - need


def check_feasible(memory: MemoryModel, load: Load, granularity: str,
                   precisions: Sequence[Precision] = ALL_PRECISIONS) -> tuple[list[list[int]], int]:
    """The knapsack of :func:`knapsack`, after checking that its smallest map (each layer at its smallest
    precision, normally all-W4) fits; raises :class:`InfeasiblePlan` naming the numbers otherwise."""
    allowed = _precisions(precisions, "allowed precisions")
    sizes, capacity = knapsack(memory, load, granularity, allowed)
    if sum(min(r) for r in sizes) > capacity:
        smallest = [allowed[min(range(len(allowed)), key=lambda j: row[j])] for row in sizes]
        raise InfeasiblePlan(_infeasible_message(memory, load, granularity, smallest))
    return sizes, capacity


def plan_precisions(memory: MemoryModel, load: Load, scores: QualityScores, *, granularity: str = "pooled",
                    precisions: Sequence[Precision] = ALL_PRECISIONS, latency: PhaseCost | None = None,
                    time_limit: float | None = None) -> Plan:
    """The static map minimising predicted quality loss (+ the optional latency term) such that the weights and
    the KV cache ``load`` needs fit ``memory``'s budget at ``granularity``.  Raises :class:`InfeasiblePlan`
    (naming the numbers) when even the smallest map does not fit, ValueError for bad inputs."""
    allowed = _precisions(precisions, "allowed precisions")
    if not isinstance(load, Load):
        raise ValueError(f"load must be a Load, got {type(load).__name__}")
    if not isinstance(scores, QualityScores):
        raise ValueError(f"scores must be QualityScores, got {type(scores).__name__}")
    if scores.num_layers != memory.num_layers:
        raise ValueError(f"quality scores for {scores.num_layers} layers, the model {memory.cfg.name!r} has "
                         f"{memory.num_layers}")
    lacking = [p.value for p in allowed if p != Precision.FP16 and p not in scores.loss]
    if lacking:
        raise ValueError(f"no quality scores for allowed precisions {lacking}")
    if latency is not None and not isinstance(latency, PhaseCost):
        raise ValueError(f"latency must be a PhaseCost, got {type(latency).__name__}")
    need = load.kv_blocks(memory.block_size)
    sizes, capacity = check_feasible(memory, load, granularity, allowed)
    seconds = latency.seconds(memory, load) if latency is not None else {p: 0.0 for p in ALL_PRECISIONS}
    w = latency.weight if latency is not None else 0.0
    costs = [[scores.layer_loss(i, p) + w * seconds[p] for p in allowed] for i in range(memory.num_layers)]
    sol = solve_assignment(costs, sizes, capacity, time_limit)
    chosen = tuple(allowed[j] for j in sol.choice)
    quality = math.fsum(scores.layer_loss(i, p) for i, p in enumerate(chosen))
    latency_s = math.fsum(seconds[p] for p in chosen) if latency is not None else None
    kv = memory.kv_blocks(chosen, granularity)
    if kv < need:  # the knapsack row is the KV condition itself: a mismatch is a bug, not a tolerance
        raise RuntimeError(f"plan {chosen} leaves {kv} KV blocks, the load needs {need}")
    solver = {"name": "scipy.optimize.milp (HiGHS)", "status": sol.status, "message": sol.message,
              "mip_gap": sol.mip_gap, "seconds": sol.seconds, "variables": memory.num_layers * len(allowed),
              "allowed": [p.value for p in allowed],
              "latency_term": latency.to_dict() if latency is not None else None}
    return Plan(chosen, sol.objective, quality, latency_s, memory.weight_bytes(chosen), memory.budget_bytes, kv,
                need, granularity, load, solver, scores, memory.to_dict())


def _infeasible_message(memory: MemoryModel, load: Load, granularity: str, smallest: list[Precision]) -> str:
    code = "".join(_CODE[p] for p in smallest)
    need = load.kv_blocks(memory.block_size)
    weights = memory.weight_bytes(smallest)
    kv = memory.kv_blocks(smallest, granularity)
    head = (f"LLM-PQ plan infeasible for {memory.cfg.name!r}: the load ({load.num_seqs} sequences x "
            f"{load.tokens_per_seq} tokens) needs {need} KV blocks of {memory.block_bytes} bytes")
    if granularity == "pooled":
        total = weights + memory.reserve_bytes + need * memory.block_bytes
        return (f"{head}; even the smallest map ({code}: {weights} weight bytes) plus that KV cache "
                f"({need * memory.block_bytes} bytes) and the reserve ({memory.reserve_bytes}) take {total} bytes, "
                f"over the budget of {memory.budget_bytes} by {total - memory.budget_bytes}")
    return (f"{head}; even the smallest map ({code}) gives the engine only {kv} blocks ({memory.base_kv_blocks()} "
            f"base + {kv - memory.base_kv_blocks()} from freed slot tails) under the budget of "
            f"{memory.budget_bytes} bytes")


# ---- the plugin -------------------------------------------------------------------------------------------------
def load_for_engine(engine, name: str = "llm-pq") -> Load:
    """The load the plugin plans for: the one named by a ``-s<seqs>-p<prompt>-o<output>`` suffix of the system
    name, else the engine's batch limit, ``max_num_seqs`` sequences each filling the context window
    (``max_model_len`` tokens, counted as prompt: without a latency term only the total matters)."""
    m = LOAD_SUFFIX.search(name)
    if m is None:
        return Load(engine.config.max_num_seqs, engine.max_model_len, 0)
    load = Load(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if load.num_seqs > engine.config.max_num_seqs:
        raise ValueError(f"system {name!r}: {load.num_seqs} sequences at once, the engine runs at most "
                         f"max_num_seqs={engine.config.max_num_seqs}")
    if load.tokens_per_seq > engine.max_model_len:
        raise ValueError(f"system {name!r}: {load.tokens_per_seq} tokens per sequence, the engine's context window "
                         f"is max_model_len={engine.max_model_len}")
    return load


def attach(engine, name: str, order: list[int], *, load: Load | None = None, scores: QualityScores | None = None,
           latency: PhaseCost | None = None, profiles: dict[Any, dict[str, Any]] | None = None,
           profiles_root: Path | None = None, release_policy: ReleasePolicy = ReleasePolicy.MIGRATE,
           context: dict[str, Any] | None = None):
    """``system_plugins`` installer: plan for ``engine`` (idle, all-FP16) and install the plan as a static system.

    ``order`` (the workflow's swap order) is checked to be a permutation and otherwise unused: LLM-PQ assigns
    precisions from per-layer scores, not along an order.  ``load`` (default :func:`load_for_engine`), ``scores``
    (default: from ``profiles``, profile documents keyed by precision, when given, else from the engine's model's
    profile files under ``profiles_root``; with the module docstring's proxies for a precision without one) and
    ``latency`` (default none) override the defaults.  Returns the morpher, with the :class:`Plan` as its ``plan``
    attribute, or None when the plan keeps every layer FP16 (nothing to install, like the ``fp16`` system).

    ``context`` (given by the workflow, :func:`workflow/scripts/artifact/engines.install_system`): when ``load`` is
    not given and the name has no load suffix, the planned load is ``context["concurrency"]`` sequences (the
    calibration's closed-loop concurrency) of ``context["prompt_tokens"]`` + ``context["output_tokens"]`` tokens;
    when ``profiles`` is not given, the importance file's profile (``context["importance"]["profile"]``) is used."""
    from morphserve.importance.orders import check_order

    n = engine.model_config.num_layers
    check_order(order, n)
    if engine.has_unfinished() or engine.morpher is not None:
        raise ValueError(f"{name}: the engine must be idle and have no system installed")
    if engine.model.arena.precisions() != [Precision.FP16.value] * n:
        raise ValueError(f"{name}: the engine's layers must all be FP16, got {engine.model.arena.precisions()}")
    if load is None and context is not None and LOAD_SUFFIX.search(name) is None:
        load = Load(int(context["concurrency"]), int(context["prompt_tokens"]), int(context["output_tokens"]))
    if profiles is None and scores is None and context is not None:
        doc = (context.get("importance") or {}).get("profile")
        if isinstance(doc, dict) and doc.get("precision"):
            profiles = {doc["precision"]: doc}
    load = load if load is not None else load_for_engine(engine, name)
    memory = MemoryModel.for_engine(engine)
    check_feasible(memory, load, "per-slot")  # before staging any variant
    staged = None
    if scores is None:
        found = document_losses(profiles, n) if profiles is not None else \
            read_profile_losses(engine.config.model, n, profiles_root)
        errors = None
        if len(found) < len(QUANTIZED):
            from morphserve.quant.staging import StagedVariants

            staged = StagedVariants.build(engine.model, precisions=ALL_PRECISIONS)
            errors = weight_errors(engine.model, staged)
        scores = combine_scores(found, errors)
        for p in QUANTIZED:
            if not scores.source[p].startswith("profile"):
                log.warning("%s: %s quality scores from a %s", name, p.value, scores.source[p])
    plan = plan_precisions(memory, load, scores, granularity="per-slot", latency=latency)
    log.info("%s plan: %s", name, plan.to_json(indent=None))
    if all(p == Precision.FP16 for p in plan.precisions):
        return None
    morpher = attach_static(engine, list(plan.precisions), staged, release_policy)
    got = engine.block_manager.num_total_blocks
    if got != plan.kv_blocks or engine.model.arena.precisions() != [p.value for p in plan.precisions]:
        raise RuntimeError(f"{name}: the installed engine has {got} KV blocks and precisions "
                           f"{engine.model.arena.precisions()}; the plan promised {plan.kv_blocks} and {plan.code}")
    morpher.plan = plan
    return morpher
