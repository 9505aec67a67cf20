"""Bad input gets a clear error naming the bad value; other requests in flight continue."""

import json
import shutil

import pytest

from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine, RequestError
from morphserve.engine.llm import LLM
from morphserve.engine.sampling_params import SamplingParams
from morphserve.engine.serving import ServingEngine
from morphserve.model.config import ModelError


@pytest.fixture(scope="module")
def engine(tiny_mha):
    return LLMEngine(EngineConfig(model=str(tiny_mha), num_kv_blocks=40))


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelError, match="unknown model 'llama9-1b'.*smollm2-135m"):
        LLMEngine(EngineConfig(model="llama9-1b"))


def test_missing_weight_files(tiny_mha, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_mha, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        LLMEngine(EngineConfig(model=str(d)))


def test_corrupt_weight_file(tiny_mha, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_mha, d)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="model.safetensors: corrupt or unreadable"):
        LLMEngine(EngineConfig(model=str(d)))


def test_checkpoint_with_wrong_shapes(tiny_mha, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_mha, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="gate_proj.weight' has shape \\(128, 64\\), expected \\(100, 64\\)"):
        LLMEngine(EngineConfig(model=str(d)))


def test_truncated_weight_file(tiny_mha, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_mha, d)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelError, match="model.safetensors"):
        LLMEngine(EngineConfig(model=str(d)))


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


@pytest.mark.parametrize("prompt,match", [("", "empty prompt"), ([], "empty prompt"), ([5, 99999], "99999"),
                                          (3.5, "float")])
def test_bad_prompts(engine, prompt, match):
    with pytest.raises(RequestError, match=match):
        engine.add_request(prompt)


def test_prompt_longer_than_context(engine):
    with pytest.raises(RequestError, match="prompt of 1024 tokens does not fit the context window of 1024"):
        engine.add_request([5] * 1024)


def test_request_larger_than_pool(engine):
    with pytest.raises(RequestError, match="needs 41 KV blocks.*pool holds 40"):
        engine.add_request([5] * 600, SamplingParams(max_tokens=50))


def test_bad_engine_config():
    with pytest.raises(ValueError, match="dtype 'float8'"):
        EngineConfig(dtype="float8")
    with pytest.raises(ValueError, match="block_size must be a power of two, got 12"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="num_kv_blocks must be positive, got 0"):
        EngineConfig(num_kv_blocks=0)


def test_llm_generate_names_bad_prompt_index(tiny_mha):
    llm = LLM(str(tiny_mha), num_kv_blocks=40)
    with pytest.raises(RequestError, match="prompt 1: empty prompt"):
        llm.generate(["hello world", ""], use_tqdm=False)
    assert not llm.engine.has_unfinished()  # nothing was queued
    out = llm.generate(["hello world"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].output_token_ids) == 3


def test_bad_request_in_flight_does_not_disturb_others(engine):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with ServingEngine(engine) as srv:
        good = [srv.submit("the quick brown fox", params) for _ in range(3)]
        bad = srv.submit("", params)
        too_long = srv.submit([7] * 2000, params)
        late = srv.submit("hello world", params)
        outs = [f.result(timeout=60) for f in good + [bad, too_long, late]]
    for o in outs[:3] + outs[5:]:
        assert o.finish_reason == "length" and len(o.output_token_ids) == 6 and o.error is None
    assert outs[3].finish_reason == "error" and "empty prompt" in outs[3].error
    assert outs[4].finish_reason == "error" and "2000 tokens" in outs[4].error
    assert not engine.has_unfinished()
