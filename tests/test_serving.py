"""The engine accepts requests while it runs, and records per-request timestamps."""

import time

from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.engine.llm import LLM
from morphserve.engine.sampling_params import SamplingParams
from morphserve.engine.serving import ServingEngine

PROMPTS = ["the quick brown fox", "hello world, this is", "paged attention", "continuous batching with"]


def test_requests_join_a_running_batch_and_match_offline_outputs(tiny_mha):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    offline = LLM(str(tiny_mha)).generate(PROMPTS, params, use_tqdm=False)
    engine = LLMEngine(EngineConfig(model=str(tiny_mha)))
    with ServingEngine(engine) as srv:
        first = [srv.submit(p, params) for p in PROMPTS[:2]]
        while not engine.step_stats:  # wait until the engine is running steps
            time.sleep(0.001)
        later = [srv.submit(p, params) for p in PROMPTS[2:]]
        outs = [f.result(timeout=60) for f in first + later]
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in offline]
    # the late requests were admitted while the first ones were still decoding
    assert min(o.metrics.first_scheduled_time for o in outs[2:]) < max(o.metrics.finished_time for o in outs[:2])


def test_timestamps_are_ordered_and_complete(tiny_mha):
    out = LLM(str(tiny_mha)).generate(PROMPTS, SamplingParams(max_tokens=7, ignore_eos=True), use_tqdm=False)
    for o in out:
        m = o.metrics
        assert len(m.token_times) == len(o.output_token_ids) == 7
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time == m.token_times[0]
        assert m.token_times == sorted(m.token_times) and m.token_times[-1] <= m.finished_time
        d = o.to_dict()["metrics"]
        assert d["ttft"] >= d["queueing_delay"] >= 0 and d["tpot"] > 0 and d["e2e"] >= d["ttft"]


def test_eos_stops_unless_ignored(tiny_mha):
    llm = LLM(str(tiny_mha))
    eos = llm.engine.model_config.eos_token_ids[0]
    params = SamplingParams(max_tokens=5, stop_token_ids=())
    out = llm.generate(PROMPTS, params, use_tqdm=False)
    for o in out:
        assert o.finish_reason in ("stop", "length")
        assert (o.finish_reason == "stop") == (o.output_token_ids[-1] == eos)
    # a stop token taken from an actual greedy output ends the request right there
    first = out[0].output_token_ids
    stop = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=5, stop_token_ids=(first[1],)), use_tqdm=False)[0]
    assert stop.finish_reason == "stop" and stop.output_token_ids == first[:first.index(first[1]) + 1]


def test_abort(tiny_mha):
    engine = LLMEngine(EngineConfig(model=str(tiny_mha)))
    rid = engine.add_request("hello world", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    out = engine.abort(rid)
    assert out.finish_reason == "aborted" and not engine.has_unfinished()
    assert engine.block_manager.num_used == 0
