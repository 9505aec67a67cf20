"""Allocation of KV blocks across the pool's segments.

The block manager hands out *global* block ids (see :mod:`morphserve.memory.kv_pool`).  It keeps one free list per
segment and, by default, allocates from the lowest-indexed open segment first (the base pool, then extension
segments in table order), which keeps extension segments as empty as possible so that they drain quickly when their
layer is restored.  ``extension_first=True`` reverses the preference (used by stress tests to keep live blocks in
extension segments).  A segment can be *closed* (no new allocations; the KV resizer does this before detaching it); its live
blocks stay valid until they are freed or migrated.

A *base reserve* (:meth:`BlockManager.set_base_reserve`) keeps that many blocks of the base pool free for staged
layer swaps: sequences never allocate them (they count as neither free nor allocatable for them), while
``allocate(n, segment=0)`` (the swapper's scratch, :class:`morphserve.memory.layer_swapper.ScratchBlocks`) may.
"""

from __future__ import annotations

from morphserve.memory.kv_pool import KVPool


class BlockManager:
    def __init__(self, pool: KVPool, extension_first: bool = False):
        self.pool = pool
        self.extension_first = extension_first
        self.free: dict[int, list[int]] = {}
        self.closed: set[int] = set()
        self.num_used = 0
        self.base_reserve = 0  # base-pool blocks kept free for staged swaps (see the module)
        for index in pool.segments:
            self._open(index)

    def _open(self, index: int) -> None:
        # Reverse so that pop() yields ascending ids: deterministic, cache-friendly placement.
        self.free[index] = list(reversed(self.pool.block_ids(index)))

    # ---- segments -------------------------------------------------------------------------------------------
    def add_segment(self, index: int) -> None:
        """Make a freshly attached pool segment allocatable."""
        if index in self.free:
            raise ValueError(f"segment {index} is already managed")
        self._open(index)

    def close_segment(self, index: int) -> None:
        """Stop allocating from a segment (its live blocks stay valid)."""
        if index == 0:
            raise ValueError("the base pool cannot be closed")
        self.closed.add(index)

    def live_blocks(self, index: int) -> int:
        return self.pool.segments[index].num_blocks - len(self.free[index])

    def remove_segment(self, index: int) -> None:
        """Forget a segment whose blocks are all free (the caller then detaches it from the pool)."""
        live = self.live_blocks(index)
        if live:
            raise RuntimeError(f"segment {index} still holds {live} live blocks")
        del self.free[index]
        self.closed.discard(index)

    # ---- blocks ---------------------------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that sequences can allocate now (closed segments and the base reserve excluded)."""
        return sum(self._allocatable(i) for i in self.free)

    def _allocatable(self, index: int) -> int:
        if index in self.closed:
            return 0
        n = len(self.free[index])
        return max(0, n - self.base_reserve) if index == 0 else n

    def set_base_reserve(self, n: int) -> None:
        """Keep ``n`` blocks of the base pool out of the sequences' reach (free blocks for staged swaps' scratch).
        Blocks already in use stay where they are: the reserve fills up as they are freed."""
        base = self.pool.segments[0].num_blocks
        if not 0 <= n < base:
            raise ValueError(f"base reserve of {n} blocks: need 0 <= reserve < {base} (the base pool's blocks)")
        self.base_reserve = n

    def num_free_in(self, segment: int) -> int:
        """Free blocks of one segment (0 when it is closed or absent)."""
        return len(self.free.get(segment, ())) if segment not in self.closed else 0

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def allocate(self, n: int, segment: int | None = None) -> list[int]:
        """``n`` free block ids, from ``segment`` only when given (e.g. the base pool, which is never detached)."""
        free = self.num_free_blocks if segment is None else self.num_free_in(segment)
        if n > free:
            where = "" if segment is None else f" in segment {segment}"
            raise RuntimeError(f"asked for {n} KV blocks{where}, {free} free")
        out: list[int] = []
        for index in sorted(self.free, reverse=self.extension_first):
            if index in self.closed or (segment is not None and index != segment):
                continue
            fl = self.free[index]
            keep = self.base_reserve if index == 0 and segment is None else 0
            while len(fl) > keep and len(out) < n:
                out.append(fl.pop())
            if len(out) == n:
                break
        self.num_used += n
        return out

    def free_blocks(self, ids: list[int]) -> None:
        shift = self.pool.shift
        for b in ids:
            self.free[b >> shift].append(b)
        self.num_used -= len(ids)

    def utilization(self) -> float:
        total = self.num_total_blocks
        return self.num_used / total if total else 0.0
