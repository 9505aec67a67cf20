"""The serving monitor: what the morphing controller sees each step.

Per step it samples KV utilisation and free blocks (allocatable, closed segments excluded), queue length, the
queueing delay of the oldest waiting request, running requests, and preemptions; over a sliding time window it keeps
TTFT and TPOT of recent requests.  All times are on the engine's clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from morphserve.engine.request import Request


@dataclass(frozen=True)
class MonitorSnapshot:
    step: int
    time: float
    kv_utilization: float  # used / total blocks
    free_blocks: int  # allocatable now
    total_blocks: int
    queue_len: int
    queueing_delay_s: float  # age of the oldest waiting request (0 with an empty queue)
    running: int
    preemptions_in_window: int
    ttft_p95_s: float | None  # over requests whose first token came within the window
    tpot_mean_s: float | None  # over requests that finished within the window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ServingMonitor:
    def __init__(self, window_s: float = 5.0):
        if window_s <= 0:
            raise ValueError(f"monitor window must be positive, got {window_s}")
        self.window_s = window_s
        self._ttft: deque[tuple[float, float]] = deque()  # (time, ttft)
        self._tpot: deque[tuple[float, float]] = deque()
        self._preempt: deque[tuple[float, int]] = deque()
        self._seen_first_token: set[str] = set()
        self._last_preemptions = 0

    def _trim(self, now: float) -> None:
        for q in (self._ttft, self._tpot, self._preempt):
            while q and q[0][0] < now - self.window_s:
                q.popleft()

    def on_token(self, req: Request) -> None:
        m = req.metrics
        if m.first_token_time is not None and req.request_id not in self._seen_first_token:
            self._seen_first_token.add(req.request_id)
            self._ttft.append((m.first_token_time, m.first_token_time - m.arrival_time))

    def on_finish(self, req: Request) -> None:
        self._seen_first_token.discard(req.request_id)
        tpot = req.metrics.tpot
        if tpot is not None and req.metrics.finished_time is not None:
            self._tpot.append((req.metrics.finished_time, tpot))

    def snapshot(self, step: int, now: float, scheduler, block_manager) -> MonitorSnapshot:
        """Sample the engine's state (``scheduler``: waiting/running/num_preemptions; ``block_manager``)."""
        new_preempt = scheduler.num_preemptions - self._last_preemptions
        self._last_preemptions = scheduler.num_preemptions
        if new_preempt:
            self._preempt.append((now, new_preempt))
        self._trim(now)
        waiting = scheduler.waiting
        ttft = [t for _, t in self._ttft]
        tpot = [t for _, t in self._tpot]
        total = block_manager.num_total_blocks
        return MonitorSnapshot(
            step=step, time=now,
            kv_utilization=block_manager.num_used / total if total else 0.0,
            free_blocks=block_manager.num_free_blocks, total_blocks=total,
            queue_len=len(waiting),
            queueing_delay_s=max(0.0, now - waiting[0].metrics.arrival_time) if waiting else 0.0,
            running=len(scheduler.running),
            preemptions_in_window=sum(n for _, n in self._preempt),
            ttft_p95_s=float(np.percentile(ttft, 95)) if ttft else None,
            tpot_mean_s=float(np.mean(tpot)) if tpot else None,
        )
