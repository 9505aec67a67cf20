"""A bandwidth-bound Triton GEMV/skinny GEMM for float16/bfloat16 projections at small batch, registered as the
FP16 path of :func:`morphserve.model.linear.linear`.

At decode batch sizes the projections read every weight once and do almost no arithmetic, so their cost is bytes
over memory bandwidth.  cuBLAS reaches about 80% of the device-to-device copy bandwidth on these shapes at M = 1
(H200: 3.4 of 4.25 TB/s on 4096x11008), which alone would put a batch-1 decode step 1.25x over the HBM floor.
This kernel gives each program ``BLOCK_N`` output features and streams their rows of ``W`` (``[N, K]``, row major)
along K in ``BLOCK_K`` chunks, evicting them from L2 first (they are read once per step):

* ``M == 1``: no tensor cores.  The program keeps a ``[BLOCK_N, BLOCK_K]`` float32 accumulator of elementwise
  products and reduces it over K once at the end, so the loop body is loads and FMAs only.
* ``M > 1``: ``tl.dot`` on ``[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]`` tiles (``BLOCK_M >= 16`` for the tensor
  cores; padding rows are masked).
* **Split-K** (``split_k > 1``): K is cut into ``split_k`` ranges handled by separate programs, which write float32
  partial sums; a second small kernel adds them and rounds.  Narrow outputs (N = 4096: the ``o`` and ``down``
  projections of 7B/8B models) otherwise leave too few programs to keep every multiprocessor streaming.

**Fused prologues and epilogue.**  At small batch the elementwise kernels between the projections (RMSNorm with
its residual add, SiLU-and-mul) each cost a launch and a dependent wait of about 2 us for a few kilobytes of work,
~100 of them per Llama-2-7B decode step.  The kernel can do their work itself (:func:`gemv`'s options, composed
from the reference kernels in :func:`reference_gemv`; the Triton kernel set folds them into FP16 layers, see
:meth:`~morphserve.model.kernel_set.TritonKernels.fuses_layer`):

* *norm prologue*: each program first computes its rows' ``1/rms`` of ``x + x2`` over all of K (a pass over
  ``M x K`` activations, from L2), then normalises, scales by the norm weight and rounds each input tile as the
  norm kernel would have stored it;
* *SiLU prologue*: the input tile is ``silu(gate) * up``, read from the ``gate_up`` product's two halves;
* *residual epilogue*: the output is the rounded product plus ``add + add2`` (in the split-K reduction kernel when
  K is split), so ``o``'s output lands in the residual stream directly.

**Configurations.**  :func:`gemv_config` answers from the tuning table when one was loaded for this device
(:func:`load_tuning`; ``benchmarks/bench_fastpath.py --tune-gemv`` measures :data:`CANDIDATES` against cuBLAS on
every projection shape and writes the table, which also records, per shape and M, whether cuBLAS was faster), and
otherwise from fixed rules.  The shipped table, ``gemv_tuning.json`` beside this file, holds the measurements of
the GPUs this was tuned on (see ``benchmarks/BENCH_fastpath.md``).

**Routing.**  The Triton path is taken only inside :func:`enabled` (the Triton kernel set enters it for each
forward), so the reference kernel set stays pure PyTorch (``F.linear``) even on CUDA; only for float16/bfloat16
inputs; and only where the tuning table says Triton wins or, for shapes it does not cover, for ``M <= MAX_M``.
Everything else, float32 included, goes to ``F.linear``.
"""

from __future__ import annotations

import contextlib
import json
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from morphserve.kernels import reference as ref
from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.triton_support import launch_options
from morphserve.memory.weight_arena import LayerWeights, Precision
from morphserve.model.linear import dense_linear, output_buffer, register_linear

# Largest M routed to the Triton kernel for shapes the tuning table does not cover.
MAX_M = 16
TUNING_FILE = Path(__file__).with_name("gemv_tuning.json")
TUNED_MS = (1, 4, 8, 16, 32, 64)  # the M values a tuning table holds (an M uses the smallest tuned M >= it)

