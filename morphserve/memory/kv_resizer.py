"""Elastic KV capacity: freed weight-slot bytes become KV blocks, and are given back.

When a decoder layer steps down the precision ladder, the bytes of its slot that the new variant no longer uses are
carved into whole KV blocks and attached to the pool as an extension segment (:meth:`KVResizer.grow`): capacity
grows in the same step, and the scheduler only sees more free block ids.  A layer has at most two segments, one per
rung it stepped down (``FP16 -> W8`` frees ``[w8_end, slot_end)``; ``W8 -> W4`` then frees ``[w4_end, w8_end)``;
``FP16 -> W4`` frees ``[w4_end, slot_end)`` at once), at pool indices ``1 + 2*layer + rung``.

Before a layer steps back up, every segment overlapping the bytes of the larger variant is *released*
(:meth:`begin_release`):

1. the block manager allocates nothing more from it;
2. its live blocks either **migrate** (:meth:`migrate`: copy each block to a free block of another open segment
   and rewrite the owning request's block table; the block's layers are contiguous, so one copy per block) or
   **drain** (the requests holding them finish or are preempted), by policy;
3. :meth:`try_finish_release` detaches each empty segment; when none is left in the way
   (:meth:`ready_to_grow`), the layer's slot may be overwritten by the larger variant.

Any swap order works: segments are independent (addressed through the segment table), so releasing layer 7's
segment while layers 3 and 12 keep theirs needs no address arithmetic.  Migration runs between engine steps on the
compute stream, so it is ordered after the step that last read the old blocks and before the one that reads the
new ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterable

from morphserve.memory.block_manager import BlockManager
from morphserve.memory.kv_pool import KVPool
from morphserve.memory.weight_arena import Precision, WeightArena, layout_for


class ReleasePolicy(str, Enum):
    MIGRATE = "migrate"  # move live blocks elsewhere as soon as free blocks allow
    DRAIN = "drain"  # wait for the requests holding them to finish


@dataclass
class Region:
    """An extension segment: pool index and the byte range of the layer's slot it occupies."""

    index: int
    layer: int
    start: int
    end: int
    releasing: ReleasePolicy | None = None
    migrated_blocks: int = 0


class KVResizer:
    def __init__(self, pool: KVPool, block_manager: BlockManager, arena: WeightArena,
                 block_tables: Callable[[], Iterable[list[int]]]):
        """``block_tables`` returns the (mutable) block tables of every request holding blocks."""
        self.pool = pool
        self.bm = block_manager
        self.arena = arena
        self.block_tables = block_tables
        self.regions: dict[int, Region] = {}  # by pool index
        self.migrated_total = 0  # blocks moved by migrations over the resizer's life

    def regions_of(self, layer: int) -> list[Region]:
        return sorted((r for r in self.regions.values() if r.layer == layer), key=lambda r: r.start)

    def blocks_of(self, layer: int) -> int:
        return sum(self.pool.segments[r.index].num_blocks for r in self.regions_of(layer))

    def extension_blocks(self) -> int:
        return sum(self.pool.segments[i].num_blocks for i in self.regions)

    # ---- grow -----------------------------------------------------------------------------------------------
    def grow(self, layer: int, precision: Precision | None = None) -> int:
        """Attach the bytes of layer ``layer``'s slot that neither its variant at ``precision`` (default: the
        current one) nor an existing segment uses; returns the number of blocks added (0 when less than a block is
        free).  The morpher grows at a shrinking swap's issue, before the layer switches (on CUDA the switch happens
        in the next step): the tail is still read by the step just launched, but every use of the new blocks (KV
        writes, migrations) runs on the compute stream after it."""
        used = (self.arena.layout(layer) if precision is None else
                layout_for(precision, self.arena.cfg, self.arena.dtype)).nbytes
        covered = min((r.start for r in self.regions_of(layer)), default=self.arena.slot_bytes)
        if covered - used < self.pool.block_bytes:
            return 0
        rung = len(self.regions_of(layer))
        if rung > 1:
            raise RuntimeError(f"layer {layer} already has two KV segments")
        raw = self.arena.slot(layer)[used:covered]
        tensor = self.pool.segment_from_bytes(raw)
        if tensor.shape[0] == 0:
            return 0
        index = 1 + 2 * layer + rung
        self.pool.attach(index, tensor, f"layer:{layer}:rung:{rung}")
        self.bm.add_segment(index)
        start = tensor.data_ptr() - self.arena.slot(layer).data_ptr()
        self.regions[index] = Region(index, layer, start, start + tensor.shape[0] * self.pool.block_bytes)
        return tensor.shape[0]

    # ---- release --------------------------------------------------------------------------------------------
    def blocking_regions(self, layer: int, precision: Precision) -> list[Region]:
        """The segments of ``layer`` that overlap the bytes the ``precision`` variant needs."""
        need = layout_for(precision, self.arena.cfg, self.arena.dtype).nbytes
        return [r for r in self.regions_of(layer) if r.start < need]

    def begin_release(self, layer: int, precision: Precision,
                      policy: ReleasePolicy = ReleasePolicy.MIGRATE) -> list[Region]:
        """Close every segment in the way of growing ``layer`` back to ``precision``; returns them."""
        regions = self.blocking_regions(layer, precision)
        for r in regions:
            if r.releasing is None:
                self.bm.close_segment(r.index)
            r.releasing = policy
        return regions

    def cancel_release(self, layer: int) -> None:
        """Re-open the layer's segments (e.g. pressure came back before they were empty)."""
        for r in self.regions_of(layer):
            if r.releasing is not None:
                r.releasing = None
                self.bm.closed.discard(r.index)

    def live_blocks(self, layer: int) -> int:
        return sum(self.bm.live_blocks(r.index) for r in self.regions_of(layer))

    def migrate(self, region: Region, max_blocks: int | None = None) -> int:
        """Move up to ``max_blocks`` live blocks out of ``region`` into free blocks of open segments (as many as
        are free); returns how many moved."""
        shift = self.pool.shift
        budget = self.bm.num_free_blocks if max_blocks is None else min(max_blocks, self.bm.num_free_blocks)
        src: list[int] = []
        dst: list[int] = []
        for table in self.block_tables():
            for pos, block in enumerate(table):
                if len(src) >= budget:
                    break
                if block >> shift == region.index:
                    new = self.bm.allocate(1)[0]
                    src.append(block)
                    dst.append(new)
                    table[pos] = new
        if src:
            self.pool.copy_blocks(src, dst)
            self.bm.free_blocks(src)
            region.migrated_blocks += len(src)
            self.migrated_total += len(src)
        return len(src)

    def try_finish_release(self, layer: int) -> bool:
        """Migrate (under the MIGRATE policy) and detach the layer's empty releasing segments; True when none of
        the layer's segments is still being released."""
        for r in self.regions_of(layer):
            if r.releasing is None:
                continue
            if r.releasing is ReleasePolicy.MIGRATE and self.bm.live_blocks(r.index):
                self.migrate(r)
            if self.bm.live_blocks(r.index) == 0:
                self.bm.remove_segment(r.index)
                self.pool.detach(r.index)
                del self.regions[r.index]
        return all(r.releasing is None for r in self.regions_of(layer))

    def ready_to_grow(self, layer: int, precision: Precision) -> bool:
        """True when no segment occupies bytes that ``layer``'s ``precision`` variant needs."""
        return not self.blocking_regions(layer, precision)

    def releasing_layers(self) -> list[int]:
        return sorted({r.layer for r in self.regions.values() if r.releasing is not None})
