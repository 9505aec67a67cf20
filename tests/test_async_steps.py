"""Asynchronous steps (``EngineConfig.async_steps``): step k+1 is launched before step k's tokens are read back,
its inputs read them on the device through placeholders.  The outputs must be those of synchronous steps: greedy
parity with transformers (batched, chunked prefill, preemption mid-flight), stops on EOS and stop tokens one step
late with the extra token discarded, length limits that are never scheduled past, aborts while a step is in
flight, seeded sampling, and every KV block returned."""

import pytest

from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.engine.sampling_params import SamplingParams
from morphserve.parity import PARITY_PROMPTS, run_parity


def _engine(path, async_steps, **kw):
    return LLMEngine(EngineConfig(model=str(path), async_steps=async_steps, **kw))


@pytest.mark.parametrize("kw", [{}, {"max_num_batched_tokens": 16},
                                {"num_kv_blocks": 24, "max_num_batched_tokens": 64}],
                         ids=["batched", "chunked", "preemption"])
def test_async_greedy_parity_with_transformers(tiny_checkpoint, kw):
    engine = _engine(tiny_checkpoint, True, **kw)
    s = run_parity(engine, PARITY_PROMPTS[:8], max_new_tokens=24)
    assert s["identical"] == s["prompts"] == 8, s["results"]
    if "num_kv_blocks" in kw:
        assert s["preemptions"] > 0
    assert engine.block_manager.num_used == 0 and not engine.has_unfinished()
    if not kw:  # one prefill step and 23 decode steps: no step past the length limit (24 tokens)
        assert len(engine.step_stats) == 24


def _run(engine, prompts, params):
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    outs = {o.request_id: o for o in engine.run_until_done()}
    assert sorted(outs) == sorted(ids)  # every request ends exactly once
    return [outs[i] for i in ids]


def test_async_matches_sync_on_stops_lengths_and_sampling(tiny_mha):
    """Stop tokens and EOS end requests mid-batch (the async engine learns it one step late and discards that
    request's extra token), different length limits end others exactly on time, seeded sampling draws the same
    tokens, and a KV pool that forces preemption changes nothing."""
    prompts = PARITY_PROMPTS[:6]
    sync = _engine(tiny_mha, False)
    base = _run(sync, prompts, [SamplingParams(max_tokens=20)] * len(prompts))
    # stop tokens that occur mid-way in the greedy outputs
    stops = [o.output_token_ids[len(o.output_token_ids) // 2] for o in base]
    params = [SamplingParams(max_tokens=20, stop_token_ids=[stops[0]]),
              SamplingParams(max_tokens=3),
              SamplingParams(max_tokens=1),
              SamplingParams(max_tokens=17, stop_token_ids=[stops[3]]),
              SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5),
              SamplingParams(max_tokens=9, temperature=1.0, top_k=20, seed=7)]
    for kw in ({}, {"num_kv_blocks": 12, "max_num_batched_tokens": 32}):
        want = _run(_engine(tiny_mha, False, **kw), prompts, params)
        engine = _engine(tiny_mha, True, **kw)
        got = _run(engine, prompts, params)
        for w, g in zip(want, got):
            assert g.output_token_ids == w.output_token_ids, (kw, g.request_id)
            assert g.finish_reason == w.finish_reason and g.text == w.text
            assert min(g.output_token_ids) >= 0
        assert [g.finish_reason for g in got][:4] == ["stop", "length", "length", "stop"]
        assert engine.block_manager.num_used == 0 and not engine.has_unfinished()
        assert not engine.scheduler.running and not engine.scheduler.waiting


def test_async_abort_while_in_flight_and_switching_modes(tiny_mha):
    engine = _engine(tiny_mha, True)
    a = engine.add_request(PARITY_PROMPTS[0], SamplingParams(max_tokens=30))
    b = engine.add_request(PARITY_PROMPTS[1], SamplingParams(max_tokens=30))
    for _ in range(5):
        assert engine.step() == []
    assert engine._inflight is not None
    req_a = engine.requests[a]
    assert req_a.has_placeholder and req_a.token_ids[-1] < 0
    snapshot = engine.output(req_a)  # a snapshot never shows a placeholder
    assert min(snapshot.output_token_ids) >= 0 and len(snapshot.output_token_ids) == len(req_a.token_ids) - 1 - \
        req_a.num_prompt_tokens
    out = engine.abort(a)
    assert out.finish_reason == "aborted" and min(out.output_token_ids) >= 0
    # switch to synchronous steps: the first one reads back the step in flight, then the engine runs on
    engine.async_steps = False
    rest = engine.run_until_done()
    assert [o.request_id for o in rest] == [b] and len(rest[0].output_token_ids) == 30
    assert engine.block_manager.num_used == 0
    want = _run(_engine(tiny_mha, False), [PARITY_PROMPTS[1]], [SamplingParams(max_tokens=30)])
    assert rest[0].output_token_ids == want[0].output_token_ids


def test_placeholder_without_a_step_in_flight_is_an_error(tiny_mha):
    engine = _engine(tiny_mha, False)
    rid = engine.add_request(PARITY_PROMPTS[0], SamplingParams(max_tokens=4))
    engine.step()
    engine.requests[rid].token_ids.append(-1)  # what only an asynchronous step may leave behind
    with pytest.raises(RuntimeError, match="placeholder"):
        engine.step()


def test_async_steps_config_is_validated_and_defaults_to_off_without_graphs(tiny_mha):
    with pytest.raises(ValueError, match="async_steps must be True, False or None, got 1"):
        EngineConfig(async_steps=1)
    assert LLMEngine(EngineConfig(model=str(tiny_mha), device="cpu")).async_steps is False  # nothing to overlap
    assert LLMEngine(EngineConfig(model=str(tiny_mha), device="cpu", async_steps=True)).async_steps is True


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kw", [{}, {"num_kv_blocks": 24, "max_num_batched_tokens": 64}], ids=["batched", "preemption"])
def test_cuda_async_equals_sync(tiny_checkpoint, dtype, kw):
    """On the fast path with CUDA graphs (decode steps replay graphs whose static token input is filled on the
    device from the step in flight), eagerly for mixed steps: the tokens of synchronous steps, stops, length limits
    and seeded sampling included."""
    prompts = PARITY_PROMPTS[:8]
    params = [SamplingParams(max_tokens=24), SamplingParams(max_tokens=5), SamplingParams(max_tokens=24, seed=3,
                                                                                          temperature=0.7),
              SamplingParams(max_tokens=1)] * 2
    runs = {}
    for async_steps in (False, True):
        engine = _engine(tiny_checkpoint, async_steps, device="cuda", dtype=dtype, **kw)
        runs[async_steps] = _run(engine, prompts, params)
        assert engine.runner.graphs is not None and engine.runner.graphs.num_replays > 0
        assert engine.block_manager.num_used == 0
    for a, b in zip(runs[False], runs[True]):
        assert a.output_token_ids == b.output_token_ids and a.finish_reason == b.finish_reason, a.request_id
