"""FCFS continuous-batching scheduler with chunked prefill and preemption by recompute.

Every step the scheduler fills a token budget (``max_num_batched_tokens``):

1. Running requests first, oldest first.  Each gets the tokens it has not computed yet, capped by the remaining
   budget: one token for a decoding request, a chunk for one whose prefill is still in progress.  If the KV blocks
   for those tokens cannot be allocated, the *newest* running request is preempted (its blocks freed, its progress
   reset so it is recomputed later, and it goes back to the front of the waiting queue) until they can.
2. Then waiting requests in arrival order, while budget, blocks and ``max_num_seqs`` allow.  Admission is strictly
   FCFS: if the head of the queue does not fit, nobody behind it is admitted.  A request admitted with a partial
   chunk continues its prefill in the next steps.  Nothing is admitted in a step that preempted.

No request is ever dropped: a request whose prompt plus ``max_tokens`` can never fit in the pool is rejected at
submission by the engine, so every admitted request can always make progress once older ones finish.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from morphserve.engine.request import Request, RequestStatus
from morphserve.memory.block_manager import BlockManager


@dataclass
class ScheduledChunk:
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the request's known tokens, so a next token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.bm = block_manager
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens - req.num_evicted_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_table))

    def _preempt(self, req: Request) -> None:
        self.bm.free_blocks(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0
        req.num_evicted_tokens = 0
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            # (asynchronous steps: a request whose in-flight token is its last has nothing left to compute)
            n = min(req.num_tokens - req.num_computed_tokens - req.last_token_final, budget)
            if n <= 0:
                i += 1
                continue
            need = self._blocks_needed(req, n)
            while not self.bm.can_allocate(need) and self.running[-1] is not req:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
            if not self.bm.can_allocate(need):  # req is the newest running request: it yields itself
                self.running.pop()
                self._preempt(req)
                out.preempted.append(req)
                break
            req.block_table += self.bm.allocate(need)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self._blocks_needed(req, n)
            if not self.bm.can_allocate(need):
                break
            self.waiting.popleft()
            req.block_table += self.bm.allocate(need)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
        return out

    def finish(self, req: Request) -> None:
        """Release a finished request's blocks and drop it from the running set (or from the waiting queue: with
        asynchronous steps a request can be preempted while the step that samples its last token is in flight)."""
        self.bm.free_blocks(req.block_table)
        req.block_table = []
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED

    def abort(self, req: Request) -> None:
        if req in self.running:
            self.finish(req)
        elif req in self.waiting:
            self.waiting.remove(req)
            req.status = RequestStatus.FINISHED
