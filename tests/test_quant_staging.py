"""Staged variants in host buffers: writing one into an arena slot switches what the engine's forward computes, and
restoring FP16 is byte-identical; the engine path and the transformers path give the same NLL for a variant."""

from __future__ import annotations

import pytest
import torch

import morphserve.quant  # noqa: F401
from morphserve.eval.perplexity import load_layer_weights, nll_engine, nll_hf
from morphserve.memory.weight_arena import Precision, layout_for
from morphserve.model.llama import LlamaModel
from morphserve.model.weight_source import HFCheckpointSource
from morphserve.quant.packing import QuantFormatError
from morphserve.quant.staging import StagedVariants
from morphserve.quant.variants import dequantize_variant

TOKENS = [(7 * i + 3) % 300 + 3 for i in range(80)]


@pytest.fixture()
def model(tiny_checkpoint) -> LlamaModel:
    return LlamaModel(HFCheckpointSource(tiny_checkpoint), torch.float32, "cpu")


@pytest.fixture()
def hf_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def test_buffers_hold_exactly_each_layout(model):
    staged = StagedVariants.build(model, "rtn")
    assert not staged.pin  # no CUDA here: plain host memory
    for i in range(model.cfg.num_layers):
        for p in Precision:
            buf = staged.buffer(i, p)
            assert buf.dtype == torch.uint8 and buf.numel() == layout_for(p, model.cfg, torch.float32).nbytes
        assert torch.equal(staged.buffer(i, Precision.FP16), model.arena.slot(i))
    assert staged.nbytes(Precision.W4) < staged.nbytes(Precision.W8) < staged.nbytes(Precision.FP16)
    meta = staged.metadata()
    assert meta["w4_group_size"] == 64 and meta["variants"]["w4"]["method"] == "rtn"
    assert meta["variants"]["w8"]["layer_bytes"] == layout_for(Precision.W8, model.cfg, torch.float32).nbytes


def test_swapping_changes_the_forward_and_fp16_restores_byte_identically(model, hf_model):
    cfg = model.cfg
    staged = StagedVariants.build(model, "rtn")
    original = model.arena.storage.clone()
    base = nll_engine(model, TOKENS)

    staged.write_into(model.arena, 0, Precision.W8)
    staged.write_into(model.arena, 2, Precision.W4)
    assert model.arena.precisions() == ["w8", "fp16", "w4"]
    assert model.arena.free_tail(2)[1] > 0.6 * model.arena.slot_bytes  # the W4 layer frees most of its slot
    mixed = nll_engine(model, TOKENS)
    assert mixed.total != base.total

    # the same mixed model through transformers, with the variants' dequantized weights written in
    for i, p in ((0, Precision.W8), (2, Precision.W4)):
        dense = dequantize_variant(staged.tensors(i, p), p, cfg)
        load_layer_weights(hf_model, i, dense, cfg.q_size, cfg.kv_size, cfg.intermediate_size)
    ref = nll_hf(hf_model, [TOKENS])
    assert ref.tokens == mixed.tokens
    assert mixed.total == pytest.approx(ref.total, rel=1e-5)

    for i in (0, 2):
        staged.write_into(model.arena, i, Precision.FP16)
    assert model.arena.precisions() == ["fp16"] * 3
    assert torch.equal(model.arena.storage, original)  # byte-identical, padding included
    assert nll_engine(model, TOKENS).total == base.total


def test_all_layers_w4_engine_matches_transformers(model, hf_model):
    cfg = model.cfg
    staged = StagedVariants.build(model, "rtn", precisions=(Precision.FP16, Precision.W4))
    with pytest.raises(KeyError, match="no staged w8 variant for layer 0"):
        staged.buffer(0, Precision.W8)
    for i in range(cfg.num_layers):
        staged.write_into(model.arena, i, Precision.W4)
        dense = dequantize_variant(staged.tensors(i, Precision.W4), Precision.W4, cfg)
        load_layer_weights(hf_model, i, dense, cfg.q_size, cfg.kv_size, cfg.intermediate_size)
    assert nll_engine(model, TOKENS).total == pytest.approx(nll_hf(hf_model, [TOKENS]).total, rel=1e-5)


def test_bad_staging_input_raises(model):
    staged = StagedVariants(model.cfg, torch.float32)
    w8 = {k: v for k, v in StagedVariants.build(model, "rtn", precisions=(Precision.FP16, Precision.W8))
          .tensors(0, Precision.W8).items()}
    with pytest.raises(QuantFormatError, match=r"missing tensors \['down.scales'\]"):
        staged.add(0, Precision.W8, {k: v for k, v in w8.items() if k != "down.scales"})
    with pytest.raises(QuantFormatError, match="'o.qweight' is torch.float32"):
        staged.add(0, Precision.W8, dict(w8, **{"o.qweight": w8["o.qweight"].float()}))
    with pytest.raises(IndexError, match="layer 7 out of range"):
        staged.add(7, Precision.W8, w8)
    with pytest.raises(ValueError, match="W4 source 'awq'"):
        StagedVariants.build(model, "awq")


def test_w4_source_resolution(tiny_checkpoint, tmp_path):
    from morphserve.model.config import architecture
    from morphserve.model.weight_source import SyntheticSource
    from morphserve.quant.variants import resolve_w4_source

    tiny_cfg = architecture("llama2-7b").replace(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                                                 num_kv_heads=4, head_dim=32, vocab_size=320)
    synthetic = SyntheticSource("llama2-7b", config=tiny_cfg)
    assert resolve_w4_source(synthetic, "auto") == ("rtn", {"method": "rtn"})
    with pytest.raises(ValueError, match="needs a real checkpoint directory"):
        resolve_w4_source(synthetic, "awq")
    with pytest.raises(ValueError, match="expected 'auto', 'rtn', 'awq' or a checkpoint directory"):
        resolve_w4_source(HFCheckpointSource(tiny_checkpoint), "gptq")
    with pytest.raises(QuantFormatError, match="no quantization_config"):
        resolve_w4_source(HFCheckpointSource(tiny_checkpoint), str(tiny_checkpoint))
