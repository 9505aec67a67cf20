"""W8A16 linear kernels (Triton): int8 weights with one scale per output channel, 16-bit activations.

Computes ``y = x @ W.T`` for a weight in the engine's W8 layout (:mod:`morphserve.quant.packing`): ``qweight`` int8
``[N, K]`` (row-major, like the FP16 weight), ``scales`` ``[N]`` in the model dtype, ``W[n, k] = q[n, k] * s[n]``.
``x`` is ``[M, K]`` in float16, bfloat16 or float32; ``y`` is ``[M, N]`` in ``x``'s dtype; float32 accumulation.
The per-channel scale is constant along K, so every path sums ``x_k q_k`` over all of K and scales once at the end.

* :func:`w8a16_gemv` (decode).  The int8 weight is read as int32 words (4 codes each, ``qweight.view(int32)``),
  XOR-ed once with ``0x80808080`` so each byte holds ``q + 128``; then each code costs one AND and one FMA: the bits
  ``word & (0xFF << 8j)`` read as a float32 are ``(q + 128) * 2**(8j - 149)`` exactly (the subnormal trick of
  :mod:`morphserve.kernels.w4a16`), multiplied with ``x * 2**(100 - 8j)``; the ``128 * sum_k x_k`` offset is removed
  at the end.  Each program accumulates a ``BLOCK_N x BLOCK_C`` tile of per-word sums and reduces along K once.
* :func:`w8a16_gemm` (mid M).  Tensor-core tiles.  For float16 the code becomes the *subnormal* float16
  ``(q + 128) * 2**-24`` by an add and a bit cast (exact); the offset is removed at the end with
  ``sum_k x_k (q_k + 128) = sum_k x_k q_k + 128 sum_k x_k``.  bfloat16/float32 convert the integer (exact).
* ``w8a16_gemm`` with ``GemmConfig(weight_a=True)``: the weight-stationary :func:`_w8_gemm_t_kernel` (the codes
  as the MMA's A operand, the batch as its N dimension; the fastest path at M = 32-128 on an H200).
* :func:`w8a16_dequant_mm` (large M).  A Triton kernel writes ``W`` (``[N, K]``) into a scratch buffer in chunks of
  output rows, bit-identical to the reference, then cuBLAS multiplies.

Split-K uses the self-cleaning workspace of :mod:`morphserve.kernels.w4a16` (same caveats: nondeterministic
float32 summation order, one stream per device).  :func:`w8a16_matmul_ref` is the pure-PyTorch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from morphserve.kernels.w4a16 import (_CHUNK_ALIGN, _SUPPORTED_DTYPES, GemmConfig, GemvConfig, _check_block,
                                      _dot_mode, gemm_tile, splitk_workspace, store_tile, store_tile_t)
from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.triton_support import interpreting, launch_options
from morphserve.model.linear import output_buffer
from morphserve.quant.packing import dequantize_w8

W8_WORD = 4  # int8 codes per int32 word in the GEMV kernel's view


# ---- reference ---------------------------------------------------------------------------------------------------
def w8a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` by dequantizing ``W`` (:func:`morphserve.quant.packing.dequantize_w8`) and ``F.linear``."""
    return F.linear(x, dequantize_w8(qweight, scales).to(x.dtype))


