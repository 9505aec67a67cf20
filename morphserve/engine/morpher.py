"""Carries morphing decisions out: layer swaps, KV growth and release, in an order that is always safe.

Each engine step calls :meth:`Morpher.before_step` (before scheduling) and :meth:`Morpher.after_step` (after the
step was launched).  The target precision map comes from the :class:`MorphController` (dynamic systems) or is fixed
(static systems: FP16, all-W4, static selective).  For every layer whose target differs from where it is going:

* **down** (smaller variant): the swap is queued before the step; after the step is launched its copy is issued
  (ordered behind the step's last read of the layer, see :mod:`morphserve.memory.layer_swapper`) and the freed bytes
  are attached as KV blocks at once, so the next schedule already sees the new capacity;
* **up** (larger variant): the layer's KV segments in the way are released first (closed, live blocks migrated or
  drained by policy); only when none is left is the swap queued, and its copy waits for the end of the step.

With scratch space (:class:`morphserve.memory.layer_swapper.ScratchBlocks`) a swap is *staged*: its bytes travel
to free KV blocks first and land in the slot between two steps (:meth:`LayerSwapper.land`, in
:meth:`Morpher.after_step`: the device-to-device copy is enqueued on the swapper's landing stream behind the step
just launched, the next step joins it, and the landing's host work, about 0.5 ms on an H200, overlaps the step on
the GPU); a down swap's freed bytes are attached when it lands.  :func:`land_staged` also has the decode graphs
build the destination map's composite graphs for the current batch bucket while the swap travels (host work done
while the GPU runs the step just launched), so the first step at the new map replays graphs, never a capture.

A layer with a copy in flight is left alone until it lands; a release whose layer is sent down again is cancelled.
Every step appends a timeline entry: precision of each layer, target, KV capacity and use, queue, and the reason of
any decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from morphserve.engine.controller import MorphController
from morphserve.engine.monitor import ServingMonitor
from morphserve.memory.kv_resizer import KVResizer, ReleasePolicy
from morphserve.memory.layer_swapper import LayerSwapper, Swap
from morphserve.memory.weight_arena import Precision, layout_for


@dataclass
class TimelineEntry:
    step: int
    time: float
    precisions: str  # one character per layer: F (fp16), 8 (w8), 4 (w4)
    target: str
    kv_total_blocks: int
    kv_used_blocks: int
    kv_extension_blocks: int
    queue_len: int
    running: int
    swaps_in_flight: int
    releasing_layers: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


_CODE = {Precision.FP16: "F", Precision.W8: "8", Precision.W4: "4"}


def precision_code(precisions: list[Precision]) -> str:
    return "".join(_CODE[p] for p in precisions)


def land_staged(swapper: LayerSwapper, graphs=None) -> list[Swap]:
    """Right after a launch: land every staged swap whose bytes are in scratch, building the decode graphs the
    steps around it replay first (``graphs``: the runner's :class:`~morphserve.engine.cuda_graphs.DecodeGraphs`,
    or None on CPU and without graphs).  While a swap travels, the composite of the map once every pending swap
    has landed is built now, while the GPU runs the step just launched; before a landing, the map after it is made
    ready (usually the same map: nothing to build), so the first step at the new map replays graphs too.  Returns
    the swaps that landed."""
    b = graphs.last_bucket if graphs is not None else None

    def make_ready(key: tuple) -> None:
        if b is not None and not graphs.ready(key, b):
            graphs.prepare(key, b)

    if swapper.staging():
        make_ready(swapper.target_map())
    swaps = swapper.landable()
    if not swaps:
        return []
    make_ready(swapper.map_after(swaps))
    return swapper.land(swaps=swaps)


def advance_swaps(swapper: LayerSwapper, graphs=None) -> tuple[list[Swap], list[Swap]]:
    """The swapper's work right after a step's launch: issue queued in-place copies, retire finished ones, land
    staged swaps (:func:`land_staged`).  Returns (issued, landed).  :meth:`Morpher.after_step` runs it; the
    benchmarks install it as the runner's after-launch hook."""
    issued = swapper.issue()
    swapper.poll()
    return issued, land_staged(swapper, graphs)


