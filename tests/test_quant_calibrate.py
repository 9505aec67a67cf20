"""llm-compressor quantization (AWQ and round-to-nearest) of a tiny model, read back by the engine's loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import morphserve.quant  # noqa: F401
from morphserve.memory.weight_arena import Precision
from morphserve.model.llama import LlamaModel
from morphserve.model.weight_source import HFCheckpointSource
from morphserve.quant.calibrate import (CalibrationError, calibration_set, quantize_checkpoint,
                                        read_quant_provenance)
from morphserve.quant.staging import StagedVariants
from morphserve.quant.variants import VariantBuilder, dequantize_variant, open_w4_checkpoint, v_row_scale_drift

pytest.importorskip("llmcompressor")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("calib-fp16"), "gqa")


@pytest.fixture(scope="module")
def model(tiny):
    return LlamaModel(HFCheckpointSource(tiny), torch.float32, "cpu")


@pytest.fixture(scope="module")
def calib(tiny):
    return calibration_set(HFCheckpointSource(tiny).tokenizer(), num_samples=4, seq_len=64)


def test_calibration_set_is_deterministic_and_documented(tiny, calib):
    again = calibration_set(HFCheckpointSource(tiny).tokenizer(), num_samples=4, seq_len=64)
    assert again.tokens_sha256 == calib.tokens_sha256 and again.windows == calib.windows
    assert calib.num_samples == 4 and calib.seq_len == 64 and all(len(w) == 64 for w in calib.windows)
    prov = calib.provenance()
    assert prov["file_id"] == "qmsum_test" and len(prov["file_sha256"]) == 64
    with pytest.raises(CalibrationError, match="tokens of calibration text"):
        calibration_set(HFCheckpointSource(tiny).tokenizer(), num_samples=10_000, seq_len=4096)


def test_llmcompressor_rtn_equals_our_rtn(tiny, model, tmp_path):
    out = quantize_checkpoint(tiny, "rtn", out_dir=tmp_path / "rtn")
    assert read_quant_provenance(out)["method"] == "rtn"
    ckpt = open_w4_checkpoint(out)
    theirs = VariantBuilder(model, ckpt)
    ours = VariantBuilder(model, "rtn")
    for i in range(model.cfg.num_layers):
        a, b = theirs.layer(i, Precision.W4), ours.layer(i, Precision.W4)
        for name in a:  # the same min-max scheme: identical codes, zeros and (float32) scales
            assert torch.equal(a[name], b[name]), (i, name)


def test_loader_agrees_with_compressed_tensors_decompression(tiny, model, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    out = quantize_checkpoint(tiny, "rtn", out_dir=tmp_path / "rtn")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"],
                                weights=QuantizationArgs(**qc["config_groups"]["group_0"]["weights"]))
    dense = dequantize_variant(VariantBuilder(model, open_w4_checkpoint(out)).layer(1, Precision.W4), Precision.W4,
                               model.cfg)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        def lib(module: str) -> torch.Tensor:
            sd = {k: f.get_tensor(f"{module}.{k}") for k in
                  ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
            return PackedQuantizationCompressor.decompress(sd, scheme)["weight"]

        p = "model.layers.1."
        want_qkv = torch.cat([lib(p + f"self_attn.{m}_proj") for m in "qkv"])
        want_down = lib(p + "mlp.down_proj")
    assert torch.allclose(dense["qkv"], want_qkv, rtol=0, atol=1e-7)
    assert torch.allclose(dense["down"], want_down, rtol=0, atol=1e-7)


def test_awq_checkpoint_is_a_consistent_layer_variant(tiny, model, calib, tmp_path):
    out = quantize_checkpoint(tiny, "awq", calibration=calib, n_grid=4, out_dir=tmp_path / "awq")
    prov = read_quant_provenance(out)
    assert prov["method"] == "awq" and prov["calibration"]["tokens_sha256"] == calib.tokens_sha256
    assert ["re:.*up_proj$", ["re:.*down_proj$"]] in prov["mappings"]
    assert not any("o_proj" in str(b) for _, b in prov["mappings"])  # the V cache keeps its units
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert quantize_checkpoint(tiny, "awq", calibration=calib, n_grid=4, out_dir=out) == out  # cached
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime

    staged = StagedVariants.build(model, open_w4_checkpoint(out), calibration=prov)
    assert staged.info[Precision.W4].method == "compressed-tensors"
    assert staged.info[Precision.W4].calibration["calibration"]["tokens_sha256"] == calib.tokens_sha256
    rescaled = 0
    for i in range(model.cfg.num_layers):
        w4 = staged.tensors(i, Precision.W4)
        fp16 = model.arena.layers[i].tensors
        rescaled += not torch.allclose(w4["input_norm"], fp16["input_norm"])
        dense = dequantize_variant(w4, Precision.W4, model.cfg)
        assert v_row_scale_drift(fp16, dense, model.cfg) < 0.05
        # the AWQ-rescaled norm and projections together still compute the FP16 layer's function
        x = torch.randn(8, model.cfg.hidden_size, generator=torch.Generator().manual_seed(i))
        ref = torch.nn.functional.linear(x * fp16["input_norm"], fp16["qkv"])
        got = torch.nn.functional.linear(x * w4["input_norm"], dense["qkv"])
        assert float((got - ref).norm() / ref.norm()) < 0.2
    assert rescaled > 0  # AWQ moved scale into the norms
    assert staged.metadata()["w4_v_row_scale_drift_max"] < 0.05