_ENABLED: ContextVar[bool] = ContextVar("morphserve_triton_linear", default=False)


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Route small-M float16/bfloat16 projections through the Triton GEMV within this context."""
    token = _ENABLED.set(True)
    try:
        yield
    finally:
        _ENABLED.reset(token)


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # 1: the FMA path; >= 16: the tensor-core path
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "split_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")
        if self.block_m != 1 and (self.block_m < 16 or self.block_n < 16 or self.block_k < 16):
            raise ValueError(f"the tensor-core path needs block sizes >= 16, got {self}")


# Candidates the tuning sweep measures, by the tuned M they serve.
_M1 = [(4, 1024, 4, 1, 1), (8, 1024, 4, 1, 1), (2, 2048, 4, 1, 1), (4, 2048, 8, 1, 1), (8, 512, 4, 1, 1),
       (16, 512, 8, 1, 1), (4, 1024, 4, 1, 2), (8, 1024, 4, 1, 2), (4, 1024, 4, 1, 4), (8, 512, 4, 1, 4),
       (8, 1024, 8, 2, 1), (4, 512, 4, 1, 8)]
_M16 = [(16, 256, 4, 4, 1), (32, 128, 4, 4, 1), (64, 128, 4, 3, 1), (16, 256, 4, 4, 2), (32, 256, 4, 3, 2),
        (16, 512, 4, 3, 4), (32, 128, 4, 4, 4)]
_M32 = [(32, 128, 4, 4, 1), (64, 128, 4, 3, 1), (32, 128, 4, 4, 2), (32, 256, 4, 3, 4)]
_M64 = [(64, 128, 4, 3, 1), (32, 128, 4, 4, 2), (64, 64, 4, 4, 1), (32, 128, 4, 4, 4)]
CANDIDATES: dict[int, list[GemvConfig]] = {
    1: [GemvConfig(1, *c) for c in _M1],
    **{m: [GemvConfig(16, *c) for c in _M16] for m in (4, 8, 16)},
    32: [GemvConfig(32, *c) for c in _M32],
    64: [GemvConfig(64, *c) for c in _M64],
}


def tuned_m(m: int) -> int | None:
    """The tuned M whose configuration serves ``m`` rows (None above the largest)."""
    return next((t for t in TUNED_MS if t >= m), None)


# ---- tuning table ---------------------------------------------------------------------------------------------
# device name -> {(n, k, tuned m): config or None (None: cuBLAS was faster)}
_TABLE: dict[str, dict[tuple[int, int, int], GemvConfig | None]] = {}
_DEVICE_NAMES: dict[int, str] = {}


def load_tuning(path: Path | str = TUNING_FILE) -> None:
    """Load a tuning table (JSON: ``{device name: [{n, k, m, config or null}, ...]}``), replacing entries."""
    data = json.loads(Path(path).read_text())
    for device, rows in data.items():
        table = _TABLE.setdefault(device, {})
        for r in rows:
            table[(r["n"], r["k"], r["m"])] = GemvConfig(**r["config"]) if r["config"] else None


def set_tuned(device: str, n: int, k: int, m: int, config: GemvConfig | None) -> None:
    _TABLE.setdefault(device, {})[(n, k, m)] = config


def tuning_rows(device: str) -> list[dict[str, Any]]:
    return [{"n": n, "k": k, "m": m, "config": asdict(c) if c else None}
            for (n, k, m), c in sorted(_TABLE.get(device, {}).items())]


def _device_name(x: torch.Tensor) -> str:
    if x.device.type != "cuda":
        return "cpu"
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    name = _DEVICE_NAMES.get(idx)
    if name is None:
        name = _DEVICE_NAMES[idx] = torch.cuda.get_device_name(idx)
    return name


_MISSING = object()


def _tuned(t: torch.Tensor, m: int, n: int, k: int) -> Any:
    """The table's answer for an ``[m, k] x [n, k]^T`` product on ``t``'s device: a config, None (cuBLAS), or
    _MISSING (not tuned)."""
    table = _TABLE.get(_device_name(t))
    m = tuned_m(m)
    if table is None or m is None:
        return _MISSING
    return table.get((n, k, m), _MISSING)


def gemv_config(m: int, n: int, k: int) -> GemvConfig:
    """The fixed-rule configuration for ``[m, k] x [n, k]^T`` (used where no tuning table applies): the most
    frequent winners of the H200 sweep (``benchmarks/results/fastpath_gemv_h200.json``) by M and output width."""
    wide = n > 8192
    if m == 1:
        return GemvConfig(1, 8, 512, 4, 1)
    if m <= 16:
        return GemvConfig(16, 64, 128, 4, 3) if wide else GemvConfig(16, 16, 256, 4, 4)
    if m <= 32:
        return GemvConfig(32, 64, 128, 4, 3) if wide else GemvConfig(32, 32, 128, 4, 4, 2)
    return GemvConfig(64, 64, 128, 4, 3)


# ---- kernels --------------------------------------------------------------------------------------------------
# What a product may do to its input rows before multiplying (``PROLOGUE``) -- the elementwise kernel that would
# otherwise run before it, folded into the GEMV (see "Fused prologues and epilogue" in the module docstring).
NO_PROLOGUE, NORM_PROLOGUE, SILU_PROLOGUE = 0, 1, 2


@triton.jit
def _input_tile(x_ptrs, x2_ptrs, nw_ptrs, up_offset, rstd, xmask, kmask, MASK_K: tl.constexpr,
                PROLOGUE: tl.constexpr, HAS_X2: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_K]`` tile of the product's input, rounded to the activation dtype at the points where
    the unfused kernels (norm.py, activation.py) store their results."""
    x = tl.load(x_ptrs, mask=xmask, other=0.0, eviction_policy="evict_last")
    if PROLOGUE == 1:  # RMSNorm of (x + x2) times the norm weight; rstd per row computed by the caller
        if HAS_X2:
            x2 = tl.load(x2_ptrs, mask=xmask, other=0.0, eviction_policy="evict_last")
            x = (x.to(tl.float32) + x2.to(tl.float32)).to(x.dtype)
        y = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
        if MASK_K:
            nw = tl.load(nw_ptrs, mask=kmask, other=0.0, eviction_policy="evict_last")
        else:
            nw = tl.load(nw_ptrs, eviction_policy="evict_last")
        x = (y.to(tl.float32) * nw.to(tl.float32)).to(x.dtype)
    elif PROLOGUE == 2:  # SiLU(gate) * up, the up half ``up_offset`` elements further along the row
        u = tl.load(x_ptrs + up_offset, mask=xmask, other=0.0, eviction_policy="evict_last")
        gf = x.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(x.dtype)
        x = (s.to(tl.float32) * u.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _row_rstd(x_ptr, x2_ptr, rm, mmask, K, stride_xm, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
              HAS_X2: tl.constexpr):
    """``1 / sqrt(mean((x + x2)^2) + eps)`` of rows ``rm`` over all ``K`` columns (float32, ``[BLOCK_M]``), in
    ``BLOCK_K`` chunks (the caller passes the whole padded row where it fits: one round trip to L2, not one per
    chunk before the first weight load)."""
    rk = tl.arange(0, BLOCK_K)
    ss = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = rm[:, None].to(tl.int64) * stride_xm + (k0 + rk)[None, :]
        msk = mmask[:, None] & ((k0 + rk) < K)[None, :]
        x = tl.load(x_ptr + offs, mask=msk, other=0.0, eviction_policy="evict_last")
        if HAS_X2:
            x2 = tl.load(x2_ptr + offs, mask=msk, other=0.0, eviction_policy="evict_last")
            x = (x.to(tl.float32) + x2.to(tl.float32)).to(x.dtype)
        xf = x.to(tl.float32)
        ss += xf * xf
    return 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)


