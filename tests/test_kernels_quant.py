"""W4A16 / W8A16 Triton kernels against their pure-PyTorch references, and the automatic W8/W4 linear dispatch.

Compiled on CUDA; on CPU the kernels run under the Triton interpreter with tiny shapes (the interpreter executes
every program instance with NumPy).  Weights come from the round-to-nearest quantizers in the engine layout.
"""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    from morphserve.kernels.triton_support import enable_interpreter

    enable_interpreter()
    # kernels decorated before the interpreter was enabled would be compiled-mode functions: decorate them again
    for _mod in ("morphserve.kernels.w4a16", "morphserve.kernels.w8a16"):
        if _mod in sys.modules:
            importlib.reload(sys.modules[_mod])

import morphserve.quant  # noqa: E402,F401  (registers the W8/W4 layouts and the dispatch)
from morphserve.kernels.w4a16 import (GemmConfig, GemvConfig, splitk_workspace, w4a16_dequant_mm,  # noqa: E402
                                      w4a16_dequantize_t, w4a16_gemm, w4a16_gemv, w4a16_matmul_ref)
from morphserve.kernels.w8a16 import (w8a16_dequant_mm, w8a16_dequantize, w8a16_gemm, w8a16_gemv,  # noqa: E402
                                      w8a16_matmul_ref)
from morphserve.memory.weight_arena import LayerWeights, Precision  # noqa: E402
from morphserve.model.linear import linear  # noqa: E402
from morphserve.quant import dispatch  # noqa: E402
from morphserve.quant.packing import dequantize_w4, dequantize_w8  # noqa: E402
from morphserve.quant.rtn import quantize_w4_rtn, quantize_w8_rtn  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"
DTYPES = [torch.float16, torch.bfloat16] if GPU else [torch.float32, torch.float16]
# Relative Frobenius error against the float64 product with the same dequantized weight: output rounding plus
# float32 accumulation (bfloat16 keeps 8 significant bits).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
gpu_only = pytest.mark.skipif(not GPU, reason="needs CUDA")


def _w4(n, k, g, dtype, seed=0):
    torch.manual_seed(seed)
    return quantize_w4_rtn(torch.randn(n, k, device=DEV), g, dtype)


def _w8(n, k, dtype, seed=0):
    torch.manual_seed(seed)
    return quantize_w8_rtn(torch.randn(n, k, device=DEV), dtype)


def _x(m, k, dtype, seed=1):
    torch.manual_seed(seed)
    return torch.randn(m, k, device=DEV).to(dtype)


def _err(y, ref):
    assert y.shape == ref.shape and torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


def _ref64(x, w):
    """The exact product with the dequantized weight, in float64 (on the CPU for portability)."""
    return (x.double().cpu() @ w.double().cpu().t()).to(x.device)


