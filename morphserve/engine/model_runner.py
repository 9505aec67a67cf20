"""The bridge from control plane to data plane: scheduled chunks -> flat tensors -> model -> sampled tokens."""

from __future__ import annotations

import torch

from morphserve.engine.sampler import sample
from morphserve.engine.scheduler import SchedulerOutput
from morphserve.memory.kv_pool import KVPool
from morphserve.model.llama import ForwardBatch, LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool):
        self.model = model
        self.pool = pool
        self.device = model.device

    def prepare(self, sched: SchedulerOutput) -> ForwardBatch:
        bs = self.pool.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        for chunk in sched.chunks:
            req, n = chunk.request, chunk.num_new_tokens
            start = req.num_computed_tokens
            tokens += req.token_ids[start:start + n]
            pos = range(start, start + n)
            positions += pos
            table = req.block_table
            slots += [table[p // bs] * bs + p % bs for p in pos]
            query_start.append(query_start[-1] + n)
            context_lens.append(start + n)
            tables.append(table)
            if chunk.samples:
                logits_rows.append(query_start[-1] - 1)
        dev = self.device

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=dev)

        return ForwardBatch(t(tokens), t(positions), t(slots), query_start, context_lens, tables, t(logits_rows))

    def run(self, sched: SchedulerOutput) -> list[int]:
        """Forward the scheduled chunks; returns one sampled token per chunk that samples (in chunk order)."""
        batch = self.prepare(sched)
        logits = self.model.forward(batch, self.pool)
        sampling = [c.request for c in sched.chunks if c.samples]
        return sample(logits, [r.params for r in sampling], [r.generator for r in sampling])
