"""Greedy parity with transformers.generate on tiny random MHA and GQA checkpoints: batched, chunked prefill,
and a KV pool so small that requests are preempted and recomputed mid-generation."""

import pytest

from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.parity import PARITY_PROMPTS, run_parity


def _parity(path, **kw):
    engine = LLMEngine(EngineConfig(model=str(path), **kw))
    return engine, run_parity(engine, PARITY_PROMPTS[:8], max_new_tokens=24)


def test_batched_parity(tiny_checkpoint):
    _, s = _parity(tiny_checkpoint)
    assert s["identical"] == s["prompts"] == 8, s["results"]
    assert s["preemptions"] == 0


def test_chunked_prefill_parity(tiny_checkpoint):
    # a 16-token step budget splits every prompt longer than 16 tokens into chunks
    engine, s = _parity(tiny_checkpoint, max_num_batched_tokens=16)
    assert s["identical"] == 8, s["results"]
    assert max(st.num_tokens for st in engine.step_stats) <= 16
    assert any(r["prompt_tokens"] > 16 for r in s["results"])


def test_preemption_and_recompute_parity(tiny_checkpoint):
    # 24 blocks of 16 tokens cannot hold 8 requests of up to ~360 tokens; chunked admission lets many start, so
    # the newest ones are preempted as the older ones grow
    engine, s = _parity(tiny_checkpoint, num_kv_blocks=24, max_num_batched_tokens=64)
    assert s["preemptions"] > 0
    assert s["identical"] == 8, s["results"]
    assert any(r["num_preemptions"] > 0 and r["engine_tokens"] > 0 for r in s["results"])
    assert engine.block_manager.num_used == 0  # every block came back


def test_one_sequence_at_a_time(tiny_mha):
    _, s = _parity(tiny_mha, max_num_seqs=1)
    assert s["identical"] == 8