def _check_operands(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> tuple[int, int, int]:
    """Shape/dtype/device checks (no value scans: this runs on every call).  Returns ``(M, N, K)``."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use one of {_SUPPORTED_DTYPES}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.shape[1] != k:
        raise ValueError(f"x has K={k} input features but qweight is {tuple(qweight.shape)}")
    if tuple(scales.shape) != (n,):
        raise ValueError(f"scales must be [N] = ({n},), got {tuple(scales.shape)}")
    for t, what in ((qweight, "qweight"), (scales, "scales")):
        if t.device != x.device:
            raise ValueError(f"{what} is on {t.device} but x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous")
    if x.stride(1) != 1:
        raise ValueError(f"x must have unit stride along K, got strides {x.stride()}")
    return m, n, k


# ---- split-K GEMV (small M) ------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "steps_per_split", "split_k"])
def _w8_gemv_kernel(x_ptr, qw_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
                    M, N, K4, stride_xm, steps_per_split, split_k,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, FENCE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_c = tl.arange(0, BLOCK_C)
    c_lo = pid_k * steps_per_split * BLOCK_C  # a multiple of BLOCK_C the compiler can see (aligned loads)
    c_end = tl.minimum(c_lo + steps_per_split * BLOCK_C, K4)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)  # sum_k x_k (q_k + 128), times 2**-49
    xsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for step in range(0, steps_per_split):
        cols = c_lo + step * BLOCK_C + offs_c
        c_mask = cols < c_end
        w = tl.load(qw_ptr + offs_n[:, None] * K4 + cols[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0)
        w = w ^ -2139062144  # 0x80808080: every byte becomes the unsigned code q + 128
        for j in tl.static_range(4):
            if j == 3:
                w = w >> 24
            xj = tl.load(x_row + cols * 4 + j, mask=c_mask, other=0.0).to(tl.float32)  # x[4c + j]
            xsum += xj
            # The bits (w & (255 << 8j)) read as a float32 are (q + 128) * 2**(8j - 149) exactly (subnormal or
            # smallest normal); x is scaled by 2**(100 - 8j) so every product is x * (q + 128) * 2**-49.
            f = (w & (255 << (8 * j if j < 3 else 0))).to(tl.float32, bitcast=True)
            acc += f * (xj * (2.0 ** (100 - (8 * j if j < 3 else 0))))[None, :]
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out = (tl.sum(acc, axis=1) * (2.0 ** 49) - 128.0 * tl.sum(xsum, axis=0)) * s
    offs_m = m + tl.arange(0, 1)
    tile_id = m * tl.num_programs(0) + pid_n
    pdl_trigger(USE_PDL)
    store_tile(out[None, :], y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE)


def w8a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               cfg: GemvConfig = GemvConfig(32, 4), out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` with the split-K GEMV kernel (one program per row of ``x``, row block of W and K split).
    ``cfg.block_n`` rows of W per program; each step covers ``cfg.block_c`` int32 words (4 input features each)."""
    m, n, k = _check_operands(x, qweight, scales)
    _check_block("block_n", cfg.block_n, 1)
    _check_block("block_c", cfg.block_c, 1)
    if k % W8_WORD:
        raise ValueError(f"the W8 GEMV reads int32 words: K={k} must be a multiple of {W8_WORD}")
    block_c = cfg.block_c
    k4 = k // W8_WORD
    steps = triton.cdiv(k4, block_c)
    split = max(1, min(cfg.split_k, steps))
    steps_per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, steps_per_split)
    y = output_buffer(out, m, n, x)
    if m == 0:
        return y
    grid = (triton.cdiv(n, cfg.block_n), split, m)
    ws = splitk_workspace(x.device)  # passed even without split-K: the kernel's pointer types must not change
    if split > 1:
        ws.check(m, n, grid[0] * m)
    _w8_gemv_kernel[grid](x, qweight.view(torch.int32), scales, y, ws.partials, ws.counters, m, n, k4, x.stride(0),
                          steps_per_split, split, BLOCK_N=cfg.block_n, BLOCK_C=block_c, FENCE=not interpreting(),
                          num_warps=cfg.num_warps, num_stages=1, **launch_options(x.device))
    return y


