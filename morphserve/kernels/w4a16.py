"""W4A16 linear kernels (Triton): 4-bit weights, 16-bit activations, dequantization fused into the matmul.

Computes ``y = x @ W.T`` for a weight stored in the engine's W4 layout (:mod:`morphserve.quant.packing`):
``qweight`` int32 ``[K // 8, N]`` (code of ``W[n, g G + j R + r]`` in bits ``4j .. 4j+3`` of ``qweight[g R + r, n]``,
``R = G / 8``: position-major within each group),
``scales`` and ``zeros`` ``[K // G, N]`` in the model dtype, ``W[n, k] = (q - z) * s`` with ``G`` the group size.
``x`` is ``[M, K]`` in float16, bfloat16 or float32; ``y`` is ``[M, N]`` in ``x``'s dtype; every path accumulates in
float32.

Four paths, each the fastest somewhere in M (:mod:`morphserve.quant.dispatch` times them per shape and batch size):

* :func:`w4a16_gemv` (decode, M of 1 to a few).  One program computes ``BLOCK_N`` outputs of one row of ``x`` over
  a range of groups (split-K).  No tensor cores, and no conversion instruction: the bits ``word & (15 << 4i)``
  read as a float32 are exactly ``code * 2**(4i - 149)`` (a subnormal; IEEE FMAs on the GPU and NumPy keep
  subnormals exact), so each code costs one AND and one FMA with ``x`` pre-scaled by ``2**(100 - 4i)`` (codes 6
  and 7 are shifted down once per word).  Zero points and scales are applied once per group and column through
  ``sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k)``.
* :func:`w4a16_gemm` (M from a few to a few hundred).  Tiles of ``BLOCK_M x BLOCK_N`` outputs, one group of ``G``
  input features per step as eight tensor-core products, one per code position ``j`` (``B_j`` = nibble ``j`` of the
  word tile, the codes of ``k = g G + j R + r``, against the matching columns of ``x``, a contiguous slice): each
  ``B_j`` is an elementwise function of the words, so Triton unpacks it in the MMA operand layout instead of staging
  it through shared memory.  The raw codes are the B operand and the same per-group zero/scale epilogue applies.
  For float16 the codes become float16 *subnormals* by a bit cast (``code * 2**-24``, exact; tensor cores multiply
  subnormals exactly), so unpacking costs a shift and a mask per weight; the ``2**24`` is folded into the scale.
  bfloat16/float32 convert the integer code (exact).  Small M uses split-K to fill the GPU.
* ``w4a16_gemm`` with ``GemmConfig(weight_a=True)`` (M from 2 to a few hundred, group size >= 128): the
  weight-stationary :func:`_w4_gemm_t_kernel`, ``y.T = W x.T`` with the fully dequantized weight tile as the MMA's A
  operand (registers on Hopper) and the batch as its N dimension.
* :func:`w4a16_dequant_mm` (prefill, large M).  A Triton kernel writes ``W.T`` (``[K, N]``) into a scratch buffer in
  chunks of output columns, then cuBLAS multiplies.  Its dequantization is bit-identical to the reference.

Split-K (both fused kernels): the programs of one output tile add their float32 partial sums into a workspace with
atomics; a per-tile counter tells the last one, which reads the sum, writes ``y`` in the output dtype and zeroes the
workspace and counter again, so no memset is launched and the workspace's address never changes (CUDA graphs stay
valid).  The order of the float32 additions varies from run to run, so split-K results can differ in the last bits
between runs.  The workspace is shared per device: kernels that use it must not run concurrently on two streams.

:func:`w4a16_matmul_ref` is the pure-PyTorch reference (dequantize, then ``F.linear``): the CPU path and the ground
truth of the tests.  All kernels also run under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.triton_support import dot_precision, interpreting, launch_options
from morphserve.model.linear import output_buffer
from morphserve.quant.packing import W4_PACK, dequantize_w4

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CHUNK_ALIGN = 64  # output columns per dequantized chunk are a multiple of this (when chunked at all)


# ---- reference ---------------------------------------------------------------------------------------------------
def w4a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """``x @ W.T`` by dequantizing ``W`` (:func:`morphserve.quant.packing.dequantize_w4`) and ``F.linear``."""
    return F.linear(x, dequantize_w4(qweight, scales, zeros, group_size).to(x.dtype))


# ---- split-K workspace and the shared epilogue --------------------------------------------------------------------
class SplitKWorkspace:
    """Float32 partial sums ``[capacity]`` (indexed ``m * N + n``) and one int32 arrival counter per output tile,
    zero at rest.  Allocated once per device; kernels leave both zeroed when they finish."""

    DEFAULT_CAPACITY = 1 << 23  # partial sums (32 MiB)
    DEFAULT_MAX_TILES = 1 << 17

    def __init__(self, device: torch.device, capacity: int = DEFAULT_CAPACITY, max_tiles: int = DEFAULT_MAX_TILES):
        self.capacity = capacity
        self.max_tiles = max_tiles
        self.partials = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.counters = torch.zeros(max_tiles, dtype=torch.int32, device=device)

    def check(self, m: int, n: int, tiles: int) -> None:
        if m * n > self.capacity or tiles > self.max_tiles:
            raise ValueError(f"split-K output [{m}, {n}] with {tiles} tiles exceeds the workspace "
                             f"({self.capacity} partial sums, {self.max_tiles} tiles); use split_k=1")


_WORKSPACES: dict[torch.device, SplitKWorkspace] = {}


def splitk_workspace(device: torch.device) -> SplitKWorkspace:
    """The per-device split-K workspace (created on first use, 32 MiB + 512 KiB)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ws = _WORKSPACES.get(device)
    if ws is None:
        ws = _WORKSPACES[device] = SplitKWorkspace(device)
    return ws


