"""Triton RMSNorm (+ residual), RoPE, SiLU-and-mul and GEMV against the pure-PyTorch references.

Runs compiled on CUDA, or under the Triton interpreter on CPU (shapes kept tiny).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    from morphserve.kernels.triton_support import enable_interpreter

    enable_interpreter()

from morphserve.kernels import reference as ref  # noqa: E402
from morphserve.kernels.activation import silu_and_mul  # noqa: E402
from morphserve.kernels import gemv as G  # noqa: E402
from morphserve.kernels.gemv import CANDIDATES, GemvConfig, enabled, gemv, linear_fp16, matmul  # noqa: E402
from morphserve.kernels.norm import add_rms_norm, rms_norm  # noqa: E402
from morphserve.kernels.rotary import rotary  # noqa: E402
from morphserve.memory.weight_arena import LayerWeights, Precision  # noqa: E402
from morphserve.model.linear import linear  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEV).to(dtype)


def _ulps(a, b, dtype):
    """Largest difference in units of the dtype's epsilon, relative to each element's magnitude (rows whose
    elements are computed independently, with no cancellation)."""
    a, b = a.float(), b.float()
    return ((a - b).abs() / (b.abs() + 1e-3)).max().item() / torch.finfo(dtype).eps


def _scaled_err(a, b, dtype):
    """Largest difference in units of the dtype's epsilon relative to the largest magnitude: for sums of products
    (RoPE's ``x*cos + rot*sin``), where the GPU may fuse a product into the add (one rounding fewer than PyTorch)
    and a near-cancelling sum has no meaningful relative error."""
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / (b.abs().max().item() * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_fused_residual(dtype):
    x, res, w = _rand(5, 96, dtype=dtype), _rand(5, 96, dtype=dtype), _rand(96, dtype=dtype)
    assert _ulps(rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype) <= 4
    r = res.clone()
    h, r_out = add_rms_norm(x, r, w, 1e-5)
    h_ref, r_ref = ref.add_rms_norm(x, res, w, 1e-5)
    assert r_out.data_ptr() == r.data_ptr() and torch.equal(r, r_ref)  # residual updated in place, exactly
    assert _ulps(h, h_ref, dtype) <= 4
    # non-contiguous rows (a strided view) are read through their stride
    wide = _rand(5, 192, dtype=dtype)
    assert _ulps(rms_norm(wide[:, :96], w, 1e-5), ref.rms_norm(wide[:, :96], w, 1e-5), dtype) <= 4


@pytest.mark.parametrize("accumulated", [False, True])
def test_rms_norm_early_loads_give_the_same_bits(accumulated, monkeypatch):
    """norm.EARLY_LOADS (the weight and the residual loaded before the programmatic-launch wait) changes only when
    they are loaded: the same bits for the norm, the residual add and accumulated input (zeroed afterwards), with
    and without a residual."""
    from morphserve.kernels import norm
    from morphserve.kernels.split_accum import Accumulated

    dtype = torch.float16
    w, res = _rand(96, dtype=dtype), _rand(3, 96, dtype=dtype)
    acc = torch.randn(2, 3, 96, device=DEV)
    out = {}
    for early in (False, True):
        monkeypatch.setattr(norm, "EARLY_LOADS", early)
        a = acc.clone()
        x = Accumulated(a, dtype) if accumulated else (acc[0] + acc[1]).to(dtype)
        r = res.clone()
        h, _ = add_rms_norm(x, r, w, 1e-5)
        x2 = Accumulated(acc.clone(), dtype) if accumulated else (acc[0] + acc[1]).to(dtype)
        out[early] = (h, r, rms_norm(x2, w, 1e-5))
        if accumulated:
            assert torch.count_nonzero(a).item() == 0 and torch.count_nonzero(x2.acc).item() == 0
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype):
    x = _rand(6, 3, 64, dtype=dtype)
    pos = torch.tensor([0, 5, 7, 2, 31, 9], device=DEV)
    cos, sin = _rand(32, 64, dtype=dtype), _rand(32, 64, dtype=dtype)
    assert _scaled_err(rotary(x, pos, cos, sin), ref.rotary(x, cos[pos], sin[pos]), dtype) <= 2
    with pytest.raises(ValueError, match="positions"):
        rotary(x, pos[:2], cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gu = _rand(3, 2 * 80, dtype=dtype)
    # Triton's exp is not PyTorch's: 2.3 float32 ulps measured on an H200 (2026-11-22)
    assert _ulps(silu_and_mul(gu), ref.silu_and_mul(gu), dtype) <= 4
    with pytest.raises(ValueError, match=r"\[T, 2\*I\]"):
        silu_and_mul(_rand(3, 5, dtype=dtype))


@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("k", [256, 200])  # even and ragged K
@pytest.mark.parametrize("prefetch", [True, False])  # M = 1: first weight chunk loaded before the PDL wait, or not
def test_gemv_matches_f_linear(m, k, prefetch, monkeypatch):
    monkeypatch.setattr(G, "PREFETCH_FIRST_CHUNK", prefetch)
    dtype = torch.float16
    x, w = _rand(m, k, dtype=dtype), _rand(48, k, dtype=dtype)
    want = x.float() @ w.float().T
    bm = 1 if m == 1 else 16
    for cfg in [None, GemvConfig(bm, 16, 64, 4, 1), GemvConfig(bm, 16, 64, 4, 1, split_k=2),
                GemvConfig(bm, 16, 32, 4, 1, split_k=8)]:
        got = gemv(x, w, cfg)
        err = (got.float() - want).abs().max().item()
        assert err <= 2e-3 * want.abs().max().item() + 1e-2, (cfg, err)


@pytest.mark.parametrize("k,split_k,block_k,splits", [(200, 2, 32, 2), (192, 4, 32, 4), (192, 4, 64, 3)])
def test_accumulated_split_k_sums_are_consumed_bit_for_bit(k, split_k, block_k, splits, monkeypatch):
    """A batch-1 split-K product asked to accumulate adds its partial sums atomically into zeroed float32 buffers,
    one per pair of splits (split_accum.Accumulated; an odd split count leaves the last one alone).  rms_norm,
    add_rms_norm, silu_and_mul and finish() (also widening to float32, as for logits) read them with the bits of the
    reduce path, and each leaves the buffers zeroed for the next product.  Other products (M > 1, one split,
    ``out`` given, the switch off) return plain tensors."""
    from morphserve.kernels import split_accum as A

    dtype = torch.float16
    monkeypatch.setattr(A, "_BUFFERS", {})
    x, w, nw = _rand(1, k, dtype=dtype), _rand(64, k, dtype=dtype), _rand(64, dtype=dtype)
    cfg = GemvConfig(1, 16, block_k, 4, 1, split_k=split_k)
    want = gemv(x, w, cfg)  # partial sums + the reduce kernel
    pairs = (splits + 1) // 2

    def accumulated():
        got = gemv(x, w, cfg, accumulate=True)
        assert isinstance(got, A.Accumulated) and got.shape == (1, 64) and got.dtype == dtype
        assert got.acc.shape == (pairs, 1, 64) and got.acc.data_ptr() == A.accumulator(DEV, pairs, 1, 64).data_ptr()
        return got

    def zeroed(got):
        return torch.count_nonzero(got.acc).item() == 0

    got = accumulated()
    assert torch.equal(rms_norm(got, nw, 1e-5), rms_norm(want, nw, 1e-5)) and zeroed(got)
    res_a = _rand(1, 64, dtype=dtype)
    res_b = res_a.clone()
    got = accumulated()
    h_a, _ = add_rms_norm(got, res_a, nw, 1e-5)
    h_b, _ = add_rms_norm(want, res_b, nw, 1e-5)
    assert torch.equal(h_a, h_b) and torch.equal(res_a, res_b) and zeroed(got)
    got = accumulated()
    assert torch.equal(silu_and_mul(got), silu_and_mul(want)) and zeroed(got)
    got = accumulated()
    assert torch.equal(A.finish(got), want) and zeroed(got)
    got = accumulated()  # the LM head's float32 logits: rounded to float16, then widened, in one kernel
    logits = A.finish(got, dtype=torch.float32)
    assert logits.dtype == torch.float32 and torch.equal(logits, want.float()) and zeroed(got)
    # a product whose consumer never ran is dropped by reset(); the next one is exact again
    accumulated()
    A.reset()
    got = accumulated()
    assert torch.equal(A.finish(got), want)
    for xx, c, kw in [(_rand(3, k, dtype=dtype), GemvConfig(16, 16, 32, 4, 1, split_k=2), {}),
                      (x, GemvConfig(1, 16, 32, 4, 1), {}), (x, cfg, {"out": torch.empty(1, 64, dtype=dtype,
                                                                                         device=DEV)})]:
        plain = gemv(xx, w, c, accumulate=True, **kw)
        assert isinstance(plain, torch.Tensor) and A.finish(plain) is plain
    assert torch.equal(A.finish(want, dtype=torch.float32), want.float())
    monkeypatch.setattr(G, "ACCUMULATE_SPLITK", False)
    assert torch.equal(gemv(x, w, cfg, accumulate=True), want)


def test_splitk_sums_are_added_in_pairs(monkeypatch):
    """Both split-K paths add the partial sums as (p0 + p1) + (p2 + p3), not left to right.  Four splits of 16
    columns with partial sums 2**25, 1, -2**25, 1: in float32, 2**25 + 1 rounds to 2**25, so pairs give 0 where left
    to right gives 1."""
    from morphserve.kernels import split_accum as A

    monkeypatch.setattr(A, "_BUFFERS", {})
    x = torch.zeros(1, 64, dtype=torch.float16, device=DEV)
    w = torch.zeros(1, 64, dtype=torch.float16, device=DEV)
    x[0, :16], w[0, :16] = 2.0 ** 11, 2.0 ** 10  # split 0: 16 * 2**21 = 2**25
    x[0, 32:48], w[0, 32:48] = 2.0 ** 11, -(2.0 ** 10)  # split 2: -2**25
    x[0, 16] = w[0, 16] = x[0, 48] = w[0, 48] = 1.0  # splits 1 and 3: 1 each
    cfg = GemvConfig(1, 16, 16, 4, 1, split_k=4)
    assert gemv(x, w, cfg).item() == 0.0
    assert A.finish(gemv(x, w, cfg, accumulate=True)).item() == 0.0
    assert (x.double() @ w.double().T).item() == 2.0  # the exact sum, for scale: both paths round the same way


@pytest.mark.parametrize("m", [1, 16])
def test_gemv_and_linear_write_into_out(m):
    """``out=`` (how a per-layer CUDA graph hands its output to the next layer's graph): the result lands in the
    given tensor, equal to the allocating call, through the Triton GEMV (with and without split-K) and through the
    dense fallback; a wrong ``out`` is refused with its shape, dtype and layout in the message."""
    dtype = torch.float16
    x, w = _rand(m, 64, dtype=dtype), _rand(48, 64, dtype=dtype)
    bm = 1 if m == 1 else 16
    for cfg in [GemvConfig(bm, 16, 32, 4, 1), GemvConfig(bm, 16, 32, 4, 1, split_k=2)]:
        out = torch.full((m, 48), float("nan"), dtype=dtype, device=DEV)
        got = gemv(x, w, cfg, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, gemv(x, w, cfg))
    lw = LayerWeights(0, Precision.FP16, {"o": w})
    for scope in (contextlib.nullcontext, enabled):  # dense fallback, then the Triton GEMV
        with scope():
            out = torch.full((m, 48), float("nan"), dtype=dtype, device=DEV)
            assert linear(x, lw, "o", out=out).data_ptr() == out.data_ptr()
            assert torch.equal(out, linear(x, lw, "o"))
            for bad, what in [(torch.empty(m, 47, dtype=dtype, device=DEV), r"\(%d, 47\)" % m),
                              (torch.empty(m, 48, device=DEV), "torch.float32"),
                              (torch.empty(m, 96, dtype=dtype, device=DEV)[:, ::2], "strided")]:
                with pytest.raises(ValueError, match=what):
                    linear(x, lw, "o", out=bad)
    with pytest.raises(ValueError, match="2-D x"):
        linear(x.view(1, m, 64), lw, "o", out=torch.empty(m, 48, dtype=dtype, device=DEV))


def test_gemv_candidates_are_valid_and_bad_configs_rejected():
    assert set(CANDIDATES) == set(G.TUNED_MS)
    assert all(c.block_m == 1 for c in CANDIDATES[1]) and all(c.block_m >= 16 for c in CANDIDATES[16])
    assert G.tuned_m(1) == 1 and G.tuned_m(3) == 4 and G.tuned_m(40) == 64 and G.tuned_m(65) is None
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(1, 12, 64, 4, 1)
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(1, 16, 64, 4, 1, split_k=3)
    with pytest.raises(ValueError, match=">= 16"):
        GemvConfig(16, 8, 64, 4, 1)
    x, w = _rand(2, 64, dtype=torch.float16), _rand(16, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="M == 1"):
        gemv(x, w, GemvConfig(1, 16, 64, 4, 1))
    with pytest.raises(ValueError, match="do not match"):
        gemv(x, w.float())


def test_tuning_table_routes_per_shape(monkeypatch, tmp_path):
    """A tuned shape follows its table entry (a config: Triton; null: cuBLAS) at any M up to the largest tuned
    M; an untuned shape follows MAX_M; tables round-trip through JSON."""
    monkeypatch.setattr(G, "_TABLE", {})
    dev = G._device_name(_rand(1, dtype=torch.float16))
    cfg = GemvConfig(1, 8, 64, 4, 1, split_k=2)
    G.set_tuned(dev, 32, 64, 1, cfg)
    G.set_tuned(dev, 32, 64, 4, None)
    path = tmp_path / "t.json"
    path.write_text(__import__("json").dumps({dev: G.tuning_rows(dev)}))
    monkeypatch.setattr(G, "_TABLE", {})
    G.load_tuning(path)
    w = _rand(32, 64, dtype=torch.float16)
    with enabled():
        assert G.use_triton(_rand(1, 64, dtype=torch.float16), w)
        assert not G.use_triton(_rand(3, 64, dtype=torch.float16), w)  # M=3 uses the M=4 entry: cuBLAS
        other = _rand(16, 64, dtype=torch.float16)  # untuned shape: MAX_M decides
        assert G.use_triton(_rand(G.MAX_M, 64, dtype=torch.float16), other)
        assert not G.use_triton(_rand(G.MAX_M + 1, 64, dtype=torch.float16), other)


def test_linear_routes_through_triton_only_inside_the_scope(monkeypatch):
    calls = []
    import morphserve.kernels.gemv as g

    real = g.gemv
    monkeypatch.setattr(g, "gemv", lambda x, w, config=None, out=None, accumulate=False: calls.append(x.shape[0])
                        or real(x, w, config, out, accumulate))
    w = _rand(32, 64, dtype=torch.float16)
    lw = LayerWeights(0, Precision.FP16, {"o": w})
    x = _rand(2, 64, dtype=torch.float16)
    out = linear(x, lw, "o")  # outside the scope: the reference F.linear
    assert calls == [] and torch.equal(out, F.linear(x, w))
    with enabled():
        got = linear(x, lw, "o")
        assert calls == [2]
        linear(_rand(g.MAX_M + 1, 64, dtype=torch.float16), lw, "o")  # above the threshold: F.linear
        matmul(x.float(), w.float())  # float32: F.linear
    assert calls == [2]
    assert (got.float() - F.linear(x, w).float()).abs().max() < 1e-2
    assert linear_fp16 is not None