# ---- W4 ---------------------------------------------------------------------------------------------------------
# (M, N, K, G): M covers decode, odd M and a partial second tile; N is an odd multiple of 16; both group sizes.
W4_CASES = [(1, 48, 256, 128), (3, 80, 128, 64), (16, 48, 128, 64), (33, 80, 256, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,g", W4_CASES)
def test_w4_gemm_matches_reference(m, n, k, g, dtype):
    q, x = _w4(n, k, g, dtype), _x(m, k, dtype)
    ref = _ref64(x, q.dequantize())
    for cfg in (GemmConfig(16, 32, 4, 2), GemmConfig(32, 16, 4, 2, split_k=2)):
        y = w4a16_gemm(x, q.qweight, q.scales, q.zeros, g, cfg)
        assert y.dtype == dtype and _err(y, ref) < TOL[dtype], cfg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,g", [(1, 48, 256, 128), (33, 80, 512, 128), (5, 64, 512, 256)])
def test_w4_gemm_t_matches_reference(m, n, k, g, dtype):
    """The weight-stationary kernel: partial tiles in both M and N, split-K with an uneven last split, G = 256."""
    q, x = _w4(n, k, g, dtype), _x(m, k, dtype)
    ref = _ref64(x, q.dequantize())
    for cfg in (GemmConfig(16, 32, 4, 2, weight_a=True), GemmConfig(32, 64, 4, 2, split_k=3, weight_a=True)):
        y = w4a16_gemm(x, q.qweight, q.scales, q.zeros, g, cfg)
        assert y.dtype == dtype and _err(y, ref) < TOL[dtype], cfg
    with pytest.raises(ValueError, match="group size >= 128 .*got 64"):
        w4a16_gemm(x[:, :128], *_w4(n, 128, 64, dtype).tensors("p").values(), 64,
                   GemmConfig(16, 32, 4, 2, weight_a=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,g", [c for c in W4_CASES if c[0] <= 3])
def test_w4_gemv_matches_reference(m, n, k, g, dtype):
    q, x = _w4(n, k, g, dtype), _x(m, k, dtype)
    ref = _ref64(x, q.dequantize())
    for cfg in (GemvConfig(32, 1), GemvConfig(16, 1, split_k=2), GemvConfig(32, 1, split_k=2, stages=3),
                GemvConfig(16, 1, stages=2, rows_step=4), GemvConfig(64, 2, split_k=3, stages=1, rows_step=16),
                GemvConfig(32, 1, split_k=2, stages=2, rows_step=8, late=True),
                GemvConfig(64, 2, split_k=3, stages=1, rows_step=16, late=True)):
        y = w4a16_gemv(x, q.qweight, q.scales, q.zeros, g, cfg)
        assert y.dtype == dtype and _err(y, ref) < TOL[dtype], cfg


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4_dequant_is_bit_exact_and_dequant_mm_chunks(dtype):
    n, k, g = 80, 128, 64
    q, x = _w4(n, k, g, dtype), _x(5, k, dtype)
    w = dequantize_w4(q.qweight, q.scales, q.zeros, g)
    out = torch.full((k, 48), float("nan"), dtype=dtype, device=DEV)
    assert torch.equal(w4a16_dequantize_t(q.qweight, q.scales, q.zeros, g, out, n_start=16), w[16:64].t())
    ref = F.linear(x, w)  # what dequantize + cuBLAS must reproduce (same weight, same GEMM)
    whole = w4a16_dequant_mm(x, q.qweight, q.scales, q.zeros, g, torch.empty(n * k, dtype=dtype, device=DEV))
    chunked = w4a16_dequant_mm(x, q.qweight, q.scales, q.zeros, g, torch.empty(64 * k, dtype=dtype, device=DEV))
    assert _err(whole, ref.double()) < TOL[dtype] and _err(chunked, ref.double()) < TOL[dtype]
    assert torch.allclose(w4a16_matmul_ref(x, q.qweight, q.scales, q.zeros, g), ref)


def test_w4_splitk_workspace_is_left_clean_and_results_repeat():
    dtype = DTYPES[-1]
    q, x = _w4(48, 256, 64, dtype), _x(3, 256, dtype)
    first = w4a16_gemm(x, q.qweight, q.scales, q.zeros, 64, GemmConfig(16, 16, 4, 2, split_k=4))
    again = w4a16_gemm(x, q.qweight, q.scales, q.zeros, 64, GemmConfig(16, 16, 4, 2, split_k=4))
    ws = splitk_workspace(x.device)
    assert not ws.partials.any() and not ws.counters.any()
    assert _err(again, first.double()) < TOL[dtype]


def test_w4_bad_inputs_raise_clear_errors():
    q = _w4(48, 128, 64, torch.float32)
    x = _x(2, 128, torch.float32)
    with pytest.raises(ValueError, match="K=256"):
        w4a16_gemm(_x(2, 256, torch.float32), q.qweight, q.scales, q.zeros, 64)
    with pytest.raises(ValueError, match="group size 96"):
        w4a16_gemm(x, q.qweight, q.scales, q.zeros, 96)
    with pytest.raises(ValueError, match="int32"):
        w4a16_gemv(x, q.qweight.to(torch.int64), q.scales, q.zeros, 64)
    with pytest.raises(ValueError, match="dtype torch.int32"):
        w4a16_gemm(x.to(torch.int32), q.qweight, q.scales, q.zeros, 64)
    with pytest.raises(ValueError, match="block_m=24"):
        w4a16_gemm(x, q.qweight, q.scales, q.zeros, 64, GemmConfig(24, 32, 4, 2))


# ---- W8 ---------------------------------------------------------------------------------------------------------
# K = 576 is SmolLM2's hidden size (not a multiple of 128).
W8_CASES = [(1, 48, 256), (3, 80, 576), (16, 48, 128), (33, 80, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", W8_CASES)
def test_w8_gemm_matches_reference(m, n, k, dtype):
    q, x = _w8(n, k, dtype), _x(m, k, dtype)
    ref = _ref64(x, q.dequantize())
    for cfg in (GemmConfig(16, 32, 4, 2, block_k=64), GemmConfig(32, 16, 4, 2, split_k=3, block_k=32)):
        y = w8a16_gemm(x, q.qweight, q.scales, cfg)
        assert y.dtype == dtype and _err(y, ref) < TOL[dtype], cfg
    for cfg in (GemmConfig(16, 32, 4, 2, block_k=64, weight_a=True),
                GemmConfig(32, 16, 4, 2, split_k=3, block_k=32, weight_a=True)):  # the weight-stationary kernel
        y = w8a16_gemm(x, q.qweight, q.scales, cfg)
        assert y.dtype == dtype and _err(y, ref) < TOL[dtype], cfg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [c for c in W8_CASES if c[0] <= 3])
def test_w8_gemv_matches_reference(m, n, k, dtype):
    q, x = _w8(n, k, dtype), _x(m, k, dtype)
    ref = _ref64(x, q.dequantize())
    for cfg in (GemvConfig(16, 1), GemvConfig(32, 2, split_k=2), GemvConfig(8, 2, split_k=2, block_c=16),
                GemvConfig(4, 1, block_c=128)):
        y = w8a16_gemv(x, q.qweight, q.scales, cfg)
        assert y.dtype == dtype and _err(y, ref) < TOL[dtype], cfg


@pytest.mark.parametrize("dtype", DTYPES)
def test_w8_dequant_is_bit_exact_and_dequant_mm_chunks(dtype):
    n, k = 144, 64
    q, x = _w8(n, k, dtype), _x(4, k, dtype)
    w = dequantize_w8(q.qweight, q.scales)
    out = torch.full((48, k), float("nan"), dtype=dtype, device=DEV)
    assert torch.equal(w8a16_dequantize(q.qweight, q.scales, out, n_start=96), w[96:144])
    ref = F.linear(x, w)
    chunked = w8a16_dequant_mm(x, q.qweight, q.scales, torch.empty(64 * k, dtype=dtype, device=DEV))
    assert _err(chunked, ref.double()) < TOL[dtype]
    assert torch.allclose(w8a16_matmul_ref(x, q.qweight, q.scales), ref)


def test_w8_bad_inputs_raise_clear_errors():
    q = _w8(48, 128, torch.float32)
    x = _x(2, 128, torch.float32)
    with pytest.raises(ValueError, match="K=64"):
        w8a16_gemm(_x(2, 64, torch.float32), q.qweight, q.scales)
    with pytest.raises(ValueError, match="block_k=96"):
        w8a16_gemm(x, q.qweight, q.scales, GemmConfig(16, 32, 4, 2, block_k=96))
    with pytest.raises(ValueError, match="scales must be"):
        w8a16_gemv(x, q.qweight, q.scales[:5])
    with pytest.raises(ValueError, match="int8"):
        w8a16_gemm(x, q.qweight.to(torch.int16), q.scales)


# ---- dispatch ---------------------------------------------------------------------------------------------------
def _layer(precision, tensors):
    return LayerWeights(0, precision, tensors)


def test_dispatch_buckets_and_candidates():
    assert [dispatch.bucket_of(m) for m in (1, 3, 16, 17, 1000, 10**6)] == [1, 4, 16, 32, 1024, 4096]
    with pytest.raises(ValueError, match="M=0"):
        dispatch.bucket_of(0)
    w4 = dispatch.random_weight(Precision.W4, 4096, 4096, 128, torch.float16, "cpu")
    w8 = dispatch.random_weight(Precision.W8, 4096, 4096, 0, torch.float16, "cpu")
    for w in (w4, w8):
        small = {p.kind for p in dispatch.candidates(w, 1, 132)}
        large = {p.kind for p in dispatch.candidates(w, 4096, 132)}
        assert small == {"gemv", "gemm", "dequant_mm"} and large == {"dequant_mm"}
        # split-K candidates never exceed the number of K steps
        assert all(p.config.split_k <= 4096 // 128 for p in dispatch.candidates(w, 16, 132) if p.config)
        # the weight-stationary GEMM from M = 2 up, always as GemmConfig(weight_a=True)
        mid = dispatch.candidates(w, 16, 132)
        assert {p.kind for p in mid} == {"gemm", "gemm_t", "dequant_mm"}
        assert all(p.config.weight_a == (p.kind == "gemm_t") for p in mid if p.config)
    w4_g64 = dispatch.random_weight(Precision.W4, 4096, 4096, 64, torch.float16, "cpu")
    assert "gemm_t" not in {p.kind for p in dispatch.candidates(w4_g64, 16, 132)}  # needs K >= 16 per product
    # W8 GEMVs: a split never has less than one step of block_c words (4 inputs each) to do
    gemvs = [p.config for p in dispatch.candidates(w8, 1, 132) if p.kind == "gemv"]
    assert {c.block_c for c in gemvs} > {64} and all(c.split_k <= 4096 // (4 * c.block_c) for c in gemvs)
    # W4 GEMVs: the late-reduction kernel is among them, always pipelined
    late = [p.config for p in dispatch.candidates(w4, 1, 132) if p.kind == "gemv" and p.config.late]
    assert late and all(c.stages >= 1 for c in late)


@pytest.mark.parametrize("dtype", [torch.float32] + DTYPES)
def test_linear_dispatch_uses_the_quantized_weights(dtype):
    """``morphserve.model.linear.linear`` on hand-built W4 and W8 layers (the CPU path is the reference)."""
    n, k, g = 48, 128, 64
    q4, q8 = _w4(n, k, g, dtype), _w8(n, k, dtype)
    x = _x(3, k, dtype).view(1, 3, k)  # leading dimensions are kept
    for precision, q in ((Precision.W4, q4), (Precision.W8, q8)):
        lw = _layer(precision, q.tensors("o"))
        y = linear(x, lw, "o")
        assert y.shape == (1, 3, n) and y.dtype == dtype
        assert _err(y, _ref64(x.view(3, k), q.dequantize()).view(1, 3, n)) < TOL[dtype]
    with pytest.raises(ValueError, match="'qkv.qweight'"):
        linear(x, _layer(Precision.W4, q4.tensors("o")), "qkv")


def test_every_path_kind_writes_into_out():
    """``out=`` through each kind of path (GEMV, GEMM, weight-stationary GEMM, dequantize + matmul) and through the
    registered linear: the result is written into the given tensor and equals the allocating call's."""
    n, k, g, m, dtype = 48, 256, 128, 2, DTYPES[-1]
    q4, q8 = _w4(n, k, g, dtype), _w8(n, k, dtype)
    x = _x(m, k, dtype)
    for w, q in ((dispatch.QuantWeight(Precision.W4, q4.qweight, q4.scales, q4.zeros, g), q4),
                 (dispatch.QuantWeight(Precision.W8, q8.qweight, q8.scales), q8)):
        first = {}
        for p in dispatch.candidates(w, 1, 132) + dispatch.candidates(w, 4, 132):
            first.setdefault(p.kind, p)
        assert set(first) == {"gemv", "gemm", "gemm_t", "dequant_mm"}
        for p in first.values():
            out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
            assert dispatch.run_path(p, x, w, out).data_ptr() == out.data_ptr()
            assert torch.equal(out, dispatch.run_path(p, x, w)), (w.precision, p.name)
        lw = _layer(w.precision, q.tensors("o"))
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
        assert linear(x, lw, "o", out=out).data_ptr() == out.data_ptr() and torch.equal(out, linear(x, lw, "o"))
        with pytest.raises(ValueError, match=r"\[2, 48\]"):
            linear(x, lw, "o", out=torch.empty(m, n + 1, dtype=dtype, device=DEV))


# ---- GPU only: real shapes and the tuner --------------------------------------------------------------------------
def _quant_weights(n, k, dtype):
    g = 128 if k % 128 == 0 else 64
    q4, q8 = _w4(n, k, g, dtype), _w8(n, k, dtype)
    return (dispatch.QuantWeight(Precision.W4, q4.qweight, q4.scales, q4.zeros, g), q4.dequantize()), \
        (dispatch.QuantWeight(Precision.W8, q8.qweight, q8.scales), q8.dequantize())


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m", [(4096, 4096, m) for m in (1, 7, 20, 64, 300)]
                         + [(4096, 11008, m) for m in (1, 16)] + [(576, 1536, m) for m in (1, 16, 64)])
def test_real_shapes_every_candidate_fp16(n, k, m):
    """Every candidate the tuner may pick for M's bucket (all tiles, split-K factors, dequantize + cuBLAS) on Llama
    and SmolLM2 (group size 64) shapes."""
    props = torch.cuda.get_device_properties(0)
    x = _x(m, k, torch.float16)
    for w, wd in _quant_weights(n, k, torch.float16):
        ref = _ref64(x, wd)
        for p in dispatch.candidates(w, dispatch.bucket_of(m), props.multi_processor_count):
            assert _err(dispatch.run_path(p, x, w), ref) < TOL[torch.float16], (w.precision, m, p.name)
            out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEV)
            dispatch.run_path(p, x, w, out)
            assert _err(out, ref) < TOL[torch.float16], (w.precision, m, p.name, "out=")


@gpu_only
@pytest.mark.gpu
def test_real_shape_bf16_paths():
    n, k = 4096, 4096
    for w, wd in _quant_weights(n, k, torch.bfloat16):
        for m in (1, 7, 64):
            x = _x(m, k, torch.bfloat16)
            ref = _ref64(x, wd)
            paths = dispatch.candidates(w, dispatch.bucket_of(m), 132)
            picked = {p.kind + str(getattr(p.config, "block_m", "")): p for p in paths}  # one per kind and tile M
            for p in picked.values():
                assert _err(dispatch.run_path(p, x, w), ref) < TOL[torch.bfloat16], (w.precision, m, p.name)


@gpu_only
@pytest.mark.gpu
def test_autotune_picks_the_fastest_correct_candidate_and_is_used():
    dispatch.clear_table()
    w = dispatch.random_weight(Precision.W4, 4096, 4096, 128, torch.float16, DEV)
    choice = dispatch.autotune(w, torch.float16, 16)
    assert choice.path == min(choice.candidates, key=choice.candidates.get) and choice.us > 0
    assert not choice.failed, choice.failed
    assert choice.fp16_cublas_us is not None and choice.fp16_cublas_us > 0
    assert dispatch.chosen_path(w, torch.float16, 9).name == choice.path  # bucket 16 covers M = 9
    rows = dispatch.chosen_table()
    assert len(rows) == 1 and rows[0]["bucket"] == 16 and rows[0]["n"] == 4096
    x = _x(9, 4096, torch.float16)
    assert _err(dispatch.quant_matmul(x, w), _ref64(x, w.dequantize())) < TOL[torch.float16]


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("prec,g", [(Precision.W4, 128), (Precision.W8, 0)])
def test_autotune_on_bytes_that_are_not_the_variant_yet(prec, g):
    """A layer graph at a swap's new precision is warmed up before the copy lands: the slot's bytes read as this
    layout give non-finite scales.  Tuning must still find a correct path (on a well-formed weight of the shape)."""
    dispatch.clear_table()
    w = dispatch.random_weight(prec, 1024, 2048, g, torch.float16, DEV)
    w.scales.fill_(float("nan"))
    choice = dispatch.autotune(w, torch.float16, 8)
    assert choice.path in choice.candidates and not choice.failed, choice.failed
    assert torch.isnan(w.scales).all()  # the layer's own tensors are left as they are


@gpu_only
@pytest.mark.gpu
def test_splitk_repeated_runs_are_exact():
    """Split-K runs with M < BLOCK_M, repeated: every run must match (a race in the reduction shows up as a rare
    tile that misses partial sums; see morphserve.kernels.w4a16.store_tile)."""
    for prec, n, k, g in ((Precision.W4, 6144, 4096, 128), (Precision.W8, 4096, 11008, 0)):
        w = dispatch.random_weight(prec, n, k, g, torch.float16, DEV)
        exact = w.dequantize().float()
        for m in (1, 3, 8):
            x = _x(m, k, torch.float16)
            ref = x.float() @ exact.t()
            paths = [p for p in dispatch.candidates(w, dispatch.bucket_of(m), 132) if p.config and p.config.split_k > 1]
            assert paths
            for p in paths:
                for _ in range(25):
                    assert _err(dispatch.run_path(p, x, w), ref.double()) < TOL[torch.float16], (prec, m, p.name)
