"""PyramidKV (Cai et al., arXiv 2406.02069): KV-cache compression at the end of prefill, inside the MorphServe engine.

Every request is prefilled as usual (uncompressed, chunked like any other request).  When its last prompt token has
been computed, each layer ``l`` keeps only ``budget_l`` of the prompt's tokens, and the cache is compacted so that
only those tokens occupy KV blocks; decoding then proceeds on the compressed cache.

**Budgets** (:func:`layer_budgets`).  ``budget`` is the average number of prompt tokens a layer keeps (the paper's
"KV cache size", e.g. 128), so all layers together keep ``num_layers * budget`` tokens.  Each layer keeps the
observation window (the last ``window`` prompt tokens) plus ``extra_l`` selected tokens, with ``extra_l`` on an
arithmetic sequence from the bottom layer to the top one (the pyramid)::

    avg    = budget - window                                   selected tokens per layer, on average
    top    = avg / beta                                        the top layer (l = L - 1)
    bottom = 2 * avg - top                                     the bottom layer (l = 0)
    extra_l = bottom - (bottom - top) * l / (L - 1)            real-valued; sum over layers = L * avg exactly

``beta`` (>= 1) is the slope: 1 gives every layer the same budget (SnapKV's allocation), larger values move tokens
from the upper layers to the lower ones (the paper's beta, default 20).  The real values are rounded to integers by
the largest-remainder method (ties to the lower layer), which keeps the exact total and the monotone order.  A
prompt of ``n <= budget`` tokens is not compressed.  For ``budget < n`` with ``bottom > n - window`` (a prompt
shorter than the bottom layer's budget) the pyramid is clipped as in the reference implementation: ``bottom = n -
window``, ``top = 2 * avg - bottom`` (same total, smaller slope).  Two deliberate differences from the reference code:
it rounds the per-layer step down (``(bottom - top) // (L - 1)``), so its budgets do not sum to the total, and it
switches to uniform budgets for prompts between ``budget`` and ``2 * (budget - window)`` tokens; here the total is
exact and the (clipped) pyramid is used for every compressed prompt.

**Selection** (:func:`select_tokens`).  The queries of the observation window (rotated, captured per layer while the
prefill runs) attend to the prompt's keys (causally, float32 softmax); the attention probabilities are summed over
the window's queries, averaged over the query heads that share a KV head (GQA; with MHA a head is its own group),
and pooled along the key axis (``max`` or ``avg`` pooling, odd ``kernel_size``, stride 1, zero padding of
``kernel_size // 2`` counted in the average, as ``F.avg_pool1d``).  Each KV head keeps the ``extra_l`` prefix
positions with the highest pooled score (ties to the earlier position) plus the whole window, in position order.
Defaults follow the reference implementation's LongBench runs: window 8, kernel 7, max pooling, beta 20.  Selection
is per KV head (each head keeps its own positions): the reference code selects per query head on repeated K/V,
which a GQA cache cannot store without expanding it.

**Storage** (:class:`PyramidKV`).  A KV block holds all layers' K/V for 16 token slots, so layers cannot give back
different numbers of blocks.  Each layer therefore has its own address space inside the request's blocks: layer
``l`` holds ``n_l`` tokens at addresses ``0 .. n_l - 1`` (kept tokens in position order, per KV head), and a new
token is written at address ``n_l`` of that layer (a per-layer slot mapping and per-layer context lengths, passed to
the kernels through :class:`PyramidKernels`).  Rotary positions stay the true positions (keys are stored rotated).
The request's block count is set by its largest layer (the bottom one): after compression it holds
``ceil((max_l budget_l + generated) / block_size)`` blocks instead of ``ceil((n + generated) / block_size)``, and the
blocks past that are returned to the pool at once.  **Not reclaimed**: the slots of the upper layers beyond their own
``n_l`` inside the kept blocks (a block cannot be shared between requests layer by layer), so the footprint is the
bottom layer's, not the average layer's.  The engine needs three small hooks for this, none PyramidKV-specific:
``Request.num_evicted_tokens`` (tokens evicted in every layer: the scheduler and the step preparation address the
cache at ``position - num_evicted_tokens``), and ``LLMEngine.kv_policy`` (``before_forward`` / ``after_forward``
around each step's forward).

**Limitations.**  The prefill itself runs uncompressed, so a request's peak footprint during its prefill is the
uncompressed one (admission needs its full prompt's blocks, as in the reference implementation, which compresses
after the prefill's forward).  A preempted request is recomputed from scratch (prompt and generated tokens, without
compression) and compressed again at the end of that recompute with the same window, so it keeps the same prompt
tokens, and keeps every generated token; the generated tokens' K/V then come from full-context attention, so its
later tokens may differ slightly from an uninterrupted run.  Decode CUDA graphs are switched off on an engine with
this policy (their captured metadata has one context length per sequence); steps run eagerly with the Triton kernels.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import weakref
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from morphserve.memory.kv_pool import KVPool
from morphserve.model.kernel_set import KernelSet, ReferenceKernels, TritonKernels

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 128
DEFAULT_BETA = 20.0
DEFAULT_WINDOW = 8
DEFAULT_KERNEL_SIZE = 7
DEFAULT_POOLING = "max"
POOLINGS = ("max", "avg")

# pyramidkv[-<budget>][-b<beta>][-w<window>][-k<kernel>][-max|-avg], e.g. pyramidkv-128, pyramidkv-64-b10-avg
NAME_RE = re.compile(r"pyramidkv(?:-(\d+))?(?:-b(\d+(?:\.\d+)?))?(?:-w(\d+))?(?:-k(\d+))?(?:-(max|avg))?")
NAME_GRAMMAR = "pyramidkv[-<budget>][-b<beta>][-w<window>][-k<kernel size>][-max|-avg]"


# ---- configuration ----------------------------------------------------------------------------------------------
def _int(what: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"PyramidKV {what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _beta(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(float(value)) or value < 1:
        raise ValueError(f"PyramidKV beta (the pyramid's slope) must be a finite number >= 1, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PyramidConfig:
    """The method's parameters (see the module docstring); validated on construction (a ValueError names the bad
    value)."""

    budget: int = DEFAULT_BUDGET  # average prompt tokens kept per layer (window included)
    beta: float = DEFAULT_BETA  # slope: the top layer keeps (budget - window) / beta selected tokens
    window: int = DEFAULT_WINDOW  # observation window: the last prompt tokens, always kept
    kernel_size: int = DEFAULT_KERNEL_SIZE  # pooling kernel along the key axis (odd)
    pooling: str = DEFAULT_POOLING  # "max" or "avg"

    def __post_init__(self) -> None:
        window = _int("window", self.window, 1)
        budget = _int("budget", self.budget, 1)
        if budget <= window:
            raise ValueError(f"PyramidKV budget ({budget} tokens per layer) must exceed the observation window "
                             f"({window} tokens), got budget={budget!r}")
        kernel = _int("kernel_size", self.kernel_size, 1)
        if kernel % 2 == 0:
            raise ValueError(f"PyramidKV kernel_size must be odd (the pooled scores keep the key axis' length), "
                             f"got {kernel!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"PyramidKV pooling must be one of {POOLINGS}, got {self.pooling!r}")
        object.__setattr__(self, "beta", _beta(self.beta))
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "kernel_size", kernel)

    @staticmethod
    def from_name(name: str, **overrides: Any) -> "PyramidConfig":
        """The configuration a system name stands for (defaults for the parts it leaves out), then ``overrides``."""
        m = NAME_RE.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise ValueError(f"not a PyramidKV system name: {name!r} (expected {NAME_GRAMMAR}, e.g. pyramidkv-128)")
        budget, beta, window, kernel, pooling = m.groups()
        fields: dict[str, Any] = {}
        if budget is not None:
            fields["budget"] = int(budget)
        if beta is not None:
            fields["beta"] = float(beta)
        if window is not None:
            fields["window"] = int(window)
        if kernel is not None:
            fields["kernel_size"] = int(kernel)
        if pooling is not None:
            fields["pooling"] = pooling
        fields.update(overrides)
        return PyramidConfig(**fields)

    def budgets(self, num_layers: int, prompt_len: int | None = None) -> list[int]:
        return layer_budgets(num_layers, self.budget, self.beta, self.window, prompt_len)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- budgets ----------------------------------------------------------------------------------------------------
def _largest_remainder(values: list[Fraction], total: int) -> list[int]:
    """Integers summing to ``total`` (= ``sum(values)``), each the floor of its value or one more: the extra units go
    to the largest fractional parts, ties to the lower index (so a non-increasing sequence stays non-increasing)."""
    floors = [v.numerator // v.denominator for v in values]
    left = total - sum(floors)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - floors[i]), i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def layer_budgets(num_layers: int, budget: int = DEFAULT_BUDGET, beta: float = DEFAULT_BETA,
                  window: int = DEFAULT_WINDOW, prompt_len: int | None = None) -> list[int]:
    """Prompt tokens each layer keeps, bottom layer first, window included (the module docstring's formula).

    Without ``prompt_len``: the nominal pyramid, summing to ``num_layers * budget``.  With it: ``[prompt_len] * L``
    for a prompt of at most ``budget`` tokens (not compressed), else the pyramid clipped so that no layer keeps more
    than the prompt (same total)."""
    layers = _int("num_layers", num_layers, 1)
    cfg = PyramidConfig(budget=budget, beta=beta, window=window)  # validates
    if prompt_len is not None:
        n = _int("prompt_len", prompt_len, 1)
        if n <= cfg.budget:
            return [n] * layers
    avg = Fraction(cfg.budget - cfg.window)
    if layers == 1:
        return [cfg.budget]
    top = avg / Fraction(cfg.beta)
    bottom = 2 * avg - top
    if prompt_len is not None and bottom > prompt_len - cfg.window:
        bottom = Fraction(prompt_len - cfg.window)
        top = 2 * avg - bottom
    extra = [bottom - (bottom - top) * Fraction(i, layers - 1) for i in range(layers)]
    return [cfg.window + e for e in _largest_remainder(extra, layers * int(avg))]


# ---- selection --------------------------------------------------------------------------------------------------
def observation_scores(q_window: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention mass the observation window puts on each prompt position before the window.

    ``q_window``: ``[w, heads, head_dim]``, the rotated queries of the prompt's last ``w`` tokens; ``keys``:
    ``[n, kv_heads, head_dim]``, the prompt's rotated keys (the window's own are the last ``w``).  Each window query
    (at position ``n - w + i``) attends to keys ``0 .. n - w + i`` with a float32 (or float64) softmax; the
    probabilities are summed over the window's queries and averaged over the query heads of each KV head's group.
    Returns ``[kv_heads, n - w]``."""
    w, heads, d = q_window.shape
    n, kvh, _ = keys.shape
    if heads % kvh or keys.shape[2] != d or not w < n:
        raise ValueError(f"observation_scores: window queries {tuple(q_window.shape)} and keys {tuple(keys.shape)} "
                         f"need heads divisible by kv_heads, equal head_dim and fewer window tokens than keys")
    dtype = torch.promote_types(q_window.dtype, torch.float32)
    group = heads // kvh
    k = keys.to(dtype).repeat_interleave(group, dim=1)  # [n, heads, d]
    s = torch.einsum("qhd,khd->hqk", q_window.to(dtype), k) * scale  # [heads, w, n]
    qpos = torch.arange(n - w, n, device=keys.device)[:, None]
    s = s.masked_fill(torch.arange(n, device=keys.device)[None, :] > qpos, float("-inf"))
    mass = s.softmax(dim=-1)[:, :, :n - w].sum(dim=1)  # [heads, n - w]
    return mass.view(kvh, group, n - w).mean(dim=1)


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """``scores`` ``[rows, length]`` pooled along the last axis (stride 1, padding ``kernel_size // 2``; same
    length for an odd kernel)."""
    x = scores.unsqueeze(0)
    if pooling == "max":
        return F.max_pool1d(x, kernel_size, stride=1, padding=kernel_size // 2).squeeze(0)
    if pooling == "avg":
        return F.avg_pool1d(x, kernel_size, stride=1, padding=kernel_size // 2).squeeze(0)
    raise ValueError(f"PyramidKV pooling must be one of {POOLINGS}, got {pooling!r}")


def select_tokens(q_window: torch.Tensor, keys: torch.Tensor, keep: int, kernel_size: int = DEFAULT_KERNEL_SIZE,
                  pooling: str = DEFAULT_POOLING, scale: float | None = None) -> torch.Tensor:
    """Positions each KV head keeps, ascending: ``[kv_heads, keep]`` (int64).  The window (the last
    ``q_window.shape[0]`` positions) is always kept; the other ``keep - w`` are the prefix positions with the highest
    pooled :func:`observation_scores` (ties to the earlier position).  ``keep >= n`` keeps everything."""
    w = q_window.shape[0]
    n, kvh = keys.shape[0], keys.shape[1]
    if keep >= n:
        return torch.arange(n, device=keys.device).expand(kvh, n).clone()
    if keep < w:
        raise ValueError(f"PyramidKV cannot keep {keep} tokens: fewer than the observation window ({w})")
    scale = q_window.shape[2] ** -0.5 if scale is None else scale
    scores = pool_scores(observation_scores(q_window, keys, scale), kernel_size, pooling)  # [kvh, n - w]
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep - w]
    window = torch.arange(n - w, n, device=keys.device).expand(kvh, w)
    return torch.cat([best.sort(dim=-1).values, window], dim=-1)


# ---- compaction ---------------------------------------------------------------------------------------------------
def slots_of(block_ids: torch.Tensor, addresses: torch.Tensor, block_size: int) -> torch.Tensor:
    """Global slots of token ``addresses`` in a request's blocks (``block_ids`` in table order)."""
    return block_ids[addresses // block_size] * block_size + addresses % block_size


def compact(pool: KVPool, layer: int, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            keep: torch.Tensor) -> None:
    """Rewrite ``layer`` of a request's blocks so that address ``j`` of KV head ``h`` holds the token that was at
    address ``keep[h, j]``.  ``k``/``v`` (``[length, kv_heads, head_dim]``) are the layer's contents before (a copy,
    e.g. :meth:`KVPool.gather`'s); ``keep``: ``[kv_heads, m]``.  Addresses ``>= m`` keep stale data (dead slots)."""
    d = k.shape[2]
    idx = keep.t().unsqueeze(-1).expand(-1, -1, d)  # [m, kv_heads, d]
    addr = torch.arange(keep.shape[1], device=block_ids.device)
    pool.store(layer, k.gather(0, idx), v.gather(0, idx), slots_of(block_ids, addr, pool.block_size))


def compress_cache(pool: KVPool, block_ids: torch.Tensor, length: int, prompt_len: int, q_windows: torch.Tensor,
                   budgets: list[int], kernel_size: int, pooling: str, scale: float) -> list[torch.Tensor]:
    """Compress one request's cache in place: layer ``l`` of the ``length`` tokens in ``block_ids`` (the prompt's
    ``prompt_len`` and any tokens after it) keeps ``budgets[l]`` prompt tokens (:func:`select_tokens` with
    ``q_windows[l]``) followed by every token after the prompt, compacted to addresses ``0 ..``.  Returns the kept
    prompt positions per layer (``[kv_heads, budgets[l]]`` each)."""
    kept = []
    tail = torch.arange(prompt_len, length, device=block_ids.device)
    for layer, b in enumerate(budgets):
        k, v = pool.gather(layer, block_ids, length)
        keep = select_tokens(q_windows[layer], k[:prompt_len], b, kernel_size, pooling, scale)
        kept.append(keep)
        if length > prompt_len:
            keep = torch.cat([keep, tail.expand(keep.shape[0], -1)], dim=1)
        compact(pool, layer, block_ids, k, v, keep)
    return kept


# ---- the engine policy ----------------------------------------------------------------------------------------
class _RequestState:
    """What the policy keeps for a request whose prompt is longer than the budget."""

    def __init__(self, preemptions: int) -> None:
        self.preemptions = preemptions  # the request's preemption count when this state began (a later one voids it)
        self.q_window: torch.Tensor | None = None  # [L, w, heads, head_dim] while the prefill runs
        self.layer_evicted: np.ndarray | None = None  # [L] prompt tokens evicted per layer, once compressed
        self.kept: list[torch.Tensor] | None = None  # per layer [kv_heads, budget_l] kept prompt positions


@dataclass
class _StepPlan:
    """Per-step data for :class:`PyramidKernels`, built by :meth:`PyramidKV.before_forward`."""

    num_tokens: int
    num_seqs: int
    slots_host: np.ndarray | None  # [L, T] per-layer slot mapping (None: no compressed sequence in the step)
    context_lens: list[list[int]] | None  # [L][S]
    context_lens_host: np.ndarray | None  # [L, S]
    capture: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (q buffer [L, w, H, D], batch rows, window idx)
    uploaded: bool = False  # the two host arrays were handed to the step's packed upload (upload_regions)
    slots: torch.Tensor | None = None  # device views of the host arrays, set by PyramidKernels.begin
    context_lens_t: torch.Tensor | None = None


@dataclass
class _PyramidState:
    inner: Any
    layers: list[Any] | None
    capture: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class PyramidKernels(KernelSet):
    """The engine's kernel set with per-layer KV addressing and window-query capture: it runs the wrapped set
    (reference or Triton) with, for each layer, the step's per-layer slot mapping and context lengths, and copies the
    rotated queries of observation-window tokens into their requests' buffers."""

    def __init__(self, inner: KernelSet, num_layers: int):
        if not isinstance(inner, (ReferenceKernels, TritonKernels)):
            raise ValueError(f"PyramidKV runs on the reference or Triton kernel set, got {type(inner).__name__}")
        self.inner = inner
        self.name = inner.name
        self.num_layers = num_layers
        self.plan: _StepPlan | None = None

    def _layer_state(self, state: Any, batch: Any, plan: _StepPlan, layer: int) -> Any:
        lb = dataclasses.replace(batch, slot_mapping=plan.slots[layer], context_lens=plan.context_lens[layer],
                                 context_lens_t=plan.context_lens_t[layer])
        if isinstance(self.inner, TritonKernels):
            return dataclasses.replace(state, batch=lb,
                                       meta=dataclasses.replace(state.meta, context_lens=plan.context_lens_t[layer]))
        return dataclasses.replace(state, batch=lb)

    def begin(self, model, batch, pool):
        plan, self.plan = self.plan, None
        if plan is not None and plan.slots_host is not None:
            # The last two regions of the packed upload are the plan's (upload_regions); the rest are the inner set's.
            # A plan exists only inside an engine step, whose batch always comes through ModelRunner.upload.
            if not plan.uploaded or len(batch.kernel_regions) < 2:
                raise RuntimeError(f"PyramidKV: the step's per-layer metadata must travel in its packed upload "
                                   f"(handed over: {plan.uploaded}; kernel regions: {len(batch.kernel_regions)})")
            *inner_regions, slots, ctx = batch.kernel_regions
            plan.slots = slots.view(plan.slots_host.shape)
            plan.context_lens_t = ctx.view(plan.context_lens_host.shape)
            batch = dataclasses.replace(batch, kernel_regions=tuple(inner_regions))
        state = self.inner.begin(model, batch, pool)
        if plan is None:
            return _PyramidState(state, None, [])
        if plan.num_tokens != batch.token_ids.shape[0] or plan.num_seqs != len(batch.context_lens):
            raise RuntimeError(f"PyramidKV: the step plan ({plan.num_tokens} tokens, {plan.num_seqs} sequences) does "
                               f"not match the forward's batch ({batch.token_ids.shape[0]}, {len(batch.context_lens)})")
        layers = None
        if plan.slots is not None:
            layers = [self._layer_state(state, batch, plan, i) for i in range(self.num_layers)]
        return _PyramidState(state, layers, plan.capture)

    def upload_regions(self, query_start):
        """The inner set's regions, then (in a step with a compressed sequence) the plan's per-layer slot mapping and
        context lengths, so they travel in the step's one packed upload rather than by a copy of their own."""
        inner = self.inner.upload_regions(query_start)
        plan = self.plan
        if plan is None or plan.slots_host is None:
            return inner
        plan.uploaded = True
        return (*inner, plan.slots_host.ravel(), plan.context_lens_host.ravel())

    def linear_scope(self):
        return self.inner.linear_scope()

    def rms_norm(self, x, weight, eps):
        return self.inner.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self.inner.add_rms_norm(x, residual, weight, eps)

    def rope_and_store(self, qkv, state: _PyramidState, pool, layer):
        q = self.inner.rope_and_store(qkv, state.inner if state.layers is None else state.layers[layer], pool, layer)
        for buf, rows, dst in state.capture:
            buf[layer, dst] = q[rows].to(buf.dtype)
        return q

    def attention(self, q, state: _PyramidState, pool, layer):
        return self.inner.attention(q, state.inner if state.layers is None else state.layers[layer], pool, layer)

    def silu_and_mul(self, gate_up):
        return self.inner.silu_and_mul(gate_up)

    def lm_head(self, h, weight):
        return self.inner.lm_head(h, weight)


class PyramidKV:
    """The installed policy (``engine.kv_policy``): captures the window queries during prefill, compresses each
    request's cache when its prompt is done, and gives the kernels per-layer addressing for compressed requests."""

    def __init__(self, engine, config: PyramidConfig, name: str = "pyramidkv"):
        cfg = engine.model_config
        self.engine = engine
        self.config = config
        self.name = name
        self.num_layers = cfg.num_layers
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.pool: KVPool = engine.pool
        self.block_size = engine.pool.block_size
        self.device = engine.device
        self.kernels = PyramidKernels(engine.runner.kernels, self.num_layers)
        self._states: "weakref.WeakKeyDictionary[Any, _RequestState]" = weakref.WeakKeyDictionary()
        self.stats = {"compressed_requests": 0, "uncompressed_requests": 0, "prompt_tokens": 0,
                      "kept_tokens": 0, "blocks_freed": 0}

    def install(self) -> None:
        eng = self.engine
        self._graphs = eng.runner.graphs
        if self._graphs is not None:
            log.info("%s: decode CUDA graphs switched off (per-layer context lengths)", self.name)
            eng.runner.graphs = None
        eng.runner.kernels = self.kernels
        eng.kv_policy = self

    def uninstall(self) -> None:
        """Give the (idle) engine back its own kernel set and graphs."""
        eng = self.engine
        if eng.has_unfinished() or eng.kv_policy is not self:
            raise ValueError(f"{self.name}: uninstall needs an idle engine with this policy installed")
        eng.runner.kernels, eng.runner.graphs, eng.kv_policy = self.kernels.inner, self._graphs, None

    # ---- inspection -------------------------------------------------------------------------------------------
    def state(self, req) -> _RequestState | None:
        """``req``'s state, or None (no compression under way or done since its last preemption)."""
        st = self._states.get(req)
        if st is not None and st.preemptions != req.metrics.num_preemptions:  # preempted: recomputed from scratch
            del self._states[req]
            return None
        return st

    def layer_lengths(self, req) -> list[int]:
        """Tokens each layer of ``req`` holds in the cache now."""
        st = self.state(req)
        if st is None or st.layer_evicted is None:
            return [req.num_computed_tokens] * self.num_layers
        return [req.num_computed_tokens - int(e) for e in st.layer_evicted]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.config.to_dict(), "nominal_layer_budgets": self.config.budgets(
            self.num_layers), **self.stats}

    # ---- the engine hooks -------------------------------------------------------------------------------------
    def before_forward(self, sched) -> None:
        chunks = sched.chunks
        s, layers, w = len(chunks), self.num_layers, self.config.window
        evicted = np.zeros((s, layers), np.int64)
        compressed = False
        capture = []
        row = 0
        for i, c in enumerate(chunks):
            req, start, n_new = c.request, c.request.num_computed_tokens, c.num_new_tokens
            st = self.state(req)
            if st is not None and st.layer_evicted is not None:
                evicted[i] = st.layer_evicted
                compressed = True
            else:
                n = req.num_prompt_tokens
                lo, hi = max(start, n - w), min(start + n_new, n)
                if n > self.config.budget and lo < hi:
                    if st is None:
                        st = self._states[req] = _RequestState(req.metrics.num_preemptions)
                    if st.q_window is None:
                        st.q_window = torch.zeros((layers, w, self.num_heads, self.head_dim),
                                                  dtype=self.engine.dtype, device=self.device)
                    rows = torch.arange(row + lo - start, row + hi - start, device=self.device)
                    dst = torch.arange(lo - (n - w), hi - (n - w), device=self.device)
                    capture.append((st.q_window, rows, dst))
            row += n_new
        plan = _StepPlan(row, s, None, None, None, capture)
        if compressed:
            self._layer_metadata(chunks, evicted, plan)
        self.kernels.plan = plan

    def _layer_metadata(self, chunks, evicted: np.ndarray, plan: _StepPlan) -> None:
        """Per-layer slot mapping ``[L, T]`` and context lengths ``[L, S]``: token ``p`` of a sequence is at address
        ``p - evicted[s, l]`` of layer ``l``."""
        s, bs = len(chunks), self.block_size
        starts = np.fromiter((c.request.num_computed_tokens for c in chunks), np.int64, s)
        lens = np.fromiter((c.num_new_tokens for c in chunks), np.int64, s)
        qs = np.concatenate([[0], np.cumsum(lens)])
        t = int(qs[-1])
        seq = np.repeat(np.arange(s, dtype=np.int64), lens)
        positions = starts[seq] + (np.arange(t, dtype=np.int64) - qs[seq])
        width = max(max(len(c.request.block_table) for c in chunks), 1)
        tables = np.zeros((s, width), np.int64)
        for i, c in enumerate(chunks):
            tables[i, :len(c.request.block_table)] = c.request.block_table
        addr = positions[None, :] - evicted[seq].T  # [L, T]
        slots = tables[seq[None, :], addr // bs] * bs + addr % bs
        ctx = (starts + lens)[None, :] - evicted.T  # [L, S]
        # Host arrays: the step's packed upload carries them to the device (PyramidKernels.upload_regions).
        plan.slots_host = np.ascontiguousarray(slots, dtype=np.int64)
        plan.context_lens_host = np.ascontiguousarray(ctx, dtype=np.int64)
        plan.context_lens = ctx.tolist()

    def after_forward(self, sched) -> None:
        for c in sched.chunks:
            req = c.request
            n = req.num_prompt_tokens
            if not req.num_computed_tokens - c.num_new_tokens < n <= req.num_computed_tokens:
                continue  # this step did not finish the prompt
            st = self.state(req)
            if st is None or st.q_window is None:
                self.stats["uncompressed_requests"] += 1
                continue
            self.compress(req, st)

    def compress(self, req, st: _RequestState) -> None:
        """Compress ``req``'s cache now (its prompt is computed; tokens after it, from a recompute, are all kept) and
        return the blocks it no longer needs."""
        n, m, bs = req.num_prompt_tokens, req.num_computed_tokens, self.block_size
        cfg = self.config
        budgets = cfg.budgets(self.num_layers, n)
        ids = torch.tensor(req.block_table[:-(-m // bs)], dtype=torch.int64, device=self.device)
        st.kept = compress_cache(self.pool, ids, m, n, st.q_window, budgets, cfg.kernel_size, cfg.pooling,
                                 self.engine.model.scale)
        st.q_window = None
        st.layer_evicted = n - np.asarray(budgets, dtype=np.int64)
        req.num_evicted_tokens = int(st.layer_evicted.min())
        need = -(-(m - req.num_evicted_tokens) // bs)
        freed = req.block_table[need:]
        del req.block_table[need:]
        self.engine.block_manager.free_blocks(freed)
        self.stats["compressed_requests"] += 1
        self.stats["prompt_tokens"] += n
        self.stats["kept_tokens"] += sum(budgets)
        self.stats["blocks_freed"] += len(freed)


# ---- the plugin -------------------------------------------------------------------------------------------------
def attach(engine, name: str = "pyramidkv", order: list[int] | None = None, *, config: PyramidConfig | None = None,
           **overrides: Any) -> PyramidKV:
    """``system_plugins`` installer: install PyramidKV on ``engine`` (idle, all-FP16, no other system installed).

    ``name`` picks the parameters (:data:`NAME_GRAMMAR`; ``pyramidkv`` alone = budget 128, beta 20, window 8,
    kernel 7, max pooling); ``config`` replaces the name's, and ``overrides`` (``budget=``, ``beta=``, ...) replace
    single fields.  ``order`` (the workflow's swap order) is checked to be a permutation and otherwise unused: every
    layer stays FP16.  Returns the installed :class:`PyramidKV`."""
    from morphserve.importance.orders import check_order
    from morphserve.memory.weight_arena import Precision

    n = engine.model_config.num_layers
    if order is not None:
        check_order(order, n)
    cfg = dataclasses.replace(config, **overrides) if config is not None else PyramidConfig.from_name(name, **overrides)
    if engine.has_unfinished() or engine.morpher is not None or getattr(engine, "kv_policy", None) is not None:
        raise ValueError(f"{name}: the engine must be idle and have no system or KV policy installed")
    if engine.model.arena.precisions() != [Precision.FP16.value] * n:
        raise ValueError(f"{name}: the engine's layers must all be FP16, got {engine.model.arena.precisions()}")
    policy = PyramidKV(engine, cfg, name)
    policy.install()
    log.info("%s installed: %s", name, policy.to_dict())
    return policy
