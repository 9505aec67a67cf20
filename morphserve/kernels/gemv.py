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
* **Accumulated split-K sums** (``M == 1``, ``gemv(accumulate=True)``; the Triton kernel set asks for it where a
  Triton kernel consumes the result): the programs add their partial sums into zeroed float32 buffers (one per
  pair of splits) with relaxed atomics and the consumer adds the pairs, rounds and re-zeroes them, so no reduce
  launch (same bits as the reduce kernel, which adds in the same pairs; :mod:`morphserve.kernels.split_accum`).
  :data:`ACCUMULATE_SPLITK` turns it off.
* **Weight prefetch** (``M == 1``, :data:`PREFETCH_FIRST_CHUNK`): under programmatic dependent launch a program
  may start while the previous kernel is still finishing; it issues the load of its first weight chunk *before*
  ``pdl_wait`` and only the activation load after it, so that fetch overlaps the previous kernel's tail.  This is
  safe because weights are never written by the kernel just before: every kernel of this package triggers its
  dependents only after its own ``pdl_wait``, so when a GEMV program starts, all stream work two launches back has
  completed, and weight bytes change only through copies (swaps), which are not programmatic launches and therefore
  serialize fully.

**Configurations.**  :func:`gemv_config` answers from the tuning table when one was loaded for this device
(:func:`load_tuning`; ``benchmarks/bench_fastpath.py --tune-gemv`` measures :data:`CANDIDATES` against cuBLAS on
every projection shape and writes the table, which also records, per shape and M, whether cuBLAS was faster), and
otherwise from fixed rules.  The shipped table, ``gemv_tuning.json`` beside this file, holds the measurements of
the GPUs this was tuned on (see BENCHMARKS.md, fast path).  Its M = 1 entries were chosen *inside* decode
steps (``benchmarks/probe_gemv_in_step.py --descent --write-tuning``): there each GEMV starts under programmatic
dependent launch and prefetches its first chunk, and a configuration the isolated sweep ranked lower (four rows per
program, K split in two) made H200 batch-1 steps 4.4% (Llama-2-7B) and 5.4% (Llama-3-8B) faster than the isolated
winners.  Rerunning ``--tune-gemv`` replaces them with isolated winners; rerun the probe afterwards.

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
import triton
import triton.language as tl

from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.split_accum import Accumulated, accumulator
from morphserve.kernels.triton_support import launch_options
from morphserve.memory.weight_arena import LayerWeights, Precision
from morphserve.model.linear import dense_linear, output_buffer, register_linear

# Largest M routed to the Triton kernel for shapes the tuning table does not cover.
MAX_M = 16
TUNING_FILE = Path(__file__).with_name("gemv_tuning.json")
TUNED_MS = (1, 4, 8, 16, 32, 64)  # the M values a tuning table holds (an M uses the smallest tuned M >= it)

# Load each program's first weight chunk before waiting for the previous kernel (M = 1 path; see the docstring).
PREFETCH_FIRST_CHUNK = True
# Split-K M = 1 products asked to accumulate (gemv(accumulate=True)) add their sums atomically (split_accum), up to
# this many splits (the consumer reads one buffer per pair of splits).
ACCUMULATE_SPLITK = True
ACCUMULATE_MAX_SPLITS = 8

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
       (8, 1024, 8, 2, 1), (4, 512, 4, 1, 8), (2, 1024, 4, 1, 4)]
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


def _tuned(x: torch.Tensor, n: int, k: int) -> Any:
    """The table's answer for this product: a config, None (cuBLAS), or _MISSING (not tuned)."""
    table = _TABLE.get(_device_name(x))
    m = tuned_m(x.shape[0])
    if table is None or m is None:
        return _MISSING
    return table.get((n, k, m), _MISSING)