@triton.jit
def _store_output(y, y_ptr, e_ptr, e2_ptr, offs, mask, EPILOGUE: tl.constexpr, HAS_E2: tl.constexpr):
    """Store the float32 product ``y`` rounded to the output dtype; with ``EPILOGUE``, plus ``e (+ e2)`` (rounded
    as the unfused residual adds round: the product, the sum ``e + e2``, then their sum)."""
    if EPILOGUE:
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0)
        if HAS_E2:
            e2 = tl.load(e2_ptr + offs, mask=mask, other=0.0)
            e = (e.to(tl.float32) + e2.to(tl.float32)).to(e.dtype)
        y = y + e.to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])  # M (rows) changes step by step; it only bounds masks: one variant for all
def _gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, x2_ptr, nw_ptr, e_ptr, e2_ptr, M, N, K, stride_xm, stride_wn,
                 stride_ym, k_per_split, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_X2: tl.constexpr, NORM_BLOCK: tl.constexpr,
                 EPILOGUE: tl.constexpr, HAS_E2: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    mmask = rm < M
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k_lo + rk)[None, :]
    x_offs = rm[:, None].to(tl.int64) * stride_xm + (k_lo + rk)[None, :]
    x_ptrs = x_ptr + x_offs
    x2_ptrs = x2_ptr + x_offs
    nw_ptrs = nw_ptr + (k_lo + rk)[None, :]
    if PROLOGUE == 1:
        rstd = _row_rstd(x_ptr, x2_ptr, rm, mmask, K, stride_xm, eps, BLOCK_M, NORM_BLOCK, HAS_X2)
    else:
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=nmask[:, None], other=0.0, eviction_policy="evict_first")
            x = _input_tile(x_ptrs, x2_ptrs, nw_ptrs, K, rstd, mmask[:, None], mmask[:, None], False, PROLOGUE,
                            HAS_X2)
        else:
            kmask = (k0 + rk) < k_hi
            w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0, eviction_policy="evict_first")
            x = _input_tile(x_ptrs, x2_ptrs, nw_ptrs, K, rstd, mmask[:, None] & kmask[None, :], kmask[None, :],
                            True, PROLOGUE, HAS_X2)
        if BLOCK_M == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        x2_ptrs += BLOCK_K
        nw_ptrs += BLOCK_K
    pdl_trigger(USE_PDL)
    if BLOCK_M == 1:
        y = tl.sum(acc, axis=1)[None, :]
    else:
        y = acc
    out_mask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        _store_output(y, y_ptr, e_ptr, e2_ptr, rm[:, None].to(tl.int64) * stride_ym + rn[None, :], out_mask,
                      EPILOGUE, HAS_E2)
    else:
        tl.store(part_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :], y, mask=out_mask)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(part_ptr, y_ptr, e_ptr, e2_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr,
                          BLOCK: tl.constexpr, EPILOGUE: tl.constexpr, HAS_E2: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    nmask = rn < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + m).to(tl.int64) * N + rn, mask=nmask, other=0.0)
    _store_output(acc, y_ptr, e_ptr, e2_ptr, m.to(tl.int64) * stride_ym + rn, nmask, EPILOGUE, HAS_E2)