@triton.jit
def store_tile(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE: tl.constexpr):
    """Write a float32 tile ``acc[BLOCK_M, BLOCK_N]`` to ``y`` (``[M, N]``, row-major), directly or, when
    ``split_k > 1`` (a run-time branch: one compiled kernel serves both), through the self-cleaning workspace.

    Ordering: every thread fences (``fence.acq_rel.gpu``) after its own atomic adds, then the block synchronizes,
    then one thread counts the arrival with an acquire-release atomic; the last block reads the sums from L2,
    stores ``y``, synchronizes, and only then zeroes the workspace (the read and the zeroing may run in different
    thread layouts).  ``FENCE`` is False only under the Triton interpreter, which runs programs one after another
    and has no inline PTX.

    History (H200, 2026-11-22): without the barrier before the zeroing, about 0.2% of split-K GEMM runs with
    ``M < BLOCK_M`` returned tiles that missed partial sums (6 of 2480 runs in a stress test; the autotuner
    excluded such candidates in 19 of 220 tunings); the split-K GEMV, whose load and zeroing layouts coincide,
    never failed.  The barrier is in the generated PTX; the fixed kernel had not been re-run on a GPU as of
    2026-11-22 (tests/test_kernels_quant.py::test_splitk_repeated_runs_are_exact is the check)."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    _store_split(acc, y_ptr, ws_ptr, idx, mask, cnt_ptr, tile_id, split_k, FENCE)


@triton.jit
def store_tile_t(acc_t, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE: tl.constexpr):
    """:func:`store_tile` for a transposed tile ``acc_t[BLOCK_N, BLOCK_M]`` (the weight-stationary kernels), stored
    from its own register layout (no transpose through shared memory)."""
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    idx = offs_m[None, :] * N + offs_n[:, None]
    _store_split(acc_t, y_ptr, ws_ptr, idx, mask, cnt_ptr, tile_id, split_k, FENCE)


@triton.jit
def _store_split(acc, y_ptr, ws_ptr, idx, mask, cnt_ptr, tile_id, split_k, FENCE: tl.constexpr):
    """The store protocol of :func:`store_tile`; ``idx`` (int32) indexes both ``y`` and the workspace (pointers are
    formed where they are used: a tile of 64-bit pointers would cost two registers per element)."""
    if split_k > 1:
        ws_ptrs = ws_ptr + idx
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        if FENCE:
            tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [tile_id], dtype=tl.int32,
                                      is_pure=False, pack=1)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if arrived == split_k - 1:
            total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")  # from L2, where atomics land
            tl.store(y_ptr + idx, total.to(y_ptr.dtype.element_ty), mask=mask)
            # The compiler may give the load above and the store below different thread layouts, so one thread can
            # zero a sum another thread has not read yet: wait until every thread has stored its part of y.
            tl.debug_barrier()
            tl.store(ws_ptrs, tl.zeros_like(total), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)
    else:
        tl.store(y_ptr + idx, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The output tile of a GEMM program on the grid ``(M tiles, N tiles, K splits)``: ``(pid_m, pid_n, pid_k,
    offs_m, offs_n, m_mask, n_mask)``.  M tiles vary fastest, so programs that share a weight tile run together
    (L2 reuse)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, pid_k, offs_m, offs_n, offs_m < M, offs_n < N


# ---- configurations ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvConfig:
    """Split-K GEMV: ``block_n`` output columns per program, ``split_k`` programs along K per column block."""

    block_n: int
    num_warps: int
    split_k: int = 1
    stages: int = 0  # W4 only: 0 = register prefetch kernel; >= 1 = compiler-pipelined kernel with this many stages
    rows_step: int = 8  # W4 pipelined kernel: int32 word rows per loop iteration
    late: bool = False  # W4 pipelined kernel: one accumulator per word row, reduced over rows once at the end
    block_c: int = 64  # W8 only: int32 words (4 codes each) of a row per loop step

    @property
    def name(self) -> str:
        extra = f",p{self.stages},r{self.rows_step}{',late' if self.late else ''}" if self.stages else ""
        extra += f",c{self.block_c}" if self.block_c != 64 else ""
        return f"gemv[n{self.block_n},w{self.num_warps},sk{self.split_k}{extra}]"


@dataclass(frozen=True)
class GemmConfig:
    """Tiled tensor-core GEMM: ``block_m x block_n`` outputs per program, ``block_k`` input features per step
    (the W4 kernel always steps one group; ``block_k`` is used by W8), ``split_k`` programs along K per tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    block_k: int = 0
    weight_a: bool = False  # the weight-stationary kernels (``*_gemm_t_kernel``, path name ``gemm_t``)

    @property
    def name(self) -> str:
        k = f",k{self.block_k}" if self.block_k else ""
        kind = "gemm_t" if self.weight_a else "gemm"
        return (f"{kind}[m{self.block_m},n{self.block_n}{k},w{self.num_warps},s{self.num_stages},"
                f"sk{self.split_k}]")


