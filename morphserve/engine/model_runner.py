"""The bridge from control plane to data plane: scheduled chunks -> flat tensors -> model -> sampled tokens.

:meth:`ModelRunner.prepare` is vectorised: the per-token metadata (tokens, positions, slot mapping) is computed
with NumPy from per-sequence arrays, never in a Python loop over tokens.  On CUDA everything a step needs is
packed into one pinned int64 buffer and uploaded with a single asynchronous copy: the step's metadata and the
regions its kernel set asks for (:meth:`~morphserve.model.kernel_set.KernelSet.upload_regions`, e.g. the Triton
set's prefill tile map).  The kernels then read device tensors, and the only host synchronisation of a step is
reading back the sampled tokens.  The upload is a kernel
reading the pinned buffer (:mod:`morphserve.kernels.host_upload`), not a copy-engine transfer, so it never waits
behind a layer swap's copy.  Two pinned buffers
alternate, each guarded by an event, so a buffer is never rewritten while its copy may still be in flight (a step
that samples nothing does not synchronise).

Decode-only steps (one token per sequence, every sequence sampling) replay CUDA graphs when the runner has
:class:`~morphserve.engine.cuda_graphs.DecodeGraphs` (per-layer graphs with the swapper's hooks between them while a
swap is queued or in flight); every other step runs the model eagerly.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from morphserve.engine.cuda_graphs import DecodeGraphs
from morphserve.engine.sampler import sample, sample_tensor
from morphserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from morphserve.memory.kv_pool import KVPool
from morphserve.model.kernel_set import KernelSet
from morphserve.model.llama import ForwardBatch, LayerHooks, LlamaModel


@dataclass
class HostBatch:
    """A step's metadata on the host (NumPy int64), before upload."""

    tokens: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T]
    query_start: np.ndarray  # [S + 1]
    context_lens: np.ndarray  # [S]
    tables: np.ndarray  # [S, W] block ids, padded with 0
    logits_rows: np.ndarray  # [S'] rows whose next-token logits are sampled
    block_tables: list[list[int]]  # the requests' own tables (the reference kernels use them)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def is_decode(self) -> bool:
        """One new token per sequence and every sequence samples (the shape a decode CUDA graph serves)."""
        return self.num_tokens == self.num_seqs == self.logits_rows.shape[0] > 0

    @staticmethod
    def from_chunks(chunks: list[ScheduledChunk], block_size: int) -> "HostBatch":
        s = len(chunks)
        starts = np.fromiter((c.request.num_computed_tokens for c in chunks), np.int64, s)
        lens = np.fromiter((c.num_new_tokens for c in chunks), np.int64, s)
        qs = np.zeros(s + 1, np.int64)
        np.cumsum(lens, out=qs[1:])
        t = int(qs[-1])
        tokens = np.fromiter(itertools.chain.from_iterable(
            c.request.token_ids[st:st + n] for c, st, n in zip(chunks, starts.tolist(), lens.tolist())), np.int64, t)
        seq = np.repeat(np.arange(s, dtype=np.int64), lens)
        positions = starts[seq] + (np.arange(t, dtype=np.int64) - qs[seq])
        block_tables = [c.request.block_table for c in chunks]
        tlens = np.fromiter(map(len, block_tables), np.int64, s)
        width = max(int(tlens.max()) if s else 0, 1)
        tables = np.zeros((s, width), np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(block_tables), np.int64, int(tlens.sum()))
        rows = np.repeat(np.arange(s, dtype=np.int64), tlens)
        tables[rows, np.arange(flat.shape[0], dtype=np.int64) - np.repeat(np.cumsum(tlens) - tlens, tlens)] = flat
        # A KV-compression policy (baselines.pyramidkv) may have evicted tokens from the cache: token p then lives
        # at address p - evicted of the request's blocks (RoPE still uses the true position p).
        evicted = np.fromiter((c.request.num_evicted_tokens for c in chunks), np.int64, s)
        addr = positions - evicted[seq]
        slots = tables[seq, addr // block_size] * block_size + addr % block_size
        samples = np.fromiter((c.samples for c in chunks), bool, s)
        return HostBatch(tokens, positions, slots, qs, starts - evicted + lens, tables, qs[1:][samples] - 1,
                         block_tables)


class InFlightTokens:
    """The tokens of a launched step, on the device (``tokens``, one per request in ``requests``), and their copy
    to the host, made behind the step (a pinned buffer on CUDA).  :meth:`result` waits for that copy only."""

    def __init__(self, tokens: torch.Tensor, requests: list):
        self.tokens = tokens
        self.requests = requests
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = tokens, None
        self.timed = None  # (StepTiming, start event, end event) of a timed step

    def result(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        if self.timed is not None:
            timing, start, end = self.timed
            timing.device_forward.append(start.elapsed_time(end) / 1e3)
            self.timed = None
        return self._host.tolist()


@dataclass
class StepTiming:
    """Where a step's time goes, in seconds (CUDA only; filled while :attr:`ModelRunner.timing` is set).  The
    host-side work of a step is ``wall - device_forward`` when the GPU is the bottleneck and at least
    ``host_prepare + host_launch`` in any case."""

    host_prepare: list[float] = field(default_factory=list)  # scheduled chunks -> host arrays
    host_launch: list[float] = field(default_factory=list)  # upload + forward or graph replay enqueued (host),
    # plus the after-launch callback
    host_after_launch: list[float] = field(default_factory=list)  # the after-launch callback alone (its part of
    # host_launch: it runs while the GPU works, so it delays the step only when it outlasts the GPU's work)
    device_forward: list[float] = field(default_factory=list)  # GPU time from upload to logits (CUDA events)
    wall: list[float] = field(default_factory=list)  # the whole run(), until the sampled tokens are on the host
    # (asynchronous steps: launch() until its sampling is enqueued; their device_forward entry is added when the
    # tokens are read back, one step later)
    graph: list[bool] = field(default_factory=list)


class _PinnedStaging:
    """Two alternating pinned host buffers for the per-step upload (see the module docstring)."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def take(self, n: int) -> tuple[int, torch.Tensor]:
        i = self.turn = 1 - self.turn
        if self.events[i] is not None:
            self.events[i].synchronize()
        while len(self.buffers) < 2:
            self.buffers.append(torch.empty(0, dtype=torch.int64))
        if self.buffers[i].numel() < n:
            self.buffers[i] = torch.empty(max(n, 2 * self.buffers[i].numel()), dtype=torch.int64, pin_memory=True)
        return i, self.buffers[i][:n]

    def uploaded(self, i: int) -> None:
        ev = self.events[i] = self.events[i] or torch.cuda.Event()
        ev.record()


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool, kernels: KernelSet | None = None,
                 graphs: DecodeGraphs | None = None):
        self.model = model
        self.pool = pool
        self.kernels = kernels or model.kernels
        self.graphs = graphs
        self.device = model.device
        self._staging = _PinnedStaging() if self.device.type == "cuda" else None
        self.timing: StepTiming | None = None  # set to a StepTiming to record per-step timings
        self.last_step_graph = False  # whether the last forward replayed a CUDA graph
        # Installed by a morphing system: the layer swapper's per-layer hooks (a step with swaps queued or in flight
        # runs them between layers: per-layer graph replays for decode steps, else eagerly), and a callback run once
        # the step's kernels are enqueued and before the host waits for its tokens (where the swapper issues its copies, so they overlap the GPU).
        self.hooks: LayerHooks | None = None
        self.after_launch: Callable[[], None] | None = None

    def host_batch(self, sched: SchedulerOutput) -> HostBatch:
        return HostBatch.from_chunks(sched.chunks, self.pool.block_size)

    def upload(self, hb: HostBatch) -> ForwardBatch:
        """One packed host-to-device copy of the step's metadata and of the kernel set's regions
        (:meth:`KernelSet.upload_regions`, for this runner's kernels); returns the batch of device views.  On CPU the
        packed buffer is a host array the views share."""
        t, s, r, w = hb.num_tokens, hb.num_seqs, hb.logits_rows.shape[0], hb.tables.shape[1]
        extra = self.kernels.upload_regions(hb.query_start)
        for j, p in enumerate(extra):
            if p.dtype != np.int64 or p.ndim != 1:
                raise ValueError(f"kernel set {self.kernels.name!r}: upload region {j} must be a 1-D int64 array, "
                                 f"got {p.dtype}{list(p.shape)}")
        parts = [hb.tokens, hb.positions, hb.slots, hb.logits_rows, hb.query_start, hb.context_lens,
                 hb.tables.reshape(-1), *extra]
        # Every region starts on a 16-byte boundary (an even int64 offset): Triton specializes pointer arguments on
        # 16-byte alignment, so regions whose alignment followed the step's sizes made kernels compile new variants
        # in the middle of serving (measured: 2-3 s steps on an H200, 2026-12-02).
        o = [0]
        for p in parts:
            o.append(o[-1] + p.shape[0] + (p.shape[0] & 1))
        n = o[-1]
        if self._staging is None:
            host_np = np.zeros(n, dtype=np.int64)
        else:
            i, host = self._staging.take(n)
            host_np = host.numpy()
        for a, p in zip(o, parts):
            host_np[a:a + p.shape[0]] = p
        if self._staging is None:
            dev = torch.from_numpy(host_np)
        else:
            from morphserve.kernels.host_upload import upload  # CUDA only: kernels import after any interpreter switch

            dev = upload(torch.empty(n, dtype=torch.int64, device=self.device), host)
            self._staging.uploaded(i)
        return ForwardBatch(dev[o[0]:o[0] + t], dev[o[1]:o[1] + t], dev[o[2]:o[2] + t], hb.query_start.tolist(),
                            hb.context_lens.tolist(), hb.block_tables, dev[o[3]:o[3] + r],
                            query_start_t=dev[o[4]:o[4] + s + 1], context_lens_t=dev[o[5]:o[5] + s],
                            block_tables_t=dev[o[6]:o[6] + s * w].view(s, w),
                            kernel_regions=tuple(dev[a:a + p.shape[0]] for a, p in zip(o[7:], extra)))

    def prepare(self, sched: SchedulerOutput) -> ForwardBatch:
        return self.upload(self.host_batch(sched))

    def forward(self, hb: HostBatch, feed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the rows that sample: a CUDA-graph replay for decode steps the graphs serve, else eager.
        ``feed``: the tokens sampled by the step in flight (asynchronous steps), which input placeholders read
        (:meth:`KernelSet.feed_tokens`)."""
        if not (hb.num_tokens and int(hb.tokens.min()) < 0):
            feed = None  # no placeholder to fill
        elif feed is None or feed.shape[0] == 0:
            raise RuntimeError("a step's input holds a placeholder token but no step in flight feeds it")
        if self.hooks is not None:
            self.hooks.before_forward()
        hooks = self.hooks if self.hooks is not None and self.hooks.active() else None
        self.last_step_graph = self.graphs is not None and self.graphs.serves(hb)
        if self.last_step_graph:
            return self.graphs.run(hb, hooks, feed)
        fb = self.upload(hb)
        if feed is not None:
            self.kernels.feed_tokens(fb.token_ids, feed)
        return self.model.forward(fb, self.pool, self.kernels, hooks=hooks)

    def launch(self, sched: SchedulerOutput, feed: torch.Tensor | None = None) -> "InFlightTokens":
        """Enqueue the step and its sampling without waiting for the device (asynchronous steps): the sampled
        tokens stay on the device for the next step's inputs and are copied to the host behind the step."""
        sampling = [c.request for c in sched.chunks if c.samples]
        timing = self.timing if self.device.type == "cuda" else None
        t0 = time.perf_counter()
        hb = self.host_batch(sched)
        t1 = time.perf_counter()
        if timing is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        logits = self.forward(hb, feed)
        if timing is not None:
            end.record()
        tokens = sample_tensor(logits, [r.params for r in sampling], [r.generator for r in sampling],
                               self.kernels.greedy)
        t_enqueued = time.perf_counter()
        if self.after_launch is not None:
            self.after_launch()
        out = InFlightTokens(tokens, sampling)
        if timing is not None:  # the device time is added when the tokens are read back (InFlightTokens.result)
            t2 = time.perf_counter()
            timing.host_prepare.append(t1 - t0)
            timing.host_launch.append(t2 - t1)
            timing.host_after_launch.append(t2 - t_enqueued)
            timing.wall.append(t2 - t0)
            timing.graph.append(self.last_step_graph)
            out.timed = (timing, start, end)
        return out

    def run(self, sched: SchedulerOutput) -> list[int]:
        """Forward the scheduled chunks; returns one sampled token per chunk that samples (in chunk order)."""
        sampling = [c.request for c in sched.chunks if c.samples]
        timing = self.timing if self.device.type == "cuda" else None
        if timing is None:
            logits = self.forward(self.host_batch(sched))
            if self.after_launch is not None:
                self.after_launch()
            return sample(logits, [r.params for r in sampling], [r.generator for r in sampling], self.kernels.greedy)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        hb = self.host_batch(sched)
        t1 = time.perf_counter()
        start.record()
        logits = self.forward(hb)
        end.record()
        t_enqueued = time.perf_counter()
        if self.after_launch is not None:
            self.after_launch()
        t2 = time.perf_counter()
        tokens = sample(logits, [r.params for r in sampling], [r.generator for r in sampling], self.kernels.greedy)
        t3 = time.perf_counter()
        timing.host_prepare.append(t1 - t0)
        timing.host_launch.append(t2 - t1)
        timing.host_after_launch.append(t2 - t_enqueued)
        timing.device_forward.append(start.elapsed_time(end) / 1e3)
        timing.wall.append(t3 - t0)
        timing.graph.append(self.last_step_graph)
        return tokens