def _norm_block(cfg: GemvConfig, k: int) -> int:
    """Columns per chunk of the norm prologue's first pass: the whole row (padded to a power of two) where
    ``block_m * row`` stays within 8192 elements per program, else ``block_k``."""
    row = triton.next_power_of_2(k)
    return row if cfg.block_m * row <= 8192 else cfg.block_k


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int], like: torch.Tensor) -> None:
    if tuple(t.shape) != shape or t.dtype != like.dtype or t.device != like.device or not t.is_contiguous():
        raise ValueError(f"gemv: {name} must be a contiguous {list(shape)} {like.dtype} tensor on {like.device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (strided)'}")


def gemv(x: torch.Tensor, w: torch.Tensor, config: GemvConfig | None = None, out: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, x2: torch.Tensor | None = None,
         silu: bool = False, add: torch.Tensor | None = None, add2: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T`` for ``x`` ``[M, K]`` and ``w`` ``[N, K]`` (rows contiguous, same dtype); returns ``[M, N]``
    (``out`` when given).  ``config`` defaults to the tuning table's entry, else :func:`gemv_config`.

    Fused prologues (at most one), as :func:`reference_gemv` spells out:

    * ``norm_weight``: the input is ``rms_norm(x + x2, norm_weight, eps)`` (``x2`` optional, ``[M, K]``);
    * ``silu``: ``x`` is ``[M, 2K]`` and the input is ``silu(x[:, :K]) * x[:, K:]``.

    Fused epilogue: ``add`` (and ``add2``), ``[M, N]``: the result is ``x @ w.T + (add + add2)``.  ``out`` may be
    ``add`` itself (each element is read before it is written, by the same program)."""
    if x.dim() != 2 or w.dim() != 2 or x.dtype != w.dtype or x.shape[1] != w.shape[1] * (2 if silu else 1):
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype} and w {tuple(w.shape)} {w.dtype} do not match"
                         f"{' (silu: x holds [gate | up], 2K columns)' if silu else ''}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"gemv needs rows with a contiguous last dim (x strides {x.stride()}, w {w.stride()})")
    if silu and norm_weight is not None:
        raise ValueError("gemv: choose one prologue (norm_weight or silu), not both")
    if (x2 is not None and norm_weight is None) or (add2 is not None and add is None):
        raise ValueError("gemv: x2 needs norm_weight and add2 needs add")
    m = x.shape[0]
    n, k = w.shape
    if norm_weight is not None:
        if tuple(norm_weight.shape) != (k,) or norm_weight.dtype != x.dtype:
            raise ValueError(f"gemv: norm_weight {tuple(norm_weight.shape)} {norm_weight.dtype} does not match "
                             f"K={k} {x.dtype}")
        if x2 is not None and (tuple(x2.shape) != tuple(x.shape) or x2.dtype != x.dtype or x2.stride() != x.stride()):
            raise ValueError(f"gemv: x2 {tuple(x2.shape)} {x2.dtype} strides {x2.stride()} does not match x "
                             f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
    for name, t in (("add", add), ("add2", add2)):
        if t is not None:
            _check_rows(name, t, (m, n), x)
    if config is None:
        tuned = _tuned(x, m, n, k)
        config = tuned if isinstance(tuned, GemvConfig) else gemv_config(m, n, k)
    cfg = config
    if m > 1 and cfg.block_m == 1:
        raise ValueError(f"the FMA path (block_m=1) serves M == 1 only, got M={m}")
    y = output_buffer(out, m, n, x)
    if not (m and n):
        return y
    # each split covers a whole number of BLOCK_K chunks; splits past the end of K do nothing
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    opts = launch_options(x.device)
    prologue = NORM_PROLOGUE if norm_weight is not None else SILU_PROLOGUE if silu else NO_PROLOGUE
    e, e2 = (add if add is not None else y), (add2 if add2 is not None else y)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _gemv_kernel[grid](x, w, y, part, x2 if x2 is not None else x, norm_weight if norm_weight is not None else w,
                       e, e2, m, n, k, x.stride(0), w.stride(0), y.stride(0), k_per_split, float(eps),
                       BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       EVEN_K=k_per_split * split == k, SPLIT_K=split, PROLOGUE=prologue, HAS_X2=x2 is not None,
                       NORM_BLOCK=_norm_block(cfg, k),
                       EPILOGUE=add is not None, HAS_E2=add2 is not None, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, **opts)
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _splitk_reduce_kernel[(triton.cdiv(n, block), m)](part, y, e, e2, m, n, y.stride(0), SPLIT_K=split,
                                                          BLOCK=block, EPILOGUE=add is not None,
                                                          HAS_E2=add2 is not None, num_warps=4, **opts)
    return y


def reference_gemv(x: torch.Tensor, w: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                   x2: torch.Tensor | None = None, silu: bool = False, add: torch.Tensor | None = None,
                   add2: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`gemv` computes, with its options, composed of the reference kernels and ``F.linear``."""
    if norm_weight is not None:
        x = ref.rms_norm(x if x2 is None else x + x2, norm_weight, eps)
    elif silu:
        x = ref.silu_and_mul(x)
    y = F.linear(x, w)
    if add is not None:
        y = y + (add if add2 is None else add + add2)
    return y


def use_triton(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`matmul` sends this product to the Triton kernel (see the module docstring)."""
    return x.dim() == 2 and x.dtype == w.dtype and x.stride(1) == 1 and routes(x.shape[0], w)


def routes(m: int, w: torch.Tensor) -> bool:
    """Whether a product of ``m`` rows (of ``w``'s dtype, rows contiguous) with ``w`` takes the Triton kernel."""
    if not (_ENABLED.get() and w.dtype in (torch.float16, torch.bfloat16) and m > 0 and w.dim() == 2
            and w.stride(1) == 1):
        return False
    tuned = _tuned(w, m, w.shape[0], w.shape[1])
    if tuned is _MISSING:
        return m <= MAX_M
    return tuned is not None


def matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T`` by the Triton kernel where :func:`use_triton` says so, else ``F.linear`` (the reference);
    into ``out`` when given (``x`` 2-D)."""
    return gemv(x, w, out=out) if use_triton(x, w) else dense_linear(x, w, out)


def linear_fp16(x: torch.Tensor, lw: LayerWeights, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The FP16-precision linear kernel (registered for :attr:`Precision.FP16`)."""
    return matmul(x, lw.tensors[name], out)


register_linear(Precision.FP16, linear_fp16)
if TUNING_FILE.exists():
    load_tuning(TUNING_FILE)
