"""The engine's W4/W8 storage format, round-to-nearest quantizers, slot layouts and reference linear kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and linear kernels)
from morphserve.memory.weight_arena import ALIGN, LayerWeights, Precision, layout_for
from morphserve.model.config import ModelError, architecture
from morphserve.model.linear import linear
from morphserve.quant.layouts import projection_shapes, slot_fraction, w4_group_size
from morphserve.quant.packing import (QuantFormatError, W4Weight, check_w4, dequantize_w4, dequantize_w8, pack_w4,
                                      unpack_w4)
from morphserve.quant.rtn import quantize_w4_rtn, quantize_w8_rtn


def _pack_by_definition(codes: torch.Tensor, group: int) -> torch.Tensor:
    """Independent packer written from the spec: bits 4j..4j+3 of word [g R + r, n] hold the code of
    W[n, g G + j R + r], with R = G / 8 word rows per group."""
    n, k = codes.shape
    rows = group // 8
    out = torch.zeros(k // 8, n, dtype=torch.int32)
    for gi in range(k // group):
        for r in range(rows):
            for col in range(n):
                word = 0
                for j in range(8):
                    word |= int(codes[col, gi * group + j * rows + r]) << (4 * j)
                out[gi * rows + r, col] = word - (1 << 32) if word >= 1 << 31 else word  # two's complement int32
    return out


@pytest.mark.parametrize("group", [8, 16, 32])
def test_pack_w4_matches_the_spec_bit_for_bit(group):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 64), generator=g, dtype=torch.uint8)
    codes[0, :] = 15  # words with the sign bit set
    packed = pack_w4(codes, group)
    assert packed.dtype == torch.int32 and packed.shape == (8, 6)
    assert torch.equal(packed, _pack_by_definition(codes, group))
    assert torch.equal(unpack_w4(packed, group), codes)
    if group > 8:  # the order depends on the group size: another group size reads other codes
        assert not torch.equal(unpack_w4(packed, 8), codes)


def test_dequantize_w4_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    n, k, gs = 10, 64, 16
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(k // gs, n, generator=g) + 0.1
    zeros = torch.randint(0, 16, (k // gs, n), generator=g).float()
    want = torch.empty(n, k)
    for col in range(n):
        for kk in range(k):
            want[col, kk] = (codes[col, kk] - zeros[kk // gs, col]) * scales[kk // gs, col]
    got = dequantize_w4(pack_w4(codes, gs), scales, zeros, gs)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    # float16 scales: one rounding of the exact product, identical to computing in float16
    s16 = scales.half()
    got16 = dequantize_w4(pack_w4(codes, gs), s16, zeros.half(), gs)
    assert got16.dtype == torch.float16
    ref16 = (codes.half() - zeros.half().t().repeat_interleave(gs, 1)) * s16.t().repeat_interleave(gs, 1)
    assert torch.equal(got16, ref16)


@pytest.mark.parametrize("group_size", [64, 128])
def test_rtn_w4_error_is_at_most_half_a_step(group_size):
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    w[3, :group_size] = torch.rand(group_size) + 0.1  # an all-positive group: its range is widened to include 0
    q = quantize_w4_rtn(w, group_size).validate("w")
    codes = unpack_w4(q.qweight, group_size)
    assert int(codes.max()) <= 15
    assert q.scales.shape == (256 // group_size, 40) and q.zeros.shape == q.scales.shape
    step = q.scales.t().repeat_interleave(group_size, 1)
    err = (q.dequantize() - w).abs()
    assert bool((err <= 0.5 * step * (1 + 1e-5) + 1e-7).all())
    assert float(q.zeros[0, 3]) == 0.0  # lo = 0 for the all-positive group
    assert torch.equal(q.dequantize()[5:6], quantize_w4_rtn(w[5:6], group_size).dequantize())  # row-independent


def test_rtn_w8_is_symmetric_per_channel():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
    w[7] = 0.0  # an all-zero row keeps a positive scale and zero codes
    q = quantize_w8_rtn(w).validate("w")
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (16,)
    assert int(q.qweight.abs().max(dim=1).values[0]) == 127
    assert bool((q.scales > 0).all()) and int(q.qweight[7].abs().max()) == 0
    err = (dequantize_w8(q.qweight, q.scales) - w).abs()
    assert bool((err <= 0.5 * q.scales.unsqueeze(1) * (1 + 1e-5)).all())


def test_rtn_scales_are_stored_in_the_model_dtype():
    w = torch.randn(8, 128)
    q = quantize_w4_rtn(w, 64, dtype=torch.float16)
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    # the codes are nearest for the stored (rounded) scale
    assert float((q.dequantize().float() - w).abs().max()) <= 0.5 * float(q.scales.float().max()) * 1.01


def test_group_size_per_model():
    assert w4_group_size(architecture("smollm2-135m")) == 64  # hidden 576 = 4.5 x 128
    for name in ("llama2-7b", "llama3-8b", "codellama-34b"):
        assert w4_group_size(architecture(name)) == 128
    odd = architecture("smollm2-135m").replace(name="odd", hidden_size=96, num_heads=3, num_kv_heads=1,
                                               head_dim=32, intermediate_size=192)
    with pytest.raises(ModelError, match="no W4 group size"):
        w4_group_size(odd)


def test_llama2_7b_w4_uses_about_27_percent_of_the_fp16_slot():
    cfg = architecture("llama2-7b")
    w4 = layout_for(Precision.W4, cfg, torch.float16)
    w8 = layout_for(Precision.W8, cfg, torch.float16)
    fp16 = layout_for(Precision.FP16, cfg, torch.float16)
    # expected bytes from the spec: 4-bit codes + fp16 scale and zero per 128 weights + two fp16 norms
    weights = sum(n * k for n, k in projection_shapes(cfg).values())
    assert weights == 202_375_168
    assert w4.nbytes == pytest.approx(weights / 2 + weights / 128 * 4 + 2 * 4096 * 2, abs=ALIGN * len(w4.specs))
    out_channels = sum(n for n, _ in projection_shapes(cfg).values())  # one fp16 scale per output channel
    assert w8.nbytes == pytest.approx(weights + out_channels * 2 + 2 * 4096 * 2, abs=ALIGN * len(w8.specs))
    assert 0.26 < slot_fraction(Precision.W4, cfg, torch.float16) < 0.27
    assert 0.50 < slot_fraction(Precision.W8, cfg, torch.float16) < 0.501
    assert w4.nbytes < w8.nbytes < fp16.nbytes
    for layout in (w4, w8):
        assert [s.name for s in layout.specs][:2] == ["input_norm", "post_norm"]
        assert all(s.offset % ALIGN == 0 for s in layout.specs)
        ends = sorted((s.offset, s.offset + s.nbytes) for s in layout.specs)
        assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # no overlap
    spec = {s.name: s for s in w4.specs}
    assert spec["qkv.qweight"].shape == (4096 // 8, 3 * 4096) and spec["qkv.qweight"].dtype == torch.int32
    assert spec["down.scales"].shape == (11008 // 128, 4096) and spec["down.zeros"].dtype == torch.float16
    assert {s.name: s for s in w8.specs}["gate_up.qweight"].shape == (2 * 11008, 4096)


def _layer_weights(precision: Precision, tensors: dict[str, torch.Tensor]) -> LayerWeights:
    return LayerWeights(0, precision, tensors)


def test_registered_linear_kernels_compute_x_times_dequantized_weight():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 128, generator=g)
    x = torch.randn(5, 128, generator=g)
    q4, q8 = quantize_w4_rtn(w, 64), quantize_w8_rtn(w)
    y4 = linear(x, _layer_weights(Precision.W4, q4.tensors("o")), "o")
    y8 = linear(x, _layer_weights(Precision.W8, q8.tensors("o")), "o")
    assert torch.allclose(y4, F.linear(x, q4.dequantize()), atol=1e-5)
    assert torch.allclose(y8, F.linear(x, q8.dequantize()), atol=1e-5)
    assert not torch.allclose(y4, y8)


def test_bad_w4_tensors_raise_naming_the_tensor():
    q = quantize_w4_rtn(torch.randn(16, 128), 64)
    with pytest.raises(QuantFormatError, match=r"qkv\.scales has shape \(1, 16\)"):
        check_w4("qkv", q.qweight, q.scales[:1], q.zeros, 64)
    with pytest.raises(QuantFormatError, match="group size 48"):
        check_w4("qkv", q.qweight, q.scales, q.zeros, 48)
    with pytest.raises(QuantFormatError, match=r"qkv\.zeros must hold integers"):
        check_w4("qkv", q.qweight, q.scales, q.zeros + 0.5, 64)
    with pytest.raises(QuantFormatError, match=r"qkv\.qweight must be 2-D int32"):
        check_w4("qkv", q.qweight.float(), q.scales, q.zeros, 64)
    with pytest.raises(QuantFormatError, match=r"codes must lie in \[0, 15\], got \[16, 16\]"):
        pack_w4(torch.full((2, 8), 16), 8)
    with pytest.raises(QuantFormatError, match="cannot fuse"):
        W4Weight.concat_out([q, quantize_w4_rtn(torch.randn(16, 128), 128)])
