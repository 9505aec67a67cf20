"""CUDA graphs of decode steps: one graph per (layer-precision map, batch-size bucket), captured lazily.

A decode step launches a few hundred small kernels; replaying them as one graph removes the per-launch host cost
and the gaps between launches.  A graph replays fixed kernels with fixed arguments, so everything that changes
between steps lives in **static device buffers** whose contents are rewritten before each replay:

=================  ============================  =================================================================
buffer             shape (bucket ``b``)          padding rows ``S..b``
=================  ============================  =================================================================
token ids          ``[b]``                        0
positions          ``[b]``                        0
slot mapping       ``[b]``                        -1 (the KV store skips them: nothing is written)
context lengths    ``[b]``                        0 (attention returns zeros for them)
block tables       ``[b, max_blocks_per_seq]``   unused (no context)
=================  ============================  =================================================================

All five live in one int64 device buffer (laid out per bucket), filled once per step from a pinned mirror by a
small kernel that reads the pinned memory directly (:mod:`morphserve.kernels.host_upload`: a ``cudaMemcpyAsync``
would queue behind a layer swap's copy on the copy engine).  A batch of ``S`` sequences replays the graph of the smallest bucket ``>= S``; the logits of the
first ``S`` rows are returned.  Decode attention's context split count is fixed per bucket (it depends on the batch
shape only), so one graph serves any context length up to ``max_blocks_per_seq`` blocks.

**What a captured graph depends on, and why it stays valid.**

* *Weights*: the kernels captured the addresses of the layer views.  Weight bytes overwritten in place (a layer's
  slot rewritten without a pointer change) are simply read by the next replay.
* *KV segments*: block ids are resolved inside the kernels through the pool's segment table
  (``seg_base_ptr``), which :class:`~morphserve.memory.kv_pool.KVPool` updates in place.  A segment attached after
  capture (an extension carved from a freed weight slot) is reachable by every existing graph.
* *Layer precisions*: a precision change swaps the layer's layout and therefore which linear kernel runs and with
  which tensor views.  A graph captured under another precision map would replay the old kernels on the new bytes,
  so graphs are keyed by the **precision map** (the tuple of every layer's precision) and a new map is captured
  lazily on its first decode step.  The graphs of the most recent :attr:`DecodeGraphs.max_maps` maps are kept, so
  swapping back to a recent map (e.g. restoring FP16) replays without recapture.

**Per-layer graphs (steps with a layer swap in flight).**  A step during which a layer changes precision needs
the layer swapper's hooks between layers (the compute stream waits for the copy's event just before the swapped
layer, and records fences after it), and its precision map is new.  Such steps replay **one graph per layer**,
keyed by ``(layer, precision, bucket)``, with the hooks run eagerly between replays; layer graphs read and write
two static activation buffers per bucket (hidden state and residual), the first one also embeds the tokens and the
last one also computes the logits.  A layer graph is captured once per precision and serves every precision map,
so a swap never triggers a capture of the whole model.  Steps without a swap replay the whole-step graph of the
current map when it exists; a map is captured whole only after it has been steady for
:attr:`DecodeGraphs.full_capture_after` decode steps (until then its steps replay the per-layer graphs), so a
morphing run does not pay a whole-model capture for every transient map.

**Composite graphs (maps reached by staged swaps).**  A staged swap (:mod:`morphserve.memory.layer_swapper`) lands
between two steps and needs no hooks, so the steps around it can replay whole graphs.  For its destination map,
:meth:`DecodeGraphs.prepare` chains the per-layer graphs (captured with ``keep_graph=True``) as child graphs of
executable graphs (:mod:`morphserve.engine.graph_composite`), one per **segment** of
:attr:`DecodeGraphs.segment_layers` consecutive layers: no Python capture, and a one-layer swap builds only its
segment (a quarter of the 32-layer models), since the other segments of the new map were built for the old one.
A missing segment costs ``cudaGraphInstantiate`` (about 1-5 ms for 32 layers, proportionally less for a segment),
or about 0.1 ms when an unused composite of the same layer structures can be re-targeted in place
(``cudaGraphExecUpdate``); each layer graph's structure is recorded at capture, so an update is tried only where it
can succeed (at batch 8-32 an FP16 layer has more kernels than a W8/W4 one, and a doomed attempt cost about 1 ms).
The morpher builds it right after launching a step, so the host work overlaps the GPU's
(:func:`~morphserve.engine.morpher.land_staged`).  A step launches the map's segments one after another, with a
small gap on the GPU at each of the few boundaries (10-17 us was measured between per-layer graphs on an H200).
A composite is *flat* where it can be (:func:`~morphserve.engine.graph_composite.flat_chain`): the layer graphs'
kernel nodes are copied into it and joined across layers by the programmatic-launch edges a captured whole step has
there, instead of being chained as child-graph nodes with plain edges.
A map with composites replays them until the map changes (a whole-step capture would stall a step for 30-90 ms);
:attr:`DecodeGraphs.max_maps` maps' worth of segments are kept per bucket, least recently used evicted first.

All graphs share one memory pool; they are never replayed concurrently and each keeps its own output tensor, so
their intermediates may alias each other safely.  The logits a replay returns are a view of the graph's output:
they are valid until the next replay of that graph (the engine samples them before the next step).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from morphserve.engine.graph_composite import CompositeGraph, NotFlattenable, structure
from morphserve.memory.kv_pool import KVPool
from morphserve.model.kernel_set import KernelSet
from morphserve.model.llama import ForwardBatch, LlamaModel

if TYPE_CHECKING:
    from morphserve.engine.model_runner import HostBatch
    from morphserve.model.llama import LayerHooks

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor | None  # [bucket, vocab] float32, written by each replay (whole-step and last-layer graphs)
    structure: int | None = None  # a layer graph's structure id (DecodeGraphs.layer_structure), once asked for


@dataclass
class _LayerStage:
    """What the per-layer graphs of one bucket share: the static batch, its kernel state and the activations."""

    batch: ForwardBatch
    state: Any  # KernelSet.begin() of the static batch
    x: torch.Tensor  # [bucket, hidden] the hidden state between layers
    residual: torch.Tensor  # [bucket, hidden]


def graph_buckets(max_num_seqs: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> list[int]:
    """The capture sizes: ``buckets`` up to ``max_num_seqs``, plus ``max_num_seqs`` itself when it falls between
    two buckets (so every batch the scheduler can form up to the largest bucket has a graph)."""
    if max_num_seqs < 1 or not buckets or min(buckets) < 1:
        raise ValueError(f"graph buckets need max_num_seqs >= 1 and positive sizes, got {max_num_seqs}, {buckets}")
    out = sorted({b for b in buckets if b < max_num_seqs})
    top = min(max_num_seqs, max(buckets))
    return out + ([top] if top not in out else [])


class DecodeGraphs:
    def __init__(self, model: LlamaModel, pool: KVPool, kernels: KernelSet, max_num_seqs: int,
                 max_blocks_per_seq: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS, max_maps: int = 4,
                 full_capture_after: int = 0, segment_layers: int = 8, flat_composites: bool = True):
        """``full_capture_after``: decode steps a precision map must be steady before its whole-step graph is
        captured (0: at once; a morphing system raises it, see the module docstring).  ``segment_layers``: layers
        per composite segment; ``flat_composites``: build composites from the layer graphs' kernels (see the module
        docstring)."""
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, got device {model.device}")
        if kernels.name != "triton":
            raise ValueError(f"CUDA graphs need the Triton kernel set (the {kernels.name!r} set synchronises with "
                             f"the host inside the forward)")
        if max_blocks_per_seq < 1 or max_maps < 1 or full_capture_after < 0:
            raise ValueError(f"max_blocks_per_seq and max_maps must be >= 1 and full_capture_after >= 0, got "
                             f"{max_blocks_per_seq}, {max_maps}, {full_capture_after}")
        self.model, self.pool, self.kernels = model, pool, kernels
        self.buckets = graph_buckets(max_num_seqs, buckets)
        self.width = max_blocks_per_seq
        self.max_maps = max_maps
        dev = model.device
        n = self.buckets[-1] * (4 + self.width)
        self.inputs = torch.zeros(n, dtype=torch.int64, device=dev)
        self.pinned = torch.zeros(n, dtype=torch.int64, pin_memory=True)
        self._pinned_np = self.pinned.numpy()
        self._copied = torch.cuda.Event()
        self._copied.record()
        self.arange = torch.arange(self.buckets[-1] + 1, dtype=torch.int64, device=dev)
        # by a kernel, not the copy engine, so a swap copy in flight does not delay the step (see the module)
        from morphserve.kernels.host_upload import upload

        self._upload_kernel = upload
        self.mempool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple, dict[int, _Graph]] = OrderedDict()
        self.num_captures = 0
        self.num_replays = 0
        self.full_capture_after = full_capture_after
        self.layer_graphs: dict[tuple[int, Any, int], _Graph] = {}
        self._stages: dict[int, _LayerStage] = {}
        self._steady_key: tuple | None = None
        self._steady_steps = 0
        self.num_layer_captures = 0
        self.num_layerwise_steps = 0
        # bucket -> (first layer of a segment, its layers' precisions) -> composite, least recently used first
        self.composites: dict[int, OrderedDict[tuple[int, tuple], CompositeGraph]] = {}
        self.num_composite_builds = 0
        self.num_composite_updates = 0
        self.num_composite_steps = 0
        self.num_composite_update_failures = 0  # updates tried between equal structures that CUDA refused
        self.flat_composites = flat_composites
        self.num_unflattened = 0  # composites built from child-graph nodes because a child could not be flattened
        self.set_segment_layers(segment_layers)
        self._structure_ids: dict[tuple, int] = {}  # interned layer-graph structures
        self.last_bucket: int | None = None  # the bucket of the last decode step replayed

    # ---- layout ---------------------------------------------------------------------------------------------
    def bucket_for(self, num_seqs: int) -> int | None:
        for b in self.buckets:
            if b >= num_seqs:
                return b
        return None

    def _regions(self, b: int, buf: torch.Tensor | np.ndarray):
        w = self.width
        return buf[0:b], buf[b:2 * b], buf[2 * b:3 * b], buf[3 * b:4 * b], buf[4 * b:4 * b + b * w].reshape(b, w)

    def precision_key(self) -> tuple:
        return tuple(lw.precision for lw in self.model.arena.layers)

    def serves(self, hb: "HostBatch") -> bool:
        return hb.is_decode and self.bucket_for(hb.num_seqs) is not None and hb.tables.shape[1] <= self.width

    # ---- capture --------------------------------------------------------------------------------------------
    def static_batch(self, b: int) -> ForwardBatch:
        """The batch a graph of bucket ``b`` is captured with: views of the static input buffer."""
        # imported here: the kernel modules decorate @triton.jit functions, which must not happen at engine import
        # (CPU tests switch Triton to its interpreter first; see morphserve.kernels.triton_support)
        from morphserve.kernels.attention import decode_splits

        tokens, positions, slots, ctx, tables = self._regions(b, self.inputs)
        cfg = self.model.cfg
        splits = decode_splits(b, cfg.num_kv_heads, self.kernels.num_sms, group=cfg.num_heads // cfg.num_kv_heads)
        return ForwardBatch(tokens, positions, slots, list(range(b + 1)), [0] * b, [[] for _ in range(b)],
                            self.arange[:b], query_start_t=self.arange[:b + 1], context_lens_t=ctx,
                            block_tables_t=tables, num_splits=splits)

    def _pad_inputs(self, b: int) -> None:
        """Padding contents for a capture: no KV writes, empty contexts."""
        self._copied.synchronize()
        tokens, positions, slots, ctx, tables = self._regions(b, self._pinned_np)
        tokens[:] = 0
        positions[:] = 0
        slots[:] = -1
        ctx[:] = 0
        tables[:] = 0
        n = b * (4 + self.width)
        self._upload_kernel(self.inputs[:n], self.pinned[:n])
        self._copied.record()

    def capture(self, b: int) -> _Graph:
        """Capture the decode graph of bucket ``b`` under the current precision map (if not captured yet)."""
        if b not in self.buckets:
            raise ValueError(f"{b} is not a capture bucket ({self.buckets})")
        key = self.precision_key()
        per_map = self.graphs.get(key)
        if per_map is None:
            per_map = self.graphs[key] = {}
            while len(self.graphs) > self.max_maps:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        if b in per_map:
            return per_map[b]
        self._pad_inputs(b)
        batch = self.static_batch(b)
        graph, logits = self._capture_fn(lambda: self.model.forward(batch, self.pool, self.kernels))
        per_map[b] = _Graph(graph, logits)
        self.num_captures += 1
        return per_map[b]

    def _capture_fn(self, fn, keep_graph: bool = False) -> tuple[torch.cuda.CUDAGraph, Any]:
        """Warm ``fn`` up outside a capture (compiles the Triton kernels and initialises cuBLAS for these shapes),
        then capture it into the shared pool; returns the graph and ``fn``'s output.  ``keep_graph``: keep the
        ``cudaGraph_t`` (a child of composites; instantiated at its first replay)."""
        if not any(self.graphs.values()) and not self.layer_graphs:
            # PyTorch frees a private graph pool once no graph uses it; capturing into a freed pool's handle fails
            self.mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph(keep_graph=keep_graph)
        with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode="thread_local"):
            out = fn()
        return graph, out

    # ---- per-layer graphs -----------------------------------------------------------------------------------
    def _stage(self, b: int) -> _LayerStage:
        st = self._stages.get(b)
        if st is None:
            batch = self.static_batch(b)
            h = self.model.cfg.hidden_size
            x = torch.zeros(b, h, dtype=self.model.dtype, device=self.model.device)
            st = self._stages[b] = _LayerStage(batch, self.kernels.begin(self.model, batch, self.pool), x,
                                               torch.zeros_like(x))
        return st

    def _layer_step(self, i: int, st: _LayerStage) -> torch.Tensor | None:
        """Layer ``i`` of a decode step on the bucket's static buffers (what a layer graph replays)."""
        m, last = self.model, i == self.model.cfg.num_layers - 1
        # a layer's output goes straight into the stage's buffer (the last projection writes it there): a copy
        # kernel at each of the 31 layer boundaries made a batch-1 composite step 1.5-2.3% slower than the
        # whole-step graph (BENCHMARKS.md, issue 5, seventh campaign)
        out = None if last else st.x
        with self.kernels.linear_scope():
            if i == 0:
                torch.index_select(m.embed, 0, st.batch.token_ids, out=st.residual)
                x, residual = m.layer_forward(0, st.residual, None, st.state, self.pool, self.kernels, out)
            else:
                x, residual = m.layer_forward(i, st.x, st.residual, st.state, self.pool, self.kernels, out)
            if residual.data_ptr() != st.residual.data_ptr():  # the Triton norm updates the residual in place
                st.residual.copy_(residual)
            if last:
                return m.head(x, st.residual, st.batch.logits_indices, self.kernels, st.batch.samples_every_row())
            return None

    def capture_layer(self, i: int, precision, b: int) -> _Graph:
        """Capture layer ``i``'s decode graph at ``precision`` for bucket ``b`` (if not captured yet).  The layer's
        views are pointed at ``precision``'s layout for the capture and restored after it; the warm-up runs on
        padding inputs (no KV writes), so a capture may happen while the slot's bytes are being rewritten."""
        key = (i, precision, b)
        g = self.layer_graphs.get(key)
        if g is not None:
            return g
        if b not in self.buckets:
            raise ValueError(f"{b} is not a capture bucket ({self.buckets})")
        arena = self.model.arena
        saved = arena.layers[i]
        self._pad_inputs(b)
        st = self._stage(b)
        try:
            if saved.precision != precision:
                arena.set_precision(i, precision)
            graph, logits = self._capture_fn(lambda: self._layer_step(i, st), keep_graph=True)
        finally:
            arena.layers[i] = saved
        g = self.layer_graphs[key] = _Graph(graph, logits)
        self.num_layer_captures += 1
        return g

    def run_layerwise(self, hb: "HostBatch", hooks: "LayerHooks | None" = None,
                      feed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[S, vocab]`` of a decode step replayed layer by layer, with ``hooks`` (the layer swapper) run
        between the layer graphs.  ``hooks.step_precision(i)`` names the precision layer ``i`` will run at in this
        step (a swap whose copy is in flight switches the layer in its ``before_layer``)."""
        s, b = hb.num_seqs, self.bucket_for(hb.num_seqs)
        n = self.model.cfg.num_layers
        want = [hooks.step_precision(i) if hooks is not None else self.model.arena.layers[i].precision
                for i in range(n)]
        graphs = [self.capture_layer(i, want[i], b) for i in range(n)]
        self._upload(hb, b, feed)
        for i, g in enumerate(graphs):
            if hooks is not None:
                hooks.before_layer(i)
                if self.model.arena.layers[i].precision != want[i]:
                    raise RuntimeError(f"layer {i} runs at {self.model.arena.layers[i].precision} in this step, "
                                       f"its graph was chosen for {want[i]}")
            g.graph.replay()
            if hooks is not None:
                hooks.after_layer(i)
        if hooks is not None:
            hooks.after_step()
        self.num_replays += 1
        self.num_layerwise_steps += 1
        return graphs[-1].logits[:s]

    # ---- composite graphs -----------------------------------------------------------------------------------
    def layer_structure(self, i: int, precision, b: int) -> int:
        """An id of the node structure of layer ``i``'s graph at ``precision`` in bucket ``b`` (captured if
        needed): equal ids, equal :func:`~morphserve.engine.graph_composite.structure`."""
        g = self.capture_layer(i, precision, b)
        if g.structure is None:
            g.structure = self._structure_ids.setdefault(structure(g.graph.raw_cuda_graph()), len(self._structure_ids))
        return g.structure

    def segments(self) -> list[tuple[int, int]]:
        """The layer ranges ``[lo, hi)`` of the composite segments."""
        n, k = self.model.cfg.num_layers, self.segment_layers
        return [(lo, min(lo + k, n)) for lo in range(0, n, k)]

    def _composite(self, key: tuple, b: int) -> list[CompositeGraph] | None:
        """The built segment composites of map ``key`` in bucket ``b`` (marked used), or None if one is missing."""
        per_b = self.composites.get(b)
        if not per_b:
            return None
        keys = [(lo, key[lo:hi]) for lo, hi in self.segments()]
        out = [per_b.get(k) for k in keys]
        if None in out:
            return None
        for k in keys:
            per_b.move_to_end(k)
        return out

    def ready(self, key: tuple, b: int) -> bool:
        """Whether a decode step of precision map ``key`` in bucket ``b`` replays without any capture or build
        (its whole-step graph or all its segment composites exist)."""
        per_map = self.graphs.get(key)
        return (per_map is not None and b in per_map) or self._composite(key, b) is not None

    def prepare(self, key: tuple, b: int) -> list[CompositeGraph]:
        """The segment composites of precision map ``key`` for bucket ``b``, built now where missing (their layer
        graphs captured first if needed).  A missing segment re-targets an unused composite of the same layer
        structures when the bucket holds :attr:`max_maps` maps' worth of segments (``cudaGraphExecUpdate``, about
        0.1 ms), else instantiates a new one (evicting the least recently used).  Segments already built for other
        maps are shared, so a one-layer swap builds one segment."""
        per_b = self.composites.setdefault(b, OrderedDict())
        cap = self.max_maps * len(self.segments())
        current = self.precision_key()
        keep = {(lo, k[lo:hi]) for k in (key, current) for lo, hi in self.segments()}
        out = []
        for lo, hi in self.segments():
            sk = (lo, key[lo:hi])
            c = per_b.get(sk)
            if c is None:
                signature = tuple(self.layer_structure(i, key[i], b) for i in range(lo, hi))
                children = [self.layer_graphs[(i, key[i], b)].graph.raw_cuda_graph() for i in range(lo, hi)]
                victim = None
                if len(per_b) >= cap:
                    victim = next((k for k, v in per_b.items() if k not in keep and v.signature == signature), None)
                    if victim is None:  # no same-structure one to re-target: make room
                        old = next((k for k in per_b if k not in keep), None)
                        if old is not None:
                            per_b.pop(old).close()
                if victim is not None:
                    c = per_b.pop(victim)
                    if c.update(children, signature):
                        self.num_composite_updates += 1
                    else:
                        self.num_composite_update_failures += 1
                        c.close()
                        c = None
                if c is None:
                    c = self._new_composite(children, signature)
                    self.num_composite_builds += 1
                per_b[sk] = c
            per_b.move_to_end(sk)
            out.append(c)
        return out

    def _new_composite(self, children: list[int], signature: tuple) -> CompositeGraph:
        """A new composite of ``children``: flat (their kernels copied in, programmatic edges across layers) when
        :attr:`flat_composites` is on and the children allow it, else chained child graphs."""
        if self.flat_composites:
            try:
                return CompositeGraph(children, signature, flat=True)
            except NotFlattenable:
                self.num_unflattened += 1
        return CompositeGraph(children, signature)

    def set_segment_layers(self, k: int) -> None:
        """Layers per composite segment from now on (the composites built for another size are dropped)."""
        if k < 1:
            raise ValueError(f"segment_layers must be >= 1, got {k}")
        if self.composites and k != self.segment_layers:
            self._drop_composites()
        self.segment_layers = k

    def _drop_composites(self) -> None:
        for per_b in self.composites.values():
            for c in per_b.values():
                c.close()
        self.composites.clear()

    def clear(self) -> None:
        """Drop every captured graph (they are recaptured on demand, e.g. after kernels' launch options changed)."""
        self._drop_composites()
        self.graphs.clear()
        self.layer_graphs.clear()
        self._stages.clear()
        self.mempool = torch.cuda.graph_pool_handle()

    def capture_all(self) -> None:
        """Capture every bucket for the current precision map, largest first (the smaller graphs then reuse the
        largest one's memory)."""
        for b in reversed(self.buckets):
            self.capture(b)

    # ---- replay ---------------------------------------------------------------------------------------------
    def _upload(self, hb: "HostBatch", b: int, feed: torch.Tensor | None = None) -> None:
        """The step's metadata into the static input buffer of bucket ``b`` (one host-to-device copy); then the
        placeholders among its tokens read ``feed`` on the device (asynchronous steps)."""
        s = hb.num_seqs
        self._copied.synchronize()
        tokens, positions, slots, ctx, tables = self._regions(b, self._pinned_np)
        tokens[:s], positions[:s], slots[:s], ctx[:s] = hb.tokens, hb.positions, hb.slots, hb.context_lens
        tokens[s:], positions[s:], slots[s:], ctx[s:] = 0, 0, -1, 0
        w = hb.tables.shape[1]
        tables[:s, :w] = hb.tables
        n = b * (4 + self.width)
        self._upload_kernel(self.inputs[:n], self.pinned[:n])
        self._copied.record()
        if feed is not None:
            self.kernels.feed_tokens(self._regions(b, self.inputs)[0][:s], feed)

    def run(self, hb: "HostBatch", hooks: "LayerHooks | None" = None,
            feed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[S, vocab]`` of a decode step, by graph replay: per-layer graphs with ``hooks`` (an in-place
        swap is queued or in flight); else the map's whole-step graph if captured, else its composite if built,
        else per-layer graphs while the map is not yet steady, else a whole-step capture."""
        if not self.serves(hb):
            raise ValueError(f"no decode graph serves this batch ({hb.num_seqs} sequences, decode={hb.is_decode}, "
                             f"table width {hb.tables.shape[1]} > {self.width}?)")
        s = hb.num_seqs
        b = self.last_bucket = self.bucket_for(s)
        if hooks is not None:
            self._steady_key = None
            return self.run_layerwise(hb, hooks, feed)
        key = self.precision_key()
        if key != self._steady_key:
            self._steady_key, self._steady_steps = key, 0
        self._steady_steps += 1
        per_map = self.graphs.get(key)
        if per_map is None or b not in per_map:
            comp = self._composite(key, b)
            if comp is not None:
                self._upload(hb, b, feed)
                stream = torch.cuda.current_stream()
                for c in comp:
                    c.launch(stream)
                self.num_replays += 1
                self.num_composite_steps += 1
                return self.layer_graphs[(len(key) - 1, key[-1], b)].logits[:s]
        if (per_map is None or b not in per_map) and self._steady_steps <= self.full_capture_after:
            return self.run_layerwise(hb, feed=feed)
        g = self.capture(b)
        self._upload(hb, b, feed)
        g.graph.replay()
        self.num_replays += 1
        return g.logits[:s]
