"""Scheduler unit tests on a pool without a model: budgets, FCFS admission, chunking, preemption."""

import torch

from morphserve.engine.request import Request, RequestStatus
from morphserve.engine.sampling_params import SamplingParams
from morphserve.engine.scheduler import Scheduler
from morphserve.memory.block_manager import BlockManager
from morphserve.memory.kv_pool import KVPool
from morphserve.model.config import ModelConfig

CFG = ModelConfig(name="t", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=4, max_position_embeddings=4096)


def make(num_blocks=8, max_seqs=8, budget=64):
    pool = KVPool(CFG, num_blocks, 16, torch.float32, "cpu")
    return Scheduler(BlockManager(pool), 16, max_seqs, budget)


def req(i, n):
    return Request(str(i), list(range(1, n + 1)), SamplingParams(max_tokens=8), arrival_time=float(i))


def advance(sched, out, sample_tok=7):
    """What the engine does after a step: mark tokens computed, append a token where one is sampled."""
    for c in out.chunks:
        samples = c.samples
        c.request.num_computed_tokens += c.num_new_tokens
        if samples:
            c.request.token_ids.append(sample_tok)


def test_chunked_prefill_respects_budget_and_continues():
    s = make(budget=20)
    r = req(0, 50)
    s.add(r)
    sizes = []
    for _ in range(3):
        out = s.schedule()
        sizes.append([c.num_new_tokens for c in out.chunks])
        advance(s, out)
    assert sizes == [[20], [20], [10]]
    assert r.num_output_tokens == 1 and len(r.block_table) == 4


def test_decode_first_then_fcfs_admission():
    s = make(budget=32)
    a, b, c = req(0, 10), req(1, 40), req(2, 5)
    for r in (a, b, c):
        s.add(r)
    out = s.schedule()  # a (10) + b's first 22 tokens; c waits behind b (FCFS), budget exhausted
    assert [(ch.request.request_id, ch.num_new_tokens) for ch in out.chunks] == [("0", 10), ("1", 22)]
    advance(s, out)
    out = s.schedule()  # a decodes 1, b finishes its prefill (18), c is admitted (5)
    assert [(ch.request.request_id, ch.num_new_tokens) for ch in out.chunks] == [("0", 1), ("1", 18), ("2", 5)]


def test_head_of_line_blocks_admission():
    s = make(num_blocks=4, budget=1000)
    big, small = req(0, 60), req(1, 60)  # 4 blocks each
    s.add(big)
    s.add(small)
    out = s.schedule()
    assert [ch.request.request_id for ch in out.chunks] == ["0"]
    assert list(s.waiting) == [small]


def test_max_num_seqs():
    s = make(max_seqs=2)
    for i in range(3):
        s.add(req(i, 4))
    out = s.schedule()
    assert len(out.chunks) == 2 and len(s.waiting) == 1


def test_preempts_newest_and_requeues_it_first():
    s = make(num_blocks=3, budget=1000)
    a, b = req(0, 16), req(1, 16)  # one full block each
    s.add(a)
    s.add(b)
    advance(s, s.schedule())  # both prefilled, each sampled a 17th token -> each needs a second block
    assert s.bm.num_free_blocks == 1
    out = s.schedule()
    assert out.preempted == [b]
    assert [ch.request for ch in out.chunks] == [a]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert s.waiting[0] is b and b.metrics.num_preemptions == 1
    assert b.token_ids[-1] == 7  # generated tokens are kept and will be recomputed


def test_newest_running_request_preempts_itself():
    s = make(num_blocks=2, budget=1000)
    a = req(0, 32)
    s.add(a)
    advance(s, s.schedule())  # 2 blocks used, token 33 needs a third
    out = s.schedule()
    assert out.preempted == [a] and not out.chunks and s.bm.num_free_blocks == 2
