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

All five live in one int64 device buffer (laid out per bucket), filled by **one** host-to-device copy per step from
a pinned mirror.  A batch of ``S`` sequences replays the graph of the smallest bucket ``>= S``; the logits of the
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

All graphs share one memory pool; they are never replayed concurrently and each keeps its own output tensor, so
their intermediates may alias each other safely.  The logits a replay returns are a view of the graph's output:
they are valid until the next replay of that graph (the engine samples them before the next step).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from morphserve.memory.kv_pool import KVPool
from morphserve.model.kernel_set import KernelSet
from morphserve.model.llama import ForwardBatch, LlamaModel

if TYPE_CHECKING:
    from morphserve.engine.model_runner import HostBatch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket, vocab] float32, written by each replay


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
                 max_blocks_per_seq: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS, max_maps: int = 4):
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, got device {model.device}")
        if kernels.name != "triton":
            raise ValueError(f"CUDA graphs need the Triton kernel set (the {kernels.name!r} set synchronises with "
                             f"the host inside the forward)")
        if max_blocks_per_seq < 1 or max_maps < 1:
            raise ValueError(f"max_blocks_per_seq and max_maps must be >= 1, got {max_blocks_per_seq}, {max_maps}")
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
        self.mempool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple, dict[int, _Graph]] = OrderedDict()
        self.num_captures = 0
        self.num_replays = 0

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
        splits = decode_splits(b, self.model.cfg.num_kv_heads, self.kernels.num_sms)
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
        self.inputs[:n].copy_(self.pinned[:n], non_blocking=True)
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
        if not any(self.graphs.values()):
            # PyTorch frees a private graph pool once no graph uses it; capturing into a freed pool's handle fails
            self.mempool = torch.cuda.graph_pool_handle()
        self._pad_inputs(b)
        batch = self.static_batch(b)
        # warm up outside the capture: compiles the Triton kernels and initialises cuBLAS for these shapes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.forward(batch, self.pool, self.kernels)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode="thread_local"):
            logits = self.model.forward(batch, self.pool, self.kernels)
        per_map[b] = _Graph(graph, logits)
        self.num_captures += 1
        return per_map[b]

    def clear(self) -> None:
        """Drop every captured graph (they are recaptured on demand, e.g. after kernels' launch options changed)."""
        self.graphs.clear()
        self.mempool = torch.cuda.graph_pool_handle()

    def capture_all(self) -> None:
        """Capture every bucket for the current precision map, largest first (the smaller graphs then reuse the
        largest one's memory)."""
        for b in reversed(self.buckets):
            self.capture(b)

    # ---- replay ---------------------------------------------------------------------------------------------
    def run(self, hb: "HostBatch") -> torch.Tensor:
        """Logits ``[S, vocab]`` of a decode step, by graph replay."""
        if not self.serves(hb):
            raise ValueError(f"no decode graph serves this batch ({hb.num_seqs} sequences, decode={hb.is_decode}, "
                             f"table width {hb.tables.shape[1]} > {self.width}?)")
        s = hb.num_seqs
        b = self.bucket_for(s)
        g = self.capture(b)
        self._copied.synchronize()
        tokens, positions, slots, ctx, tables = self._regions(b, self._pinned_np)
        tokens[:s], positions[:s], slots[:s], ctx[:s] = hb.tokens, hb.positions, hb.slots, hb.context_lens
        tokens[s:], positions[s:], slots[s:], ctx[s:] = 0, 0, -1, 0
        w = hb.tables.shape[1]
        tables[:s, :w] = hb.tables
        n = b * (4 + self.width)
        self.inputs[:n].copy_(self.pinned[:n], non_blocking=True)
        self._copied.record()
        g.graph.replay()
        self.num_replays += 1
        return g.logits[:s]
