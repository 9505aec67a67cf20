"""The embedded default model: real SmolLM2-135M-Instruct weights, 8 mixed-length prompts batched together,
token-identical to transformers' greedy generate (the issue's acceptance check)."""

import pytest

from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.engine.llm import LLM
from morphserve.engine.sampling_params import SamplingParams
from morphserve.parity import PARITY_PROMPTS, run_parity


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="smollm2-135m", device="cpu"))


def test_parity_8_of_8(engine):
    s = run_parity(engine, PARITY_PROMPTS[:8], max_new_tokens=32)
    assert s["identical"] == 8, [(r["first_divergence"], r["engine_text"]) for r in s["results"]]
    assert len({r["prompt_tokens"] for r in s["results"]}) >= 6  # mixed lengths
    assert s["results"][0]["engine_text"].startswith(" Rome.")


def test_real_model_facts(engine):
    cfg = engine.model_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == \
        (30, 576, 9, 3, True)
    assert cfg.rope_theta == 100000.0 and cfg.eos_token_ids == (2,)
    assert engine.model.lm_head.data_ptr() == engine.model.embed.data_ptr()  # tied, one copy
    assert not engine.synthetic_weights


def test_chat_template_answers():
    llm = LLM("smollm2-135m", device="cpu")
    out = llm.generate(["What is the capital of France?"], SamplingParams(max_tokens=24), chat=True,
                       use_tqdm=False)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
