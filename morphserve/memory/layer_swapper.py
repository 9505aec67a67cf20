"""In-place, token-level layer swapping: one asynchronous host-to-device copy per swap, into the layer's own slot.

A swap of layer ``i`` to precision ``p`` copies the staged variant ``(i, p)`` (one pinned host buffer, see
:mod:`morphserve.quant.staging`) into the first bytes of slot ``i``.  No allocation and no pointer change: the
layer's views are rebuilt over the same slot with ``p``'s layout, so CUDA graphs captured against the arena keep
their addresses.

Ordering on CUDA (the copy runs on a dedicated copy stream, overlapped with decode steps):

* a swap is *requested* (queued) before a step ``t``; its ``fence`` event is recorded on the compute stream at once
  (covering all work already launched) and again while step ``t`` runs: right after layer ``i`` when the variant is
  smaller than what the slot holds (only layer ``i``'s own reads must finish), or at the end of the step when it
  grows (the slot's tail may have held KV blocks, read by every layer; the KV resizer has emptied and detached that
  segment first);
* after step ``t`` is launched, :meth:`LayerSwapper.issue` enqueues each queued copy on the copy stream behind its
  ``fence``, then records ``ready``;
* in step ``t + 1`` the forward calls :meth:`before_layer` for each layer: for a layer with a copy in flight the
  compute stream waits on ``ready`` there, just before the layer's first kernel, and the views switch to ``p``.
  Steps never read a half-written slot, and a step waits only at the layer being swapped, after running every
  layer before it.  The copy overlaps the rest of step ``t`` and the start of step ``t + 1``.

On CPU the same calls run synchronously (the copy happens in :meth:`issue`).  Several layers may be in flight at
once (they share the copy stream, so their copies run back to back at the link's bandwidth); a queued swap can be
cancelled or retargeted until it is issued.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from morphserve.memory.weight_arena import Precision, WeightArena, layout_for


class SwapState(str, Enum):
    QUEUED = "queued"
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
    ready: torch.cuda.Event | None = field(default=None, repr=False)  # recorded when the copy is done
    issued_at: float | None = None  # host clock when the copy was enqueued
    done_at: float | None = None
    copy_events: tuple | None = field(default=None, repr=False)  # (start, end) on the copy stream, when timed

    @property
    def copy_ms(self) -> float | None:
        """Device time of the copy itself (needs ``LayerSwapper(time_copies=True)`` and a finished copy)."""
        return self.copy_events[0].elapsed_time(self.copy_events[1]) if self.copy_events else None


class LayerSwapper:
    def __init__(self, arena: WeightArena, staged, device: torch.device | str, time_copies: bool = False):
        """``staged``: a :class:`morphserve.quant.staging.StagedVariants` holding every variant to swap to.
        ``time_copies``: record CUDA events around each copy (benchmarks)."""
        self.arena = arena
        self.staged = staged
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self.time_copies = time_copies and self.copy_stream is not None
        self.swaps: dict[int, Swap] = {}  # at most one queued or in-flight swap per layer
        self.completed: list[Swap] = []
        self.bytes_copied = 0

    # ---- control plane API ----------------------------------------------------------------------------------
    def precision(self, layer: int) -> Precision:
        return self.arena.layers[layer].precision

    def target(self, layer: int) -> Precision:
        """The precision the layer will have once its pending swap (if any) lands."""
        s = self.swaps.get(layer)
        return s.dst if s is not None else self.precision(layer)

    def busy(self, layer: int) -> bool:
        return layer in self.swaps

    def request(self, layer: int, dst: Precision) -> Swap | None:
        """Queue a swap of ``layer`` to ``dst`` (retargets a queued one).  Returns the swap, or None when the layer
        already is (or is becoming) ``dst``.  A layer whose copy is in flight cannot be retargeted until it lands."""
        if not 0 <= layer < self.arena.cfg.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.arena.cfg.num_layers})")
        dst = Precision(dst)
        self.staged.buffer(layer, dst)  # raises if the variant was never staged
        pending = self.swaps.get(layer)
        if pending is not None and pending.state is not SwapState.QUEUED:
            raise RuntimeError(f"layer {layer} has a {pending.src.value}->{pending.dst.value} copy in flight")
        src = self.precision(layer)
        if dst == src:
            self.swaps.pop(layer, None)
            return None
        cfg, dtype = self.arena.cfg, self.arena.dtype
        nbytes = layout_for(dst, cfg, dtype).nbytes
        swap = Swap(layer, src, dst, nbytes, grows=nbytes > layout_for(src, cfg, dtype).nbytes)
        if self.copy_stream is not None:
            swap.fence = torch.cuda.Event()
            swap.fence.record(torch.cuda.current_stream(self.device))
        self.swaps[layer] = swap
        return swap

    def cancel(self, layer: int) -> bool:
        """Drop a queued (not yet issued) swap; True if one was dropped."""
        s = self.swaps.get(layer)
        if s is not None and s.state is SwapState.QUEUED:
            del self.swaps[layer]
            return True
        return False

    def active(self) -> bool:
        """True while any swap is queued or in flight (steps then run eagerly, with the per-layer hooks)."""
        return bool(self.swaps)

    def queued(self) -> list[Swap]:
        return [s for s in self.swaps.values() if s.state is SwapState.QUEUED]

    def in_flight(self) -> list[Swap]:
        return [s for s in self.swaps.values() if s.state is SwapState.COPYING]

    # ---- step hooks -----------------------------------------------------------------------------------------
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
        """Forward hook after layer ``layer``'s last kernel: a queued shrinking swap's copy may start here."""
        s = self.swaps.get(layer)
        if s is not None and s.fence is not None and s.state is SwapState.QUEUED and not s.grows:
            s.fence.record(torch.cuda.current_stream(self.device))

    def after_step(self) -> None:
        """Forward hook at the end of a step: queued growing swaps' copies may start here."""
        for s in self.swaps.values():
            if s.fence is not None and s.state is SwapState.QUEUED and s.grows:
                s.fence.record(torch.cuda.current_stream(self.device))

    def issue(self) -> list[Swap]:
        """Enqueue the copies of every queued swap (call after launching a step).  On CPU they run now."""
        issued = []
        for s in self.queued():
            buf = self.staged.buffer(s.layer, s.dst)
            slot = self.arena.slot(s.layer)[:buf.numel()]
            s.issued_at = time.perf_counter()
            if self.copy_stream is None:
                slot.copy_(buf)
                self.arena.set_precision(s.layer, s.dst)
                s.switched = True
                s.state = SwapState.COPYING
            else:
                with torch.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_event(s.fence)
                    if self.time_copies:
                        s.copy_events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                        s.copy_events[0].record(self.copy_stream)
                    slot.copy_(buf, non_blocking=True)
                    if self.time_copies:
                        s.copy_events[1].record(self.copy_stream)
                    s.ready = torch.cuda.Event()
                    s.ready.record(self.copy_stream)
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
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