def _check_block(name: str, value: int, lo: int = 1) -> None:
    if value < lo or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two >= {lo}")


def _check_operands(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> tuple[int, int, int]:
    """Shape/dtype/device checks (no value scans: this runs on every call).  Returns ``(M, N, K)``."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use one of {_SUPPORTED_DTYPES}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D int32 [K // 8, N], got {qweight.dtype} {tuple(qweight.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * W4_PACK != k:
        raise ValueError(f"x has K={k} input features but qweight {tuple(qweight.shape)} packs "
                         f"{qweight.shape[0] * W4_PACK}")
    if group_size not in (32, 64, 128, 256) or k % group_size:
        raise ValueError(f"group size {group_size} must be one of 32, 64, 128, 256 and divide K={k}")
    want = (k // group_size, n)
    if tuple(scales.shape) != want or tuple(zeros.shape) != want:
        raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} must be {want} "
                         f"for K={k}, N={n}, group size {group_size}")
    for t, what in ((qweight, "qweight"), (scales, "scales"), (zeros, "zeros")):
        if t.device != x.device:
            raise ValueError(f"{what} is on {t.device} but x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous")
    if x.stride(1) != 1:
        raise ValueError(f"x must have unit stride along K, got strides {x.stride()}")
    return m, n, k


def _dot_mode(dtype: torch.dtype) -> tuple[int, str]:
    """(MODE, input precision) of the tensor-core kernels: 0 = float16 subnormal codes, 1 = converted codes
    (IEEE products for float32 operands, or Triton would use TF32)."""
    return (0 if dtype == torch.float16 else 1), dot_precision(dtype)


# ---- split-K GEMV (small M) ------------------------------------------------------------------------------------------
@triton.jit
def _w4_code_times_x(w, xj, j: tl.constexpr):
    """``q_j * x_j * 2**-49`` for the word tile ``w`` (``[rows, BLOCK_N]``; for ``j >= 6`` already shifted right by
    24 bits) and the float32 ``x_j`` of its rows (``[rows]``).  The bits ``w & (15 << 4i)`` read as a float32 are
    exactly ``q * 2**(4i - 149)`` (a subnormal, or for ``i = 5`` the smallest normals, which continue the same
    scale): one AND per code, no conversion; ``x`` is scaled by ``2**(100 - 4i)`` so every product is the normal
    float ``x * q * 2**-49``."""
    f = (w & (15 << (4 * j if j < 6 else 4 * j - 24))).to(tl.float32, bitcast=True)
    return f * (xj * (2.0 ** (100 - (4 * j if j < 6 else 4 * j - 24))))[:, None]


@triton.jit(do_not_specialize=["M", "num_groups", "groups_per_split", "split_k"])
def _w4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
                    M, N, stride_xm, num_groups, groups_per_split, split_k,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_STEP: tl.constexpr,
                    FENCE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    ROWS: tl.constexpr = GROUP // 8  # int32 words per column per group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, ROWS_STEP)
    x_row = x_ptr + m * stride_xm
    STEPS: tl.constexpr = ROWS // ROWS_STEP
    g0 = tl.minimum(pid_k * groups_per_split, num_groups - 1)
    # Software prefetch: the words of the next step are loaded before the current step is computed.
    w_next = tl.load(qw_ptr + (g0 * ROWS + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, groups_per_split):
        g = pid_k * groups_per_split + i
        # The last split may run past the last group: it reads group num_groups - 1 again (no predicates on the
        # hot loads) and adds nothing, because its scales load as 0.
        g_in = tl.minimum(g, num_groups - 1)
        g_after = tl.minimum(g + 1, num_groups - 1)
        s = tl.load(s_ptr + g_in * N + offs_n, mask=n_mask & (g < num_groups), other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g_in * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        xq = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_k x_k q_k over the group, times 2**-49
        xsum = tl.zeros((ROWS_STEP,), dtype=tl.float32)  # sum_k x_k
        for h in tl.static_range(STEPS):
            rows = g_in * ROWS + h * ROWS_STEP + offs_r
            w = w_next
            if h + 1 < STEPS:
                w_next = tl.load(qw_ptr + (rows + ROWS_STEP)[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                                 other=0)
            else:  # first step of the next group, if this program has one
                w_next = tl.load(qw_ptr + (g_after * ROWS + offs_r)[:, None] * N + offs_n[None, :],
                                 mask=n_mask[None, :] & (i + 1 < groups_per_split), other=0)
            for j in tl.static_range(8):
                if j == 6:
                    w = w >> 24  # codes 6 and 7 move to bits 0..7
                xj = tl.load(x_row + g_in * GROUP + j * ROWS + h * ROWS_STEP + offs_r).to(tl.float32)
                xsum += xj
                xq += tl.sum(_w4_code_times_x(w, xj, j), axis=0)
        acc += s * (xq * (2.0 ** 49) - z * tl.sum(xsum, axis=0))
    offs_m = m + tl.arange(0, 1)
    tile_id = m * tl.num_programs(0) + pid_n
    pdl_trigger(USE_PDL)
    store_tile(acc[None, :], y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE)


@triton.jit(do_not_specialize=["M", "num_groups", "groups_per_split", "split_k"])
def _w4_gemv_pipelined_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
                              M, N, stride_xm, num_groups, groups_per_split, split_k,
                              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_STEP: tl.constexpr,
                              STAGES: tl.constexpr, LATE: tl.constexpr, FENCE: tl.constexpr,
                              USE_PDL: tl.constexpr):
    """The GEMV as one flat loop over steps of ``ROWS_STEP`` word rows, every load inside the loop: Triton's
    software pipeliner (``num_stages``) then keeps several steps of words in flight through shared memory instead
    of registers, so occupancy is not limited by prefetched words (a loop without a dot is pipelined only when its
    ``tl.range`` asks for stages; the kernel-level ``num_stages`` does not apply).  Same arithmetic as
    :func:`_w4_gemv_kernel`; the zero/scale correction is applied per step (``ROWS_STEP`` rows lie in one group).
    Measured on an H200 (2026-12-02, BENCHMARKS.md): faster than the register-prefetch kernel on the large
    7B/8B shapes at M = 1 (e.g. 28672 x 4096: 27 us against 29-33 us), not on 4096 x 4096.
    ``LATE``: keep one accumulator per word row and column and sum over the rows once after the loop, instead of
    reducing across threads (shared memory and a barrier) in every step; 1-8% faster on five of the seven 7B/8B
    shapes at M = 1 (H200, 2026-12-03)."""
    pdl_wait(USE_PDL)
    ROWS: tl.constexpr = GROUP // 8
    STEPS: tl.constexpr = ROWS // ROWS_STEP  # steps per group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, ROWS_STEP)
    x_row = x_ptr + m * stride_xm
    ACC_ROWS: tl.constexpr = ROWS_STEP if LATE else 1
    acc = tl.zeros((ACC_ROWS, BLOCK_N), dtype=tl.float32)
    for t in tl.range(0, groups_per_split * STEPS, num_stages=STAGES):
        g = pid_k * groups_per_split + t // STEPS
        g_in = tl.minimum(g, num_groups - 1)  # past the last group: re-read it, add nothing (scales load as 0)
        rows = g_in * ROWS + (t % STEPS) * ROWS_STEP + offs_r
        w = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + g_in * N + offs_n, mask=n_mask & (g < num_groups), other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g_in * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        xs = tl.zeros((ROWS_STEP,), dtype=tl.float32)
        d = tl.zeros((ROWS_STEP, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            if j == 6:
                w = w >> 24  # codes 6 and 7 move to bits 0..7
            xj = tl.load(x_row + g_in * GROUP + j * ROWS + (t % STEPS) * ROWS_STEP + offs_r).to(tl.float32)
            xs += xj
            d += _w4_code_times_x(w, xj, j)
        if LATE:  # elementwise: no reduction across threads inside the loop
            acc += s[None, :] * (d * (2.0 ** 49) - z[None, :] * xs[:, None])
        else:
            acc += (s * (tl.sum(d, axis=0) * (2.0 ** 49) - z * tl.sum(xs, axis=0)))[None, :]
    offs_m = m + tl.arange(0, 1)
    tile_id = m * tl.num_programs(0) + pid_n
    pdl_trigger(USE_PDL)
    store_tile(tl.sum(acc, axis=0)[None, :], y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE)


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               cfg: GemvConfig = GemvConfig(256, 2), out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` with the split-K GEMV kernel (one program per row of ``x``, column block and K split)."""
    m, n, k = _check_operands(x, qweight, scales, zeros, group_size)
    _check_block("block_n", cfg.block_n, 16)
    num_groups = k // group_size
    split = max(1, min(cfg.split_k, num_groups))
    groups_per_split = triton.cdiv(num_groups, split)
    split = triton.cdiv(num_groups, groups_per_split)  # no empty splits
    y = output_buffer(out, m, n, x)
    if m == 0:
        return y
    grid = (triton.cdiv(n, cfg.block_n), split, m)
    ws = splitk_workspace(x.device)  # passed even without split-K: the kernel's pointer types must not change
    if split > 1:
        ws.check(m, n, grid[0] * m)
    if cfg.stages:
        rows_step = min(cfg.rows_step, group_size // W4_PACK)
        _check_block("rows_step", rows_step)
        _w4_gemv_pipelined_kernel[grid](x, qweight, scales, zeros, y, ws.partials, ws.counters, m, n, x.stride(0),
                                        num_groups, groups_per_split, split, GROUP=group_size, BLOCK_N=cfg.block_n,
                                        ROWS_STEP=rows_step, STAGES=cfg.stages, LATE=cfg.late,
                                        FENCE=not interpreting(),
                                        num_warps=cfg.num_warps, **launch_options(x.device))
        return y
    _w4_gemv_kernel[grid](x, qweight, scales, zeros, y, ws.partials, ws.counters, m, n, x.stride(0), num_groups,
                          groups_per_split, split, GROUP=group_size, BLOCK_N=cfg.block_n,
                          ROWS_STEP=min(8, group_size // W4_PACK), FENCE=not interpreting(),
                          num_warps=cfg.num_warps, num_stages=1, **launch_options(x.device))
    return y


# ---- tiled tensor-core GEMM (mid M) ---------------------------------------------------------------------------------
@triton.jit
def _w4_dot_position(d, a_j, w, j, MODE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``d + a_j @ B_j`` with ``B_j = (w >> 4j) & 15`` (``j`` a constant or a per-row column vector)."""
    q = (w >> (4 * j)) & 15
    if MODE == 0:
        b = q.to(tl.int16).to(tl.float16, bitcast=True)  # the subnormal q * 2**-24, exact
    else:
        b = q.to(a_j.dtype)
    return tl.dot(a_j, b, d, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["M", "num_groups", "groups_per_split", "split_k"])
def _w4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
                    M, N, stride_xm, num_groups, groups_per_split, split_k,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, FENCE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    ROWS: tl.constexpr = GROUP // 8  # int32 words per column per group
    # Each tensor-core product needs K >= 16: below G = 128 one product covers P = 16 // ROWS code positions, its
    # B rows repeating the word rows with a different shift per repetition.
    KD: tl.constexpr = 16 if ROWS < 16 else ROWS
    P: tl.constexpr = KD // ROWS
    pid_m, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, GROUP)
    offs_c = tl.arange(0, KD)
    word_row = offs_c % ROWS
    pos = offs_c // ROWS  # 0 when P == 1
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, groups_per_split):
        g = pid_k * groups_per_split + i
        g_in = tl.minimum(g, num_groups - 1)  # past the last group: re-read it, add nothing (scales load as 0)
        w = tl.load(qw_ptr + (g_in * ROWS + word_row)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + g_in * N + offs_n, mask=n_mask & (g < num_groups), other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g_in * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        a = tl.load(x_rows + (g_in * GROUP + offs_k)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, GROUP]
        xsum = tl.sum(a.to(tl.float32), axis=1)
        # One product per code position j (per P positions below G = 128): row r of B_j holds the code of
        # k = g G + j R + r (nibble j of word r), so B_j is an elementwise function of the word tile and Triton
        # unpacks it in the MMA operand layout instead of staging it through shared memory.  The matching columns
        # of x are the contiguous slice x[:, g G + j R : g G + (j + 1) R] (P slices side by side below G = 128).
        d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in tl.static_range(8 // P):
            a_t = tl.load(x_rows + (g_in * GROUP + t * KD + offs_c)[None, :], mask=m_mask[:, None], other=0.0)
            if P == 1:
                d = _w4_dot_position(d, a_t, w, t, MODE, DOT_PRECISION)
            else:
                d = _w4_dot_position(d, a_t, w, (t * P + pos)[:, None], MODE, DOT_PRECISION)
        if MODE == 0:
            s_dot = s * 16777216.0
        else:
            s_dot = s
        acc += d * s_dot[None, :] - xsum[:, None] * (z * s)[None, :]
    tile_id = pid_m * tl.num_programs(1) + pid_n
    pdl_trigger(USE_PDL)
    store_tile(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE)


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               cfg: GemmConfig = GemmConfig(16, 128, 4, 3), out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` with a tiled tensor-core kernel (one group of K per step, optional split-K): the
    activation-stationary :func:`_w4_gemm_kernel`, or with ``cfg.weight_a`` the weight-stationary
    :func:`_w4_gemm_t_kernel` (group size >= 128)."""
    m, n, k = _check_operands(x, qweight, scales, zeros, group_size)
    if cfg.weight_a and group_size < 128:
        raise ValueError(f"the weight-stationary W4 GEMM needs a group size >= 128 (K >= 16 per product), "
                         f"got {group_size}")
    _check_block("block_m", cfg.block_m, 16)
    _check_block("block_n", cfg.block_n, 16)
    num_groups = k // group_size
    split = max(1, min(cfg.split_k, num_groups))
    groups_per_split = triton.cdiv(num_groups, split)
    split = triton.cdiv(num_groups, groups_per_split)
    y = output_buffer(out, m, n, x)
    if m == 0:
        return y
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    ws = splitk_workspace(x.device)  # passed even without split-K: the kernel's pointer types must not change
    if split > 1:
        ws.check(m, n, grid[0] * grid[1])
    mode, precision = _dot_mode(x.dtype)
    kernel = _w4_gemm_t_kernel if cfg.weight_a else _w4_gemm_kernel
    kernel[grid](x, qweight, scales, zeros, y, ws.partials, ws.counters, m, n, x.stride(0), num_groups,
                 groups_per_split, split, GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MODE=mode,
                 DOT_PRECISION=precision, FENCE=not interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                 **launch_options(x.device))
    return y


# ---- weight-stationary tensor-core GEMM (M from a few to a few hundred) ----------------------------------------------
@triton.jit(do_not_specialize=["M", "num_groups", "groups_per_split", "split_k"])
def _w4_gemm_t_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
                      M, N, stride_xm, num_groups, groups_per_split, split_k,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, FENCE: tl.constexpr, USE_PDL: tl.constexpr):
    """``y.T`` tile ``[BLOCK_N, BLOCK_M] = W_tile @ x_tile.T``: the dequantized weight is the A operand (on Hopper
    the MMA reads A from registers, so the dequantized tile never touches shared memory; B, the activations, comes
    from shared memory).  The batch is the MMA's N dimension (16 to 256), so small M wastes nothing of the
    64-row MMA.  One group of ``G`` input features per step, as ``8`` products of ``K = G / 8``: product ``j``
    takes nibble ``j`` of the word tile (the codes of ``k = g G + j G / 8 + r``) and the matching rows of ``x.T``,
    the contiguous slice ``x[:, g G + j G / 8 : g G + (j + 1) G / 8]``, which the compiler streams into shared
    memory with asynchronous copies.  (Under the natural-order layout of 2026-12-02 these were strided columns,
    split in registers and stored to shared memory before every product, which serialized the eight products; a
    prototype on the position-major layout was 1.02-1.36x faster at M = 4-64 on an H200, BENCHMARKS.md.)
    The tile is fully dequantized before the product, ``(q - z) * s`` rounded once to the model dtype (the
    reference's value): float16 builds ``1024 + q`` by OR-ing the code into the exponent bits of 1024
    (``0x6400``), subtracts ``1024 + z`` (exact) and multiplies by ``s`` (one rounding), so one float32
    accumulator runs over all of K with no per-group epilogue.  bfloat16/float32 convert the code."""
    pdl_wait(USE_PDL)
    ROWS: tl.constexpr = GROUP // 8  # int32 words per column per group = K of each product (>= 16)
    pid_m, pid_n, pid_k, offs_m, offs_n, m_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(0, groups_per_split):
        g = pid_k * groups_per_split + i
        g_in = tl.minimum(g, num_groups - 1)  # past the last group: re-read it, add nothing (scales load as 0)
        w = tl.load(qw_ptr + (g_in * ROWS + offs_r)[None, :] * N + offs_n[:, None], mask=n_mask[:, None], other=0)
        s = tl.load(s_ptr + g_in * N + offs_n, mask=n_mask & (g < num_groups), other=0.0)
        z = tl.load(z_ptr + g_in * N + offs_n, mask=n_mask, other=0.0)
        if MODE == 0:
            zz = (z + 1024.0)[:, None]
        for j in tl.static_range(8):
            b = tl.trans(tl.load(x_rows + (g_in * GROUP + j * ROWS + offs_r)[None, :], mask=m_mask[:, None],
                                 other=0.0))  # [ROWS, BLOCK_M]
            q = (w >> (4 * j)) & 15
            if MODE == 0:
                a = ((q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zz) * s[:, None]
            else:
                a = ((q.to(tl.float32) - z.to(tl.float32)[:, None]) * s.to(tl.float32)[:, None]).to(b.dtype)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    pdl_trigger(USE_PDL)
    store_tile_t(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile_id, split_k, FENCE)


# ---- dequantize + cuBLAS (large M) ----------------------------------------------------------------------------------
@triton.jit
def _w4_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K8, n_start, n_count,
                       GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr):
    """``out[k, c] = (q[k, n_start + c] - z) * s`` for ``c < n_count``: ``W.T`` restricted to a column chunk,
    ``[K, n_count]`` row-major.  Computed in float32 and rounded once, like the reference."""
    pdl_wait(USE_PDL)
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_r[:, None] < K8) & (offs_c[None, :] < n_count)
    cols = n_start + offs_c
    w = tl.load(qw_ptr + offs_r[:, None] * N + cols[None, :], mask=mask, other=0)
    meta = ((offs_r * 8) // GROUP)[:, None] * N + cols[None, :]
    s = tl.load(s_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    pdl_trigger(USE_PDL)
    k_row = (offs_r // (GROUP // 8)) * GROUP + offs_r % (GROUP // 8)  # input of nibble 0 (position-major)
    for j in tl.static_range(8):
        q = ((w >> (4 * j)) & 15).to(tl.float32)
        val = (q - z) * s
        tl.store(out_ptr + (k_row + j * (GROUP // 8))[:, None] * n_count + offs_c[None, :],
                 val.to(out_ptr.dtype.element_ty), mask=mask)


def w4a16_dequantize_t(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                       out: torch.Tensor, n_start: int = 0) -> torch.Tensor:
    """Write ``W.T[:, n_start : n_start + out.shape[1]]`` (``[K, n_count]``) into ``out`` (contiguous, model
    dtype) and return it.  Bit-identical to :func:`morphserve.quant.packing.dequantize_w4`."""
    k8, n = qweight.shape
    if out.dim() != 2 or out.shape[0] != k8 * W4_PACK or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [K={k8 * W4_PACK}, n_count] tensor, got {tuple(out.shape)}")
    n_count = out.shape[1]
    if n_start < 0 or n_start + n_count > n:
        raise ValueError(f"column chunk [{n_start}, {n_start + n_count}) is outside N={n}")
    block_r, block_n = 16, 128
    grid = (triton.cdiv(k8, block_r), triton.cdiv(n_count, block_n))
    _w4_dequant_kernel[grid](qweight, scales, zeros, out, n, k8, n_start, n_count, GROUP=group_size,
                             BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4, **launch_options(qweight.device))
    return out


def w4a16_dequant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, scratch: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` by dequantizing ``W.T`` into ``scratch`` (1-D, ``x``'s dtype) and multiplying with cuBLAS, in
    chunks of output columns when the whole ``[K, N]`` does not fit in ``scratch``."""
    m, n, k = _check_operands(x, qweight, scales, zeros, group_size)
    if scratch.dim() != 1 or scratch.dtype != x.dtype or scratch.device != x.device:
        raise ValueError(f"scratch must be a 1-D {x.dtype} tensor on {x.device}, got {scratch.dtype} "
                         f"{tuple(scratch.shape)} on {scratch.device}")
    chunk = min(n, scratch.numel() // k)
    if chunk < n:
        chunk = chunk // _CHUNK_ALIGN * _CHUNK_ALIGN  # keeps cuBLAS's leading dimensions aligned
    if chunk == 0:
        raise ValueError(f"scratch of {scratch.numel()} elements holds fewer than {min(n, _CHUNK_ALIGN)} "
                         f"columns of K={k}")
    y = output_buffer(out, m, n, x)
    for n0 in range(0, n, chunk):
        nc = min(chunk, n - n0)
        wt = w4a16_dequantize_t(qweight, scales, zeros, group_size, scratch[:k * nc].view(k, nc), n0)
        torch.mm(x, wt, out=y if nc == n else y[:, n0:n0 + nc])
    return y
