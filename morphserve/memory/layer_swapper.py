"""In-place, token-level layer swapping: one asynchronous host-to-device copy per swap, into the layer's own slot.

A swap of layer ``i`` to precision ``p`` copies the staged variant ``(i, p)`` (one pinned host buffer, see
:mod:`morphserve.quant.staging`) into the first bytes of slot ``i``.  No allocation and no pointer change: the
layer's views are rebuilt over the same slot with ``p``'s layout, so CUDA graphs captured against the arena keep
their addresses.

Ordering on CUDA (the copy runs on a dedicated copy stream, overlapped with decode steps):

* a swap is *requested* (queued) before a step ``t``; its ``fence`` event is recorded on the compute stream at once
  (covering all work already launched) and again right after layer ``i`` while step ``t`` runs (step ``t``'s last
  read of the bytes the layer now holds);
* after step ``t`` is launched, :meth:`LayerSwapper.issue` enqueues the copy on the copy stream behind its
  ``fence``, then records ``ready``.  A *growing* swap (W4 -> W8/FP16) is copied in two parts.  The part beyond
  the current variant's bytes (the slot's tail, which held KV blocks: the KV resizer emptied and detached that
  segment before the swap was requested) is enqueued at the request itself, behind all work launched so far; the
  layer keeps running at its current precision meanwhile, and :meth:`issue` leaves the swap queued until that
  tail copy has landed.  Only then is the part over the current variant (its size: what a shrinking swap copies)
  enqueued behind ``fence``.  So no step waits for the large part of an up-swap;
* in step ``t + 1`` the forward calls :meth:`before_layer` for each layer: for a layer with a copy in flight the
  compute stream waits on ``ready`` there, just before the layer's first kernel, and the views switch to ``p``.
  Steps never read a half-written slot, and a step waits only at the layer being swapped, after running every
  layer before it.  The copy overlaps the rest of step ``t`` and the start of step ``t + 1``.  Decode steps run as
  per-layer CUDA graphs with these hooks between them (:mod:`morphserve.engine.cuda_graphs`).

On CPU the same calls run synchronously (the copy happens in :meth:`issue`).  Several layers may be in flight at
once (they share the copy stream, so their copies run back to back at the link's bandwidth); a queued swap can be
cancelled or retargeted until it is issued.

**Staged swaps** (when the swapper has :class:`ScratchBlocks` and enough free KV blocks).  The bytes that must not
land while the layer still runs (all of a shrinking swap's variant; a growing swap's head) are first copied from
host to free blocks of the KV pool (scratch), on the copy stream, at the request: the slot is not touched, so
steps keep running the layer at its old precision with no per-layer hooks (their whole-step or composite graphs
replay).  Once that copy has landed (an event query, no wait), :meth:`land` enqueues one device-to-device copy per
run of consecutive scratch blocks into the slot, *between* two steps, switches the layer and gives the scratch
back.  The copy runs on a landing stream of its own: it waits for an event recorded on the compute stream at the
landing (after the step just launched, the last that reads the old bytes), and :meth:`join`, called before the next
forward (the runner's ``before_forward`` hook, the morpher's ``before_step``), makes the compute stream wait for
it.  So the step just launched returns its tokens without waiting for the copy, which runs while the host
prepares the next step (the GPU idles then; about 0.3 ms at batch 1 on an H200), and the first step that reads the
new bytes runs after it.  The copy of a 7B layer's W4 (107 MB) or W8 (202 MB) variant took 50 and 97 us on an H200
(``benchmarks/probe_swap_timeline.py``); on the compute stream it delayed the landing step's tokens by that much.
No step waits for the host link.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from morphserve.memory.weight_arena import Precision, WeightArena, layout_for


class SwapState(str, Enum):
    QUEUED = "queued"
    STAGING = "staging"  # a staged swap: its bytes are on their way to scratch blocks; the slot is untouched
    COPYING = "copying"
    DONE = "done"


@dataclass
class Swap:
    layer: int
    src: Precision
    dst: Precision
    nbytes: int
    grows: bool  # the new variant is larger than the current one (an up-swap)
    state: SwapState = SwapState.QUEUED
    switched: bool = False  # the layer's views already use ``dst``
    fence: torch.cuda.Event | None = field(default=None, repr=False)  # the copy waits for this
    tail_ready: torch.cuda.Event | None = field(default=None, repr=False)  # a growing swap's tail part has landed
    ready: torch.cuda.Event | None = field(default=None, repr=False)  # recorded when the copy is done
    issued_at: float | None = None  # host clock when the copy was enqueued
    done_at: float | None = None
    copy_events: tuple | None = field(default=None, repr=False)  # (start, end) on the copy stream, when timed
    tail_events: tuple | None = field(default=None, repr=False)  # the same for a growing swap's tail part
    scratch: list[int] | None = None  # a staged swap's KV block ids holding its bytes until it lands
    staged: torch.cuda.Event | None = field(default=None, repr=False)  # a staged swap's bytes are in scratch
    # a staged swap's copies not enqueued yet (paced), (destination, source) byte tensors in order; ``staged`` marks
    # the copies enqueued so far
    pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    copy_steps: int = 0  # the calls that enqueued a staged swap's copies (one per step when paced)

    @property
    def is_staged(self) -> bool:
        return self.scratch is not None

    @property
    def copy_ms(self) -> float | None:
        """Device time of the copies (both parts of a growing swap; needs ``LayerSwapper(time_copies=True)`` and
        finished copies, issued with nothing else in flight)."""
        if not self.copy_events:
            return None
        ms = self.copy_events[0].elapsed_time(self.copy_events[1])
        return ms + (self.tail_events[0].elapsed_time(self.tail_events[1]) if self.tail_events else 0.0)


# Swap copies are enqueued in pieces of this size: the copy engine serves host-to-device copies in order, so a
# step's own small upload (its metadata) waits behind at most one piece instead of a whole layer (measured on an
# H200: one 405 MB copy in flight stretched a batch-32 decode step from 9.5 to 17.4 ms of device time).
COPY_CHUNK_BYTES = 16 << 20


def chunked_copy(dst: torch.Tensor, src: torch.Tensor, chunk: int = COPY_CHUNK_BYTES) -> None:
    """``dst.copy_(src, non_blocking=True)`` for 1-D byte tensors, as back-to-back copies of ``chunk`` bytes."""
    for off in range(0, src.numel(), chunk):
        dst[off:off + chunk].copy_(src[off:off + chunk], non_blocking=True)


class ScratchBlocks:
    """Device staging space for staged swaps: free blocks of the KV pool's base segment (never closed or detached),
    allocated through the block manager like a sequence's and held only until the swap lands."""

    def __init__(self, pool, block_manager):
        self.pool = pool
        self.block_manager = block_manager

    def blocks_for(self, nbytes: int) -> int:
        return -(-nbytes // self.pool.block_bytes)

    def take(self, nbytes: int) -> list[int] | None:
        """Block ids covering ``nbytes`` (ascending), or None when the base segment has too few free blocks."""
        n = self.blocks_for(nbytes)
        if n > self.block_manager.num_free_in(0):
            return None
        return sorted(self.block_manager.allocate(n, segment=0))

    def give_back(self, ids: list[int]) -> None:
        self.block_manager.free_blocks(ids)

    def runs(self, ids: list[int]) -> list[torch.Tensor]:
        """1-D byte views of the blocks, one per run of consecutive ids, in id order."""
        out, mask, start = [], (1 << self.pool.shift) - 1, 0
        for k in range(1, len(ids) + 1):
            if k == len(ids) or ids[k] != ids[k - 1] + 1 or ids[k] >> self.pool.shift != ids[start] >> self.pool.shift:
                seg = self.pool.segments[ids[start] >> self.pool.shift].tensor
                lo = ids[start] & mask
                out.append(seg[lo:lo + k - start].reshape(-1).view(torch.uint8))
                start = k
        return out


def _pieces(runs: list[torch.Tensor], flat: torch.Tensor):
    """Pairs ``(run[:n], flat[off:off + n])`` that lay the 1-D byte tensor ``flat`` over the concatenation of
    ``runs``, in order, until ``flat`` is used up."""
    off = 0
    for r in runs:
        n = min(r.numel(), flat.numel() - off)
        if n <= 0:
            return
        yield r[:n], flat[off:off + n]
        off += n


def gather_copy(dst: torch.Tensor, srcs: list[torch.Tensor]) -> None:
    """Copy the concatenation of the 1-D byte tensors ``srcs`` into ``dst`` (non-blocking, one copy per source)."""
    for s, d in _pieces(srcs, dst):
        d.copy_(s, non_blocking=True)


class LayerSwapper:
    def __init__(self, arena: WeightArena, staged, device: torch.device | str, time_copies: bool = False,
                 scratch: ScratchBlocks | None = None, copy_budget: int | None = None, staged_only: bool = False):
        """``staged``: a :class:`morphserve.quant.staging.StagedVariants` holding every variant to swap to.
        ``time_copies``: record CUDA events around each copy (benchmarks).  ``scratch``: where staged swaps keep
        their bytes (see the module); without it every swap copies into the slot in place.  ``copy_budget``:
        bytes of staged-swap copies enqueued per step (per :meth:`issue`, in whole pieces of
        :data:`COPY_CHUNK_BYTES`; None: a swap's copies are enqueued at its request).  Pacing spreads a copy's
        cost to the steps it overlaps (on an H200 a copy running through a batch-1 step slowed its GEMVs by 5-6%)
        over more steps, at the price of the swap's latency; it lowered a swap's mean step but measured no
        consistent gain in its worst step (BENCHMARKS.md, sixth and seventh swap-step campaigns); with flat
        composites it kept batch-1 swaps within 1.05x where unpaced ones were not (eighth), so every mode paces at
        16 MiB.  ``staged_only`` (with ``scratch``): a swap that finds too few free scratch blocks is not queued
        (:meth:`request` returns None; the caller asks again in a later step) instead of falling back to the
        in-place path, whose steps run the per-layer graphs (1.13-1.23x a no-swap step at batch 8-32 on an H200,
        against <= 1.05x staged; BENCHMARKS.md, issue 5)."""
        if staged_only and scratch is None:
            raise ValueError("staged_only needs scratch blocks to stage swaps in")
        self.staged_only = staged_only
        if copy_budget is not None and copy_budget < 1:
            raise ValueError(f"copy_budget must be a positive number of bytes or None, got {copy_budget}")
        self.copy_budget = copy_budget
        self.arena = arena
        self.scratch = scratch
        self.staged = staged
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        # staged landings' device-to-device copies (never behind a host-to-device copy of the copy stream)
        self.land_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._landed: torch.cuda.Event | None = None  # the last landing copy; the compute stream has not joined it
        self.time_copies = time_copies and self.copy_stream is not None
        self.swaps: dict[int, Swap] = {}  # at most one queued or in-flight swap per layer
        self.completed: list[Swap] = []
        self.bytes_copied = 0
        self.declined = 0  # requests not queued for lack of scratch (staged_only)

    # ---- control plane API ----------------------------------------------------------------------------------
    def precision(self, layer: int) -> Precision:
        return self.arena.layers[layer].precision

    def target(self, layer: int) -> Precision:
        """The precision the layer will have once its pending swap (if any) lands."""
        s = self.swaps.get(layer)
        return s.dst if s is not None else self.precision(layer)

    def target_map(self) -> tuple[Precision, ...]:
        """Every layer's :meth:`target`: the precision map once the pending swaps have landed (the key of its
        decode graphs)."""
        return tuple(self.target(i) for i in range(self.arena.cfg.num_layers))

    def busy(self, layer: int) -> bool:
        return layer in self.swaps

    def request(self, layer: int, dst: Precision) -> Swap | None:
        """Queue a swap of ``layer`` to ``dst`` (retargets a queued one; a queued swap to ``dst`` is returned as it
        is).  Returns the swap, or None when the layer already is ``dst`` (or, with ``staged_only``, when too few
        scratch blocks are free: nothing is queued then).  A layer whose copy is in flight cannot be retargeted
        until it lands."""
        if not 0 <= layer < self.arena.cfg.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.arena.cfg.num_layers})")
        dst = Precision(dst)
        self.staged.buffer(layer, dst)  # raises if the variant was never staged
        pending = self.swaps.get(layer)
        if pending is not None and pending.state is not SwapState.QUEUED:
            raise RuntimeError(f"layer {layer} has a {pending.src.value}->{pending.dst.value} copy in flight")
        if pending is not None and pending.dst == dst:
            return pending
        src = self.precision(layer)
        self._drop(layer)
        if dst == src:
            return None
        cfg, dtype = self.arena.cfg, self.arena.dtype
        nbytes = layout_for(dst, cfg, dtype).nbytes
        swap = Swap(layer, src, dst, nbytes, grows=nbytes > layout_for(src, cfg, dtype).nbytes)
        if self.scratch is not None:
            swap.scratch = self.scratch.take(self._head_bytes(swap))
            if swap.scratch is None and self.staged_only:
                self.declined += 1
                return None
        if self.copy_stream is not None:
            swap.fence = torch.cuda.Event()
            swap.fence.record(torch.cuda.current_stream(self.device))
        self.swaps[layer] = swap
        if swap.is_staged:
            self._stage(swap)
        elif swap.grows and self.copy_stream is not None:
            self._copy_tail(swap)  # (an in-place swap on CPU copies everything in issue())
        return swap

    def max_scratch_blocks(self, precisions) -> int:
        """Scratch blocks the largest staged swap among ``precisions`` (down to, or up from, any of them) needs:
        what a base reserve must hold for one staged swap at a time (:meth:`BlockManager.set_base_reserve`)."""
        if self.scratch is None:
            return 0
        cfg, dtype = self.arena.cfg, self.arena.dtype
        return max(self.scratch.blocks_for(layout_for(Precision(p), cfg, dtype).nbytes) for p in precisions)

    def _head_bytes(self, s: Swap) -> int:
        """The bytes that overwrite what the layer reads at its current precision: all of a shrinking swap's
        variant, a growing swap's part over the current variant."""
        return layout_for(s.src, self.arena.cfg, self.arena.dtype).nbytes if s.grows else s.nbytes

    def _stage(self, s: Swap) -> None:
        """Queue a staged swap's copies from its pinned buffer, in pieces of :data:`COPY_CHUNK_BYTES`: a growing
        swap's tail straight into the slot's detached tail first, then the head bytes into its scratch blocks.  They
        run on the copy stream behind all work launched so far (the previous users of those bytes): all of them now,
        or a copy budget per :meth:`issue` when paced."""
        buf = self.staged.buffer(s.layer, s.dst)
        head = self._head_bytes(s)
        pairs = list(_pieces(self.scratch.runs(s.scratch), buf[:head]))
        if s.grows:
            pairs.insert(0, (self.arena.slot(s.layer)[head:buf.numel()], buf[head:]))
        s.pending = [(d[o:o + COPY_CHUNK_BYTES], x[o:o + COPY_CHUNK_BYTES])
                     for d, x in pairs for o in range(0, x.numel(), COPY_CHUNK_BYTES)]
        s.state = SwapState.STAGING
        s.issued_at = time.perf_counter()
        if self.copy_budget is None:
            self._pump(math.inf)

    def _pump(self, budget: float | None = None) -> None:
        """Enqueue staged swaps' pending copies, oldest swap first, up to ``budget`` bytes (default
        :attr:`copy_budget`; at least one piece; on CPU they run now)."""
        budget = self.copy_budget if budget is None else budget
        for s in self.staging():
            take = []
            while s.pending and budget > 0:
                take.append(s.pending.pop(0))
                budget -= take[-1][1].numel()
            if not take:
                continue
            s.copy_steps += 1
            if self.copy_stream is None:
                for d, x in take:
                    d.copy_(x)
                continue
            events, s.staged = self._enqueue(s, lambda take=take: [d.copy_(x, non_blocking=True) for d, x in take])
            if events:
                s.copy_events = (s.copy_events[0] if s.copy_events else events[0], events[1])
            if budget <= 0:
                return

    def staging(self) -> list[Swap]:
        return [s for s in self.swaps.values() if s.state is SwapState.STAGING]

    def landable(self) -> list[Swap]:
        """The staged swaps whose bytes are all in scratch (and a growing swap's tail in the slot): those
        :meth:`land` would land now."""
        return [s for s in self.staging()
                if not s.pending and all(e.query() for e in (s.staged, s.tail_ready) if e is not None)]

    def map_after(self, swaps: list[Swap]) -> tuple[Precision, ...]:
        """The precision map once ``swaps`` have landed (every other layer as it runs now)."""
        dst = {s.layer: s.dst for s in swaps}
        return tuple(dst.get(i, self.precision(i)) for i in range(self.arena.cfg.num_layers))

    def land(self, wait: bool = False, swaps: list[Swap] | None = None) -> list[Swap]:
        """Finish every staged swap whose bytes are in scratch (with ``wait``: every staged swap, the copies
        waited for; with ``swaps``: those of them, from :meth:`landable`): one device-to-device copy per scratch
        run into the slot on the landing stream (ordered after all work launched so far), switch the layer, give
        the scratch back.  Call between two steps' launches (the morpher does it right after a launch, so the host
        work overlaps that step), and :meth:`join` before the next work on the slot or the blocks (``wait`` joins
        at once).  Returns the swaps that landed."""
        landed = []
        if wait:
            self._pump(math.inf)  # paced copies not enqueued yet: all of them now
        todo = (self.staging() if wait else self.landable()) if swaps is None else swaps
        stream = self.land_stream
        if todo and stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the last reads of the old bytes
        for s in todo:
            if s.state != SwapState.STAGING:
                raise ValueError(f"layer {s.layer}'s swap is {s.state.value}, not staging: it cannot land")
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for e in (s.staged, s.tail_ready):  # (None on CPU, where the copies ran at once)
                    if e is not None:
                        stream.wait_event(e)
                gather_copy(self.arena.slot(s.layer)[:self._head_bytes(s)], self.scratch.runs(s.scratch))
            # the blocks' later users (KV writes, new scratch) run on the compute stream after join()
            self.scratch.give_back(s.scratch)
            self.arena.set_precision(s.layer, s.dst)
            s.switched = True
            s.state = SwapState.DONE
            s.done_at = time.perf_counter()
            self.bytes_copied += self.staged.buffer(s.layer, s.dst).numel()
            del self.swaps[s.layer]
            self.completed.append(s)
            landed.append(s)
        if landed and stream is not None:
            self._landed = stream.record_event()
        if wait:
            self.join()
        return landed

    def join(self) -> None:
        """Order the current stream after every landing copy enqueued so far (a no-op when none is pending).
        Called before each forward and before the morpher's KV work, so nothing reads a landed slot or reuses a
        scratch block before its copy."""
        if self._landed is not None:
            torch.cuda.current_stream(self.device).wait_event(self._landed)
            self._landed = None

    def _enqueue(self, s: Swap, copy) -> tuple[tuple | None, torch.cuda.Event]:
        """Run ``copy()`` (enqueues copies) on the copy stream behind ``s.fence``; returns the (start, end) timing
        events when timing copies, and an event recorded after the copies."""
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(s.fence)
            timed = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
                if self.time_copies else None
            if timed:
                timed[0].record(self.copy_stream)
            copy()
            if timed:
                timed[1].record(self.copy_stream)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return timed, done

    def _copy_tail(self, s: Swap) -> None:
        """Enqueue a growing swap's tail part (the bytes beyond the current variant) behind all work launched so
        far (the last reads of the detached KV segment that lived there)."""
        buf = self.staged.buffer(s.layer, s.dst)
        cur = layout_for(s.src, self.arena.cfg, self.arena.dtype).nbytes
        slot = self.arena.slot(s.layer)
        if self.copy_stream is None:  # CPU: at once
            slot[cur:buf.numel()].copy_(buf[cur:])
            return
        s.tail_events, s.tail_ready = self._enqueue(s, lambda: chunked_copy(slot[cur:buf.numel()], buf[cur:]))

    def _drop(self, layer: int) -> None:
        """Forget a queued or staging swap.  If its tail copy or staging copy was enqueued, later compute-stream
        work (which may reuse the slot's tail or the scratch blocks, e.g. as KV blocks again) is ordered after that
        copy; a staged swap's scratch blocks go back to the pool."""
        s = self.swaps.pop(layer, None)
        if s is None:
            return
        for e in (s.tail_ready, s.staged):
            if e is not None:
                torch.cuda.current_stream(self.device).wait_event(e)
        if s.scratch is not None:
            self.scratch.give_back(s.scratch)  # the compute stream is ordered after the staging copy (above)

    def cancel(self, layer: int) -> bool:
        """Drop a queued (not yet issued) or staging (not yet landed) swap; True if one was dropped."""
        s = self.swaps.get(layer)
        if s is not None and s.state in (SwapState.QUEUED, SwapState.STAGING):
            self._drop(layer)
            return True
        return False

    def active(self) -> bool:
        """True while any in-place swap is queued or in flight (steps then run with the per-layer hooks; staged
        swaps need none)."""
        return any(not s.is_staged for s in self.swaps.values())

    def queued(self) -> list[Swap]:
        return [s for s in self.swaps.values() if s.state is SwapState.QUEUED]

    def in_flight(self) -> list[Swap]:
        return [s for s in self.swaps.values() if s.state in (SwapState.COPYING, SwapState.STAGING)]

    # ---- step hooks -----------------------------------------------------------------------------------------
    def before_forward(self) -> None:
        """Runner hook before every forward (hooks active or not): the step waits for staged landings."""
        self.join()

    def step_precision(self, layer: int) -> Precision:
        """The precision ``layer`` runs at in the next step: a swap whose copy was issued switches the layer in
        that step's :meth:`before_layer` (a queued one only after the step, when it is issued)."""
        s = self.swaps.get(layer)
        if s is not None and s.state is SwapState.COPYING and not s.switched:
            return s.dst
        return self.precision(layer)

    def before_layer(self, layer: int) -> None:
        """Forward hook before layer ``layer``'s first kernel (compute stream)."""
        s = self.swaps.get(layer)
        if s is None or s.state is not SwapState.COPYING or s.switched:
            return
        if s.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(s.ready)
        self.arena.set_precision(layer, s.dst)
        s.switched = True

    def after_layer(self, layer: int) -> None:
        """Forward hook after layer ``layer``'s last kernel: a queued swap's copy (over the layer's current bytes)
        may start here."""
        s = self.swaps.get(layer)
        if s is not None and s.fence is not None and s.state is SwapState.QUEUED:
            s.fence.record(torch.cuda.current_stream(self.device))

    def after_step(self) -> None:
        """Forward hook at the end of a step (nothing to do: every copy is fenced per layer)."""

    def issue(self) -> list[Swap]:
        """Enqueue the copies of every queued swap (call after launching a step).  On CPU they run now.  A growing
        swap whose tail copy has not landed yet stays queued (its layer keeps its current precision).  Paced staged
        swaps get this step's copy budget."""
        if self.copy_budget is not None:
            self._pump()
        issued = []
        for s in self.queued():
            if s.tail_ready is not None and not s.tail_ready.query():
                continue
            buf = self.staged.buffer(s.layer, s.dst)
            slot = self.arena.slot(s.layer)
            s.issued_at = time.perf_counter()
            if self.copy_stream is None:
                slot[:buf.numel()].copy_(buf)
                self.arena.set_precision(s.layer, s.dst)
                s.switched = True
                s.state = SwapState.COPYING
            else:
                # a growing swap's head: the bytes over the current variant (its tail has landed already)
                n = layout_for(s.src, self.arena.cfg, self.arena.dtype).nbytes if s.grows else buf.numel()
                s.copy_events, s.ready = self._enqueue(s, lambda: chunked_copy(slot[:n], buf[:n]))
                s.state = SwapState.COPYING
            self.bytes_copied += buf.numel()
            issued.append(s)
        return issued

    def poll(self) -> list[Swap]:
        """Retire swaps whose copy finished and whose layer already runs at the new precision; returns them."""
        done = []
        for layer, s in list(self.swaps.items()):
            if s.state is SwapState.COPYING and s.switched and (s.ready is None or s.ready.query()):
                s.state = SwapState.DONE
                s.done_at = time.perf_counter()
                del self.swaps[layer]
                self.completed.append(s)
                done.append(s)
        return done

    def synchronize(self) -> None:
        """Wait on the host for every copy enqueued so far (host-to-device and landing copies)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
            self.land_stream.synchronize()