# ---- tiled tensor-core GEMM (mid M) ---------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "steps_per_split", "split_k"])
def _w8_gemm_kernel(x_ptr, q_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
                    M, N, K, stride_xm, steps_per_split, split_k,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, FENCE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pid_m, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * steps_per_split * BLOCK_K  # a multiple of BLOCK_K the compiler can see (aligned loads)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for step in range(0, steps_per_split):
        ks = k_lo + step * BLOCK_K + offs_k
        k_mask = ks < K  # the last split may be short; K is a multiple of BLOCK_K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        q = tl.load(q_ptr + offs_n[None, :] * K + ks[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0)
        if MODE == 0:
            b = (q.to(tl.int16) + 128).to(tl.float16, bitcast=True)  # the subnormal (q + 128) * 2**-24, exact
            xsum += tl.sum(a.to(tl.float32), axis=1)
        else:
            b = q.to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if MODE == 0:
        out = (acc * 16777216.0 - 128.0 * xsum[:, None]) * s[None, :]
    else:
        out = acc * s[None, :]
    tile_id = pid_m * tl.num_programs(1) + pid_n
    pdl_trigger(USE_PDL)
    store_tile(out, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE)


def w8a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               cfg: GemmConfig = GemmConfig(16, 128, 4, 3, block_k=128),
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` with a tiled tensor-core kernel (``cfg.block_k`` input features per step, which must divide
    K; optional split-K): the activation-stationary :func:`_w8_gemm_kernel`, or with ``cfg.weight_a`` the
    weight-stationary :func:`_w8_gemm_t_kernel`."""
    m, n, k = _check_operands(x, qweight, scales)
    _check_block("block_m", cfg.block_m, 16)
    _check_block("block_n", cfg.block_n, 16)
    _check_block("block_k", cfg.block_k, 16)
    if k % cfg.block_k:
        raise ValueError(f"block_k={cfg.block_k} must divide K={k}")
    steps = k // cfg.block_k
    split = max(1, min(cfg.split_k, steps))
    steps_per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, steps_per_split)
    y = output_buffer(out, m, n, x)
    if m == 0:
        return y
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    ws = splitk_workspace(x.device)  # passed even without split-K: the kernel's pointer types must not change
    if split > 1:
        ws.check(m, n, grid[0] * grid[1])
    mode, precision = _dot_mode(x.dtype)
    kernel, extra = (_w8_gemm_t_kernel, {}) if cfg.weight_a else (_w8_gemm_kernel, {"MODE": mode})
    kernel[grid](x, qweight, scales, y, ws.partials, ws.counters, m, n, k, x.stride(0), steps_per_split, split,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=precision,
                 FENCE=not interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
                 **launch_options(x.device))
    return y


# ---- weight-stationary tensor-core GEMM (M from a few to a few hundred) ----------------------------------------------
@triton.jit(do_not_specialize=["M", "steps_per_split", "split_k"])
def _w8_gemm_t_kernel(x_ptr, q_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,
                      M, N, K, stride_xm, steps_per_split, split_k,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, FENCE: tl.constexpr, USE_PDL: tl.constexpr):
    """``y.T`` tile ``[BLOCK_N, BLOCK_M] = Q_tile @ x_tile.T``, scaled per output channel at the end: the int8
    codes, converted to the activation dtype (exact), are the MMA's A operand (registers on Hopper), the
    activations its B operand (shared memory), the batch its N dimension (see
    :func:`morphserve.kernels.w4a16._w4_gemm_t_kernel`)."""
    pdl_wait(USE_PDL)
    pid_m, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * steps_per_split * BLOCK_K  # a multiple of BLOCK_K the compiler can see (aligned loads)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, steps_per_split):
        ks = k_lo + step * BLOCK_K + offs_k
        k_mask = ks < K  # the last split may be short; K is a multiple of BLOCK_K
        q = tl.load(q_ptr + offs_n[:, None] * K + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(x_ptr + offs_m[None, :] * stride_xm + ks[:, None], mask=m_mask[None, :] & k_mask[:, None],
                    other=0.0)
        acc = tl.dot(q.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    pdl_trigger(USE_PDL)
    store_tile_t(acc * s[:, None], y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE)


# ---- dequantize + cuBLAS (large M) ----------------------------------------------------------------------------------
@triton.jit
def _w8_dequant_kernel(q_ptr, s_ptr, out_ptr, K, n_start, n_count, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_PDL: tl.constexpr):
    """``out[r, k] = q[n_start + r, k] * s[n_start + r]`` for ``r < n_count``, computed in float32 and rounded
    once (like the reference)."""
    pdl_wait(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_r[:, None] < n_count) & (offs_k[None, :] < K)
    rows = n_start + offs_r
    q = tl.load(q_ptr + rows[:, None] * K + offs_k[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=offs_r < n_count, other=0.0).to(tl.float32)
    pdl_trigger(USE_PDL)
    tl.store(out_ptr + offs_r[:, None] * K + offs_k[None, :], (q * s[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask)


def w8a16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, n_start: int = 0) -> torch.Tensor:
    """Write rows ``n_start : n_start + out.shape[0]`` of ``W`` (``[n_count, K]``) into ``out`` (contiguous, model
    dtype) and return it.  Bit-identical to :func:`morphserve.quant.packing.dequantize_w8`."""
    n, k = qweight.shape
    if out.dim() != 2 or out.shape[1] != k or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [n_count, K={k}] tensor, got {tuple(out.shape)}")
    n_count = out.shape[0]
    if n_start < 0 or n_start + n_count > n:
        raise ValueError(f"row chunk [{n_start}, {n_start + n_count}) is outside N={n}")
    block_n, block_k = 16, 256
    grid = (triton.cdiv(n_count, block_n), triton.cdiv(k, block_k))
    _w8_dequant_kernel[grid](qweight, scales, out, k, n_start, n_count, BLOCK_N=block_n, BLOCK_K=block_k,
                             num_warps=4, **launch_options(qweight.device))
    return out


def w8a16_dequant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     scratch: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` by dequantizing ``W`` into ``scratch`` (1-D, ``x``'s dtype) and multiplying with cuBLAS, in
    chunks of output rows when the whole ``[N, K]`` does not fit in ``scratch``."""
    m, n, k = _check_operands(x, qweight, scales)
    if scratch.dim() != 1 or scratch.dtype != x.dtype or scratch.device != x.device:
        raise ValueError(f"scratch must be a 1-D {x.dtype} tensor on {x.device}, got {scratch.dtype} "
                         f"{tuple(scratch.shape)} on {scratch.device}")
    chunk = min(n, scratch.numel() // k)
    if chunk < n:
        chunk = chunk // _CHUNK_ALIGN * _CHUNK_ALIGN
    if chunk == 0:
        raise ValueError(f"scratch of {scratch.numel()} elements holds fewer than {min(n, _CHUNK_ALIGN)} "
                         f"rows of K={k}")
    y = output_buffer(out, m, n, x)
    for n0 in range(0, n, chunk):
        nc = min(chunk, n - n0)
        w = w8a16_dequantize(qweight, scales, scratch[:nc * k].view(nc, k), n0)
        torch.mm(x, w.t(), out=y if nc == n else y[:, n0:n0 + nc])
    return y