def gemv_config(m: int, n: int, k: int) -> GemvConfig:
    """The fixed-rule configuration for ``[m, k] x [n, k]^T`` (used where no tuning table applies): at M = 1 the
    configuration that won inside H200 decode steps on every Llama-2-7B/Llama-3-8B shape
    (``benchmarks/results/gemv_in_step_h200.json``), otherwise the most frequent winners of the isolated H200 sweep
    (``benchmarks/results/fastpath_gemv_h200.json``) by M and output width."""
    wide = n > 8192
    if m == 1:
        return GemvConfig(1, 4, 1024, 4, 1, split_k=2)
    if m <= 16:
        return GemvConfig(16, 64, 128, 4, 3) if wide else GemvConfig(16, 16, 256, 4, 4)
    if m <= 32:
        return GemvConfig(32, 64, 128, 4, 3) if wide else GemvConfig(32, 32, 128, 4, 4, 2)
    return GemvConfig(64, 64, 128, 4, 3)


# ---- kernels --------------------------------------------------------------------------------------------------
@triton.jit
def _gemv_acc(acc, w, x, BLOCK_M: tl.constexpr):
    """``acc`` plus the product of one loaded chunk: elementwise FMAs at M = 1, a tensor-core dot otherwise."""
    if BLOCK_M == 1:
        acc += w.to(tl.float32) * x.to(tl.float32)
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _load_chunk(ptrs, k0, k_hi, rk, rows, EVEN_K: tl.constexpr, EVICT: tl.constexpr):
    """One ``BLOCK_K`` chunk (columns ``k0:k0 + BLOCK_K``) of the rows ``rows`` masks in, masked at ``k_hi``
    unless every split covers whole chunks (``EVEN_K``)."""
    if EVEN_K:
        return tl.load(ptrs, mask=rows[:, None], other=0.0, eviction_policy=EVICT)
    else:
        return tl.load(ptrs, mask=rows[:, None] & ((k0 + rk) < k_hi)[None, :], other=0.0, eviction_policy=EVICT)


