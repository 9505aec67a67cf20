"""Pre-quantized W4 checkpoint loaders: AWQ GEMM and compressed-tensors pack-quantized.

Each test writes a tiny checkpoint itself, from known integer codes, zero points and scales, packing the tensors with
code written here from each format's definition; the loader's output is then dequantized through the engine's
reference and compared with a dequantization computed here directly from the known codes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import morphserve.quant  # noqa: F401
from morphserve.memory.weight_arena import Precision
from morphserve.model.llama import LlamaModel
from morphserve.model.weight_source import HFCheckpointSource
from morphserve.quant.packing import QuantFormatError
from morphserve.quant.variants import VariantBuilder, dequantize_variant, open_w4_checkpoint, v_row_scale_drift

from conftest import make_tiny_checkpoint

G = 64  # the engine's group size for the tiny models (hidden 64)
MODULES = {  # HF module -> (N, K) for the tiny GQA model: hidden 64, 4 heads / 2 KV heads of 16, FFN 128
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128),
}
FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds output channel AWQ_ORDER[i] of its 8


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fp16"), "gqa")


@pytest.fixture(scope="module")
def model(fp16_dir) -> LlamaModel:
    return LlamaModel(HFCheckpointSource(fp16_dir), torch.float32, "cpu")


def _known(seed: int, group: int = G) -> dict[str, dict[str, torch.Tensor]]:
    """Known codes [N, K] (0..15), zeros [K//G, N] (0..15) and float16 scales [K//G, N] for every module of 3 layers,
    plus rescaled norms (as AWQ would leave them)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(3):
        p = f"model.layers.{i}."
        for m, (n, k) in MODULES.items():
            out[p + m] = {"codes": torch.randint(0, 16, (n, k), generator=g),
                          "zeros": torch.randint(0, 16, (k // group, n), generator=g),
                          "scales": (torch.rand(k // group, n, generator=g) * 0.02 + 0.001).half()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm] = {"weight": torch.rand(64, generator=g) + 0.5}
    return out


def _expected_dense(known: dict, i: int, group: int = G, symmetric_zero: int | None = None) -> dict[str, torch.Tensor]:
    """Dequantization straight from the known codes: W[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n]."""
    out = {}
    for proj, modules in FUSED.items():
        rows = []
        for m in modules:
            t = known[f"model.layers.{i}.{m}"]
            n, k = t["codes"].shape
            w = torch.empty(n, k)
            kk = torch.arange(k)
            z = t["zeros"].float() if symmetric_zero is None else torch.full_like(t["scales"].float(), symmetric_zero)
            w[:] = (t["codes"].float() - z[kk // group].t()) * t["scales"].float()[kk // group].t()
            rows.append(w)
        out[proj] = torch.cat(rows)
    return out


def _base_tensors(fp16_dir: Path, known: dict) -> dict[str, torch.Tensor]:
    fp16 = load_file(str(fp16_dir / "model.safetensors"))
    out = {k: v for k, v in fp16.items() if not k.startswith("model.layers.")}
    for name, t in known.items():
        if "weight" in t:
            out[name + ".weight"] = t["weight"]
    return out


def _write(dst: Path, fp16_dir: Path, tensors: dict[str, torch.Tensor], qc: dict) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((fp16_dir / "config.json").read_text())
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


# ---- AWQ GEMM ---------------------------------------------------------------------------------------------------
def _awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM packing of unsigned codes [R, N] into int32 [R, N // 8] (nibble i <- channel 8c + AWQ_ORDER[i])."""
    a = intweight.numpy().astype(np.uint32)
    r, n = a.shape
    out = np.zeros((r, n // 8), dtype=np.uint32)
    for c in range(n // 8):
        for i in range(8):
            out[:, c] |= a[:, 8 * c + AWQ_ORDER[i]] << np.uint32(4 * i)
    return torch.from_numpy(out.view(np.int32))


def _awq_tensors(fp16_dir: Path, known: dict) -> dict[str, torch.Tensor]:
    out = _base_tensors(fp16_dir, known)
    for name, t in known.items():
        if "codes" in t:
            out[name + ".qweight"] = _awq_pack(t["codes"].t().contiguous())  # [K, N // 8]
            out[name + ".qzeros"] = _awq_pack(t["zeros"])  # [K // G, N // 8]
            out[name + ".scales"] = t["scales"]  # [K // G, N]
    return out


AWQ_QC = {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm"}


def test_awq_gemm_loader_matches_independent_dequantization(tmp_path, fp16_dir, model):
    known = _known(0)
    ckpt = open_w4_checkpoint(_write(tmp_path / "awq", fp16_dir, _awq_tensors(fp16_dir, known), AWQ_QC))
    assert ckpt.method == "awq-gemm" and ckpt.group_size == G
    builder = VariantBuilder(model, ckpt)
    assert builder.info[Precision.W4].method == "awq-gemm"
    for i in range(3):
        variant = builder.layer(i, Precision.W4)
        dense = dequantize_variant(variant, Precision.W4, model.cfg)
        want = _expected_dense(known, i)
        for proj in FUSED:
            assert torch.equal(dense[proj], want[proj]), (i, proj)
        # the variant carries the checkpoint's (rescaled) norms, not the served model's
        assert torch.equal(variant["input_norm"], known[f"model.layers.{i}.input_layernorm"]["weight"])
        assert torch.equal(variant["post_norm"], known[f"model.layers.{i}.post_attention_layernorm"]["weight"])
        assert not torch.equal(variant["input_norm"], model.arena.layers[i]["input_norm"])


def test_awq_gemm_packing_is_not_natural_order():
    """The un-interleave matters: a checkpoint read in natural nibble order gives other weights."""
    from morphserve.quant.awq_gemm import unpack_awq_gemm

    codes = torch.arange(16).remainder(16).view(2, 8)  # channel j has code j (row 0) / 8 + j (row 1)
    packed = _awq_pack(codes)
    assert torch.equal(unpack_awq_gemm(packed).long(), codes)
    natural = torch.stack([(packed >> (4 * j)) & 0xF for j in range(8)], dim=-1).view(2, 8)
    assert not torch.equal(natural, codes)


@pytest.mark.parametrize("edit, match", [
    (lambda qc, t: qc.update(bits=8), "unsupported AWQ bit width 8"),
    (lambda qc, t: qc.update(version="gemv"), "AWQ version 'gemv' is not supported"),
    (lambda qc, t: qc.update(zero_point=False), "zero_point=False"),
    (lambda qc, t: t.pop("model.layers.1.mlp.down_proj.scales"), "model.layers.1.mlp.down_proj.scales"),
    (lambda qc, t: t.update({"model.layers.0.self_attn.k_proj.qweight":
                             t["model.layers.0.self_attn.k_proj.qweight"][:32]}),
     r"'model.layers.0.self_attn.k_proj.qweight' has shape \(32, 4\), expected \(64, 4\)"),
    (lambda qc, t: t.update({"model.layers.2.mlp.up_proj.qzeros":
                             t["model.layers.2.mlp.up_proj.qzeros"].to(torch.int64)}),
     "'model.layers.2.mlp.up_proj.qzeros' has dtype torch.int64"),
    (lambda qc, t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 64)}) or
     [t.pop(f"model.layers.0.self_attn.o_proj.{s}") for s in ("qweight", "qzeros", "scales")],
     "model.layers.0.self_attn.o_proj is not quantized"),
])
def test_bad_awq_checkpoints_fail_naming_the_value(tmp_path, fp16_dir, model, edit, match):
    qc, tensors = dict(AWQ_QC), _awq_tensors(fp16_dir, _known(1))
    edit(qc, tensors)
    with pytest.raises(QuantFormatError, match=match):
        ckpt = open_w4_checkpoint(_write(tmp_path / "bad", fp16_dir, tensors, qc))
        builder = VariantBuilder(model, ckpt)
        for i in range(3):
            builder.layer(i, Precision.W4)


def test_awq_wrong_group_size_is_rejected(tmp_path, fp16_dir, model):
    known = _known(2, group=32)
    ckpt = open_w4_checkpoint(_write(tmp_path / "g32", fp16_dir, _awq_tensors(fp16_dir, known),
                                     {**AWQ_QC, "group_size": 32}))
    with pytest.raises(QuantFormatError, match="W4 group size 32 but the engine's W4 layout .* uses group size 64"):
        VariantBuilder(model, ckpt)
    # tensors quantized with group 32 under a config claiming 64: a shape mismatch naming the tensor
    ckpt = open_w4_checkpoint(_write(tmp_path / "lie", fp16_dir, _awq_tensors(fp16_dir, known), AWQ_QC))
    with pytest.raises(QuantFormatError, match=r"q_proj.qzeros' has shape \(2, 8\), expected \(1, 8\)"):
        VariantBuilder(model, ckpt).layer(0, Precision.W4)


def test_checkpoint_of_another_model_is_rejected(tmp_path, fp16_dir, model):
    tensors = _awq_tensors(fp16_dir, _known(3))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 3.0
    ckpt = open_w4_checkpoint(_write(tmp_path / "other", fp16_dir, tensors, AWQ_QC))
    with pytest.raises(QuantFormatError, match="model.norm.weight differs"):
        VariantBuilder(model, ckpt)
    cfg_dir = _write(tmp_path / "wide", fp16_dir, tensors, AWQ_QC)
    cfg = json.loads((cfg_dir / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (cfg_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantFormatError, match="intermediate_size=256"):
        VariantBuilder(model, open_w4_checkpoint(cfg_dir))


def test_unknown_quant_method_is_rejected(tmp_path, fp16_dir):
    d = _write(tmp_path / "gptq", fp16_dir, _base_tensors(fp16_dir, {}), {"quant_method": "gptq", "bits": 4})
    with pytest.raises(QuantFormatError, match="quant_method 'gptq' is not supported"):
        open_w4_checkpoint(d)
    shutil.rmtree(d)
    d.mkdir()
    (d / "config.json").write_text((fp16_dir / "config.json").read_text())
    with pytest.raises(QuantFormatError, match="no quantization_config; this is not a pre-quantized checkpoint"):
        open_w4_checkpoint(d)


# ---- compressed-tensors pack-quantized --------------------------------------------------------------------------
def _ct_pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack unsigned 4-bit values (already offset by +8) along ``dim``: bits 4j.. of word w hold element 8w + j."""
    a = values.numpy().astype(np.uint32)
    if dim == 0:
        a = a.T
    rows, cols = a.shape
    words = -(-cols // 8)
    padded = np.zeros((rows, words * 8), dtype=np.uint32)
    padded[:, :cols] = a
    out = np.zeros((rows, words), dtype=np.uint32)
    for j in range(8):
        out |= padded[:, j::8] << np.uint32(4 * j)
    out = out.view(np.int32)
    return torch.from_numpy(out.T.copy() if dim == 0 else out)


def _ct_tensors(fp16_dir: Path, known: dict, symmetric: bool, scale_dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = _base_tensors(fp16_dir, known)
    for name, t in known.items():
        if "codes" in t:
            n, k = t["codes"].shape
            out[name + ".weight_packed"] = _ct_pack(t["codes"], dim=1)  # stored value: q_signed + 8 == code
            out[name + ".weight_scale"] = t["scales"].t().to(scale_dtype)  # [N, K // G]
            out[name + ".weight_shape"] = torch.tensor([n, k])
            if not symmetric:
                out[name + ".weight_zero_point"] = _ct_pack(t["zeros"].t(), dim=0)  # [ceil(N / 8), K // G]
    return out


def _ct_qc(symmetric: bool, group: int = G, **weights) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "format": "pack-quantized",
                                          "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                      "group_size": group, "symmetric": symmetric, "dynamic": False,
                                                      **weights}}}}


def test_our_ct_packing_is_compressed_tensors_own():
    """The writer above agrees with compressed-tensors' packer (signed values, +8 offset, dim 1 and dim 0)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (24, 64), generator=g)
    signed = (codes - 8).to(torch.int8)
    assert torch.equal(pack_to_int32(signed, 4), _ct_pack(codes, dim=1))
    assert torch.equal(pack_to_int32(signed, 4, packed_dim=0), _ct_pack(codes, dim=0))


@pytest.mark.parametrize("symmetric", [False, True])
def test_compressed_tensors_loader_matches_independent_dequantization(tmp_path, fp16_dir, model, symmetric):
    known = _known(6)
    tensors = _ct_tensors(fp16_dir, known, symmetric, scale_dtype=torch.bfloat16 if symmetric else torch.float32)
    ckpt = open_w4_checkpoint(_write(tmp_path / "ct", fp16_dir, tensors, _ct_qc(symmetric)))
    assert ckpt.method == "compressed-tensors"
    builder = VariantBuilder(model, ckpt)
    for i in range(3):
        variant = builder.layer(i, Precision.W4)
        if symmetric:  # no zero point stored: the engine's zero is the +8 offset
            assert bool((variant["qkv.zeros"] == 8).all())
            for t in known.values():  # the scales the checkpoint actually holds
                if "scales" in t:
                    t["scales"] = t["scales"].to(torch.bfloat16)
        dense = dequantize_variant(variant, Precision.W4, model.cfg)
        want = _expected_dense(known, i, symmetric_zero=8 if symmetric else None)
        for proj in FUSED:
            assert torch.equal(dense[proj], want[proj]), (i, proj)
        assert torch.equal(variant["post_norm"], known[f"model.layers.{i}.post_attention_layernorm"]["weight"])


@pytest.mark.parametrize("edit, match", [
    (lambda qc, t: qc["config_groups"]["group_0"]["weights"].update(num_bits=8), "unsupported bit width num_bits=8"),
    (lambda qc, t: qc["config_groups"]["group_0"]["weights"].update(strategy="channel"), "strategy 'channel'"),
    (lambda qc, t: qc["config_groups"]["group_0"].update(format="naive-quantized"), "format 'naive-quantized'"),
    (lambda qc, t: qc["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "quantizes activations"),
    (lambda qc, t: qc.update(quantization_status="frozen"), "quantization_status 'frozen'"),
    (lambda qc, t: t.pop("model.layers.2.self_attn.v_proj.weight_zero_point"),
     "no tensor 'model.layers.2.self_attn.v_proj.weight_zero_point'"),
    (lambda qc, t: t.update({"model.layers.1.mlp.gate_proj.weight_shape": torch.tensor([128, 32])}),
     r"'model.layers.1.mlp.gate_proj.weight_shape' is \[128, 32\], expected \[128, 64\]"),
    (lambda qc, t: t.update({"model.layers.0.mlp.down_proj.weight_scale":
                             t["model.layers.0.mlp.down_proj.weight_scale"][:, :1]}),
     r"'model.layers.0.mlp.down_proj.weight_scale' has shape \(64, 1\), expected \(64, 2\)"),
])
def test_bad_compressed_tensors_checkpoints_fail_naming_the_value(tmp_path, fp16_dir, model, edit, match):
    qc, tensors = _ct_qc(False), _ct_tensors(fp16_dir, _known(7), symmetric=False)
    edit(qc, tensors)
    with pytest.raises(QuantFormatError, match=match):
        builder = VariantBuilder(model, open_w4_checkpoint(_write(tmp_path / "bad", fp16_dir, tensors, qc)))
        for i in range(3):
            builder.layer(i, Precision.W4)


def test_v_row_scale_drift_detects_a_v_to_o_rescale(model):
    """An AWQ v_proj -> o_proj scale changes what the V cache stores; an input-side (norm -> qkv) scale does not."""
    cfg = model.cfg
    fp16 = {k: v.clone() for k, v in model.arena.layers[0].tensors.items()}
    s = torch.rand(cfg.hidden_size, generator=torch.Generator().manual_seed(8)) + 0.5
    input_side = dict(fp16, qkv=fp16["qkv"] * s, input_norm=fp16["input_norm"] / s)
    assert v_row_scale_drift(fp16, input_side, cfg) < 1e-6
    lo = cfg.q_size + cfg.kv_size
    v_scale = torch.ones(fp16["qkv"].shape[0], 1)
    v_scale[lo:] = 1 / (torch.rand(cfg.kv_size, 1, generator=torch.Generator().manual_seed(9)) * 2 + 1.5)
    assert v_row_scale_drift(fp16, dict(fp16, qkv=fp16["qkv"] * v_scale), cfg) > 0.3
