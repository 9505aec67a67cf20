"""Round-to-nearest variants of the real SmolLM2-135M: the engine path equals the transformers path, and the quality
order is FP16 < W8 < W4 on held-out text (the full measurement, AWQ included, is benchmarks/quant_quality.py)."""

from __future__ import annotations

import pytest
import torch

import morphserve.quant  # noqa: F401
from morphserve.eval.layer_error import capture_layers, layer_errors
from morphserve.eval.perplexity import heldout_text, load_layer_weights, nll_engine, nll_hf
from morphserve.memory.weight_arena import Precision
from morphserve.model.llama import LlamaModel
from morphserve.model.weight_source import open_source
from morphserve.quant.staging import StagedVariants
from morphserve.quant.variants import dequantize_variant

pytestmark = pytest.mark.slow  # about a minute of CPU on 2 cores (real 135M model, three variants, two paths)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    source = open_source("smollm2-135m")
    model = LlamaModel(source, torch.float32, "cpu")
    staged = StagedVariants.build(model, "rtn")
    text = heldout_text(source.tokenizer(), num_windows=1, seq_len=256, first_doc=0)
    hf = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    return hf, model, staged, text


def test_engine_and_transformers_agree_and_quality_orders(setup):
    hf, model, staged, text = setup
    cfg, ids = model.cfg, text.windows[0]
    ppl = {}
    for p in (Precision.FP16, Precision.W8, Precision.W4):
        for i in range(cfg.num_layers):
            staged.write_into(model.arena, i, p)
            dense = dequantize_variant(staged.tensors(i, p), p, cfg)
            load_layer_weights(hf, i, dense, cfg.q_size, cfg.kv_size, cfg.intermediate_size)
        engine, ref = nll_engine(model, ids), nll_hf(hf, [ids])
        assert engine.mean == pytest.approx(ref.mean, abs=2e-5), p
        ppl[p] = ref.perplexity
    for i in range(cfg.num_layers):
        staged.write_into(model.arena, i, Precision.FP16)
    assert ppl[Precision.FP16] < ppl[Precision.W8] < ppl[Precision.W4]
    assert ppl[Precision.W8] < 1.03 * ppl[Precision.FP16]  # 8-bit is nearly lossless
    assert ppl[Precision.W4] > 1.05 * ppl[Precision.FP16]  # 4-bit RTN on a 135M model is not


def test_layer_error_is_measured_with_the_fp16_input(setup):
    hf, model, staged, text = setup
    cfg = model.cfg
    fp16 = [dequantize_variant(staged.tensors(i, Precision.FP16), Precision.FP16, cfg) for i in range(cfg.num_layers)]
    for i in range(cfg.num_layers):  # whatever the previous test left in the shared model
        load_layer_weights(hf, i, fp16[i], cfg.q_size, cfg.kv_size, cfg.intermediate_size)
    captures = capture_layers(hf, [text.windows[0][:128]])

    def errors(p: Precision):
        def set_variant(i: int) -> None:
            load_layer_weights(hf, i, dequantize_variant(staged.tensors(i, p), p, cfg), cfg.q_size, cfg.kv_size,
                               cfg.intermediate_size)

        def restore(i: int) -> None:
            load_layer_weights(hf, i, fp16[i], cfg.q_size, cfg.kv_size, cfg.intermediate_size)
        return layer_errors(hf, captures, set_variant, restore)

    same = errors(Precision.FP16)
    assert all(e.rel_l2 == 0.0 and e.cosine == pytest.approx(1.0) for e in same)  # FP16 vs itself: exactly 0
    w8, w4 = errors(Precision.W8), errors(Precision.W4)
    assert len(w4) == cfg.num_layers
    assert sum(e.update_rel_l2 for e in w8) < sum(e.update_rel_l2 for e in w4)
    assert all(0 < e.rel_l2 < 1 and e.cosine > 0.9 for e in w4)