@triton.jit(do_not_specialize=["M"])  # M (rows) changes step by step; it only bounds masks: one variant for all
def _gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr, ATOMIC: tl.constexpr, USE_PDL: tl.constexpr):
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
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k_lo + rk)[None, :]
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = k_lo
    if PREFETCH:  # the first weight chunk is loaded before the wait (module docstring, "Weight prefetch")
        w0 = _load_chunk(w_ptrs, k_lo, k_hi, rk, nmask, EVEN_K, "evict_first")
    pdl_wait(USE_PDL)
    if PREFETCH:
        acc = _gemv_acc(acc, w0, _load_chunk(x_ptrs, k_lo, k_hi, rk, mmask, EVEN_K, "evict_last"), BLOCK_M)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        k_start = k_lo + BLOCK_K
    for k0 in range(k_start, k_hi, BLOCK_K):
        w = _load_chunk(w_ptrs, k0, k_hi, rk, nmask, EVEN_K, "evict_first")  # weights are read once per step
        x = _load_chunk(x_ptrs, k0, k_hi, rk, mmask, EVEN_K, "evict_last")
        acc = _gemv_acc(acc, w, x, BLOCK_M)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    pdl_trigger(USE_PDL)
    if BLOCK_M == 1:
        y = tl.sum(acc, axis=1)[None, :]
    else:
        y = acc
    out_mask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=out_mask)
    elif ATOMIC:  # add into pair pid_k // 2 of the zeroed [pairs, M, N] accumulator (split_accum): a `red`
        tl.atomic_add(part_ptr + (pid_k // 2 * M + rm[:, None]).to(tl.int64) * N + rn[None, :], y, mask=out_mask,
                      sem="relaxed")
    else:
        tl.store(part_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :], y, mask=out_mask)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(part_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    nmask = rn < N
    # in pairs, (p0 + p1) + (p2 + p3) + ..., the order of the accumulated path (split_accum)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(0, SPLIT_K, 2):
        pair = tl.load(part_ptr + (s * M + m).to(tl.int64) * N + rn, mask=nmask, other=0.0)
        if s + 1 < SPLIT_K:
            pair += tl.load(part_ptr + ((s + 1) * M + m).to(tl.int64) * N + rn, mask=nmask, other=0.0)
        acc += pair
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def gemv(x: torch.Tensor, w: torch.Tensor, config: GemvConfig | None = None,
         out: torch.Tensor | None = None, accumulate: bool = False) -> "torch.Tensor | Accumulated":
    """``x @ w.T`` for ``x`` ``[M, K]`` and ``w`` ``[N, K]`` (rows contiguous, same dtype); returns ``[M, N]``
    (``out`` when given).  ``config`` defaults to the tuning table's entry, else :func:`gemv_config`.
    ``accumulate`` (without ``out``): an M = 1 product with split K returns its sums as
    :class:`~morphserve.kernels.split_accum.Accumulated` (for a consumer kernel that reads them; see the module
    docstring), unless :data:`ACCUMULATE_SPLITK` is off or it has more than :data:`ACCUMULATE_MAX_SPLITS` splits;
    any other product returns the tensor."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or x.dtype != w.dtype:
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype} and w {tuple(w.shape)} {w.dtype} do not match")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"gemv needs rows with a contiguous last dim (x strides {x.stride()}, w {w.stride()})")
    m, k = x.shape
    n = w.shape[0]
    if config is None:
        tuned = _tuned(x, n, k)
        config = tuned if isinstance(tuned, GemvConfig) else gemv_config(m, n, k)
    cfg = config
    if m > 1 and cfg.block_m == 1:
        raise ValueError(f"the FMA path (block_m=1) serves M == 1 only, got M={m}")
    # each split covers a whole number of BLOCK_K chunks; splits past the end of K do nothing
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    atomic = (accumulate and ACCUMULATE_SPLITK and out is None and m == 1 and n > 0
              and 1 < split <= ACCUMULATE_MAX_SPLITS)
    if atomic:  # y is not written: the programs add into the pairs' buffers
        y = part = accumulator(x.device, triton.cdiv(split, 2), m, n)
    else:
        y = output_buffer(out, m, n, x)
        if not (m and n):
            return y
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    opts = launch_options(x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _gemv_kernel[grid](x, w, y, part, m, n, k, x.stride(0), w.stride(0), y.stride(0), k_per_split,
                       BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       EVEN_K=k_per_split * split == k, SPLIT_K=split,
                       PREFETCH=PREFETCH_FIRST_CHUNK and cfg.block_m == 1, ATOMIC=atomic,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages, **opts)
    if atomic:
        return Accumulated(part, x.dtype)
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _splitk_reduce_kernel[(triton.cdiv(n, block), m)](part, y, m, n, y.stride(0), SPLIT_K=split, BLOCK=block,
                                                          num_warps=4, **opts)
    return y


def use_triton(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`matmul` sends this product to the Triton kernel (see the module docstring)."""
    if not (_ENABLED.get() and x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 2 and x.shape[0] > 0
            and x.stride(1) == 1 and w.stride(1) == 1):
        return False
    tuned = _tuned(x, w.shape[0], w.shape[1])
    if tuned is _MISSING:
        return x.shape[0] <= MAX_M
    return tuned is not None


def matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
           accumulate: bool = False) -> "torch.Tensor | Accumulated":
    """``x @ w.T`` by the Triton kernel where :func:`use_triton` says so, else ``F.linear`` (the reference);
    into ``out`` when given (``x`` 2-D).  ``accumulate``: see :func:`gemv` (a Triton product may come back as
    accumulated sums)."""
    return gemv(x, w, out=out, accumulate=accumulate) if use_triton(x, w) else dense_linear(x, w, out)


def linear_fp16(x: torch.Tensor, lw: LayerWeights, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The FP16-precision linear kernel (registered for :attr:`Precision.FP16`)."""
    return matmul(x, lw.tensors[name], out)


register_linear(Precision.FP16, linear_fp16)
if TUNING_FILE.exists():
    load_tuning(TUNING_FILE)
