"""Synthetic-weight models: exact shapes, seeded values made on the target device, the mirror's real tokenizer,
and a synthetic label on everything they produce."""

import json

import pytest
import torch

from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.engine.sampling_params import SamplingParams
from morphserve.model.config import ARCHITECTURES, ModelError
from morphserve.model.weight_source import SyntheticSource, open_source
from morphserve.provenance import provenance


def test_values_are_seeded_and_deterministic():
    a, b, c = SyntheticSource("llama2-7b", seed=1), SyntheticSource("llama2-7b", seed=1), SyntheticSource(
        "llama2-7b", seed=2)
    ta, tb, tc = (torch.empty(64, 32) for _ in range(3))
    a.load_into("model.layers.3.mlp.down_proj.weight", ta)
    b.load_into("model.layers.3.mlp.down_proj.weight", tb)
    c.load_into("model.layers.3.mlp.down_proj.weight", tc)
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)
    assert 0.015 < ta.std().item() < 0.025
    n = torch.empty(8)
    a.load_into("model.layers.0.input_layernorm.weight", n)
    assert torch.all(n == 1)


@pytest.mark.parametrize("name", ["vicuna-7b", "llama2-7b", "llama3-8b", "codellama-34b"])
def test_named_architectures_resolve(name):
    src = open_source(name)
    assert src.synthetic and src.config == ARCHITECTURES[name] and "SYNTHETIC" in src.description


def test_unknown_synthetic_name():
    with pytest.raises(ModelError, match="no synthetic weights for 'smollm2-135m'"):
        SyntheticSource("smollm2-135m")


@pytest.mark.parametrize("name,family,bos", [("llama2-7b", "llama2", 1), ("llama3-8b", "llama3", 128000)])
def test_shrunken_synthetic_model_serves_with_real_tokenizer(name, family, bos, capsys):
    cfg = ARCHITECTURES[name].replace(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                      num_kv_heads=4 if family == "llama2" else 2, head_dim=16)
    engine = LLMEngine(EngineConfig(model=name, num_kv_blocks=32), source=SyntheticSource(name, config=cfg))
    assert engine.synthetic_weights and engine.model_config.tokenizer_family == family
    rid = engine.add_request("Hello world", SamplingParams(max_tokens=5, ignore_eos=True))
    assert engine.requests[rid].prompt_token_ids[0] == bos
    out = engine.run_until_done()
    assert len(out[0].output_token_ids) == 5
    prov = provenance(engine.config.to_dict(), engine.device, 0, engine.synthetic_weights)
    assert prov["synthetic_weights"] is True and "SYNTHETIC" in prov["warning"]
    json.dumps(prov)