class Morpher:
    def __init__(self, engine, swapper: LayerSwapper, resizer: KVResizer,
                 controller: MorphController | None = None, static_map: list[Precision] | None = None,
                 monitor: ServingMonitor | None = None, release_policy: ReleasePolicy = ReleasePolicy.MIGRATE):
        if (controller is None) == (static_map is None):
            raise ValueError("a morpher needs exactly one of a controller (dynamic) or a static precision map")
        self.engine = engine
        self.swapper = swapper
        self.resizer = resizer
        self.controller = controller
        self.static_map = static_map
        self.monitor = monitor or ServingMonitor()
        self.release_policy = release_policy
        self.timeline: list[TimelineEntry] = []
        self._step = 0
        cfg, dtype = engine.model.arena.cfg, engine.model.arena.dtype
        self._nbytes = {p: layout_for(p, cfg, dtype).nbytes for p in Precision}

    def target(self) -> list[Precision]:
        return self.controller.target_map() if self.controller is not None else list(self.static_map)

    def _attach_freed(self, swaps: list[Swap]) -> None:
        """A down swap's freed slot bytes become KV blocks (once its copy is issued in place, or it landed)."""
        for swap in swaps:
            if not swap.grows:
                self.resizer.grow(swap.layer, swap.dst)

    def before_step(self) -> None:
        eng = self.engine
        self.swapper.join()  # KV work below (migrations) may touch blocks a landing copy reads
        snap = self.monitor.snapshot(self._step, eng.clock(), eng.scheduler, eng.block_manager)
        reason = ""
        if self.controller is not None:
            decision = self.controller.decide(snap)
            if decision is not None:
                reason = f"level {decision.old_level}->{decision.new_level}: {decision.reason}"
        target = self.target()
        for layer, want in enumerate(target):
            sw = self.swapper
            if sw.busy(layer) and sw.swaps[layer].state.value != "queued":
                continue  # a copy is in flight: decide again once it has landed
            current = sw.precision(layer)
            if want == current:
                sw.cancel(layer)
                self.resizer.cancel_release(layer)
                continue
            if self._nbytes[want] <= self._nbytes[current]:  # down (or same size)
                self.resizer.cancel_release(layer)
                sw.request(layer, want)
            elif self.resizer.ready_to_grow(layer, want):
                sw.request(layer, want)
            else:
                sw.cancel(layer)
                self.resizer.begin_release(layer, want, self.release_policy)
        for layer in self.resizer.releasing_layers():
            self.resizer.try_finish_release(layer)
            want = target[layer]
            if self._nbytes[want] > self._nbytes[self.swapper.precision(layer)] and \
                    self.resizer.ready_to_grow(layer, want) and not self.swapper.busy(layer):
                self.swapper.request(layer, want)
        bm = eng.block_manager
        self.timeline.append(TimelineEntry(
            self._step, snap.time, precision_code([self.swapper.precision(i) for i in range(len(target))]),
            precision_code(target), bm.num_total_blocks, bm.num_used, self.resizer.extension_blocks(),
            snap.queue_len, snap.running, len(self.swapper.in_flight()), len(self.resizer.releasing_layers()),
            reason))

    def after_step(self) -> None:
        issued, landed = advance_swaps(self.swapper, self.engine.runner.graphs)
        self._attach_freed(issued + landed)
        self._step += 1

    def settle_idle(self) -> None:
        """On an idle engine (no forward in flight or to come before the next schedule): switch every layer whose
        copy was issued to its new precision now (the compute stream waits for the copy), instead of waiting for a
        forward pass to do it in ``before_layer``, so an idle engine finishes restoring its layers."""
        for swap in self.swapper.in_flight():
            self.swapper.before_layer(swap.layer)
        self.swapper.poll()
        self._attach_freed(self.swapper.land(wait=True))

    def apply_now(self) -> None:
        """Bring every layer to the target synchronously (static systems at start-up, before any request)."""
        while True:
            self.before_step()
            self.after_step()
            self.swapper.synchronize()
            self.settle_idle()  # no forward runs here to switch the views: do it now
            pending = [i for i, p in enumerate(self.target()) if self.swapper.precision(i) != p]
            if not pending and not self.swapper.swaps:
                return
            if self.engine.scheduler.has_unfinished():
                raise RuntimeError("apply_now() is for an idle engine")
