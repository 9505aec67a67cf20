"""Automatic W8/W4 linear dispatch: the fastest measured kernel path per (weight shape, batch-size bucket).

Importing this module registers :func:`linear_w8` and :func:`linear_w4` with
:func:`morphserve.model.linear.register_linear` (``import morphserve.quant`` does it).

* **CPU** tensors (and any device that is not CUDA) take the pure-PyTorch references (dequantize, then
  ``F.linear``).
* **CUDA** tensors take one of the Triton paths of :mod:`morphserve.kernels.w4a16` / :mod:`morphserve.kernels.w8a16`:
  the split-K GEMV, the tensor-core GEMMs (activation-stationary ``gemm`` and weight-stationary ``gemm_t``; several
  tile shapes and split-K factors) or dequantize + cuBLAS.  Which one is decided by measurement, per
  ``(precision, N, K, group size, dtype, device)`` and per *M bucket* (the
  smallest of :data:`M_BUCKETS` that is >= the number of rows of ``x``; larger M use the last bucket).  The first
  call with a new key times every candidate on random activations of the bucket's M with the layer's own weights
  (median of :data:`TIMING_REPS` runs, L2 flushed before each, CUDA events) and caches the fastest in a
  process-wide table: no path slower than the best measured one is ever chosen.  :func:`tune_shapes` (and
  :func:`tune_model`) fill the table at start-up for given shapes instead, with random weights in the layout; run it
  before KV-cache allocation (it needs a few hundred MiB of temporary memory) and before any CUDA graph capture
  (timing inside a capture is impossible: an untuned key raises there).
* :func:`chosen_table` returns the table (every candidate's time, the choice, and cuBLAS FP16 on the dequantized
  weight for comparison) for logging.

The dequantize + cuBLAS path writes into one scratch buffer per (device, dtype) of at most
:data:`SCRATCH_BYTES` (256 MiB by default, :func:`set_scratch_budget` changes it); larger weights are processed in
chunks of output channels.  The split-K kernels share one 32 MiB workspace per device.  Both are allocated once,
so their addresses do not change after tuning (CUDA graphs stay valid); neither is safe for concurrent use from
two streams.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch

from morphserve.memory.weight_arena import LayerWeights, Precision
from morphserve.model.config import ModelConfig
from morphserve.model.linear import dense_linear, output_buffer, register_linear
from morphserve.quant.packing import W4_PACK, dequantize_w4, dequantize_w8, w4_group_size_of

_LOG = logging.getLogger(__name__)

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TIMING_REPS = 25
TIMING_WARMUP = 3
SCRATCH_BYTES = 256 << 20
_GEMV_MAX_M = 4  # the GEMV kernels run one program per row of x: a candidate only for tiny M
# Split-K candidates aim at this many programs per SM (plus split_k = 1); GEMV programs are 1 to 4 warps.
_SPIN_CYCLES = 200_000  # about 100 us at 2 GHz (see Timer)
_SPLITK_WAVES = {"gemv": (2, 4, 8, 16, 32), "gemm": (1, 2, 4)}


def bucket_of(m: int) -> int:
    """The M bucket of a batch of ``m`` rows: the smallest bucket >= m (the largest bucket beyond it)."""
    if m < 1:
        raise ValueError(f"a linear needs at least one row, got M={m}")
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


# ---- weights and paths ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantWeight:
    """One projection's quantized tensors (views into the layer's slot) in the layout of
    :mod:`morphserve.quant.packing`.  ``zeros`` is None and ``group_size`` 0 for W8."""

    precision: Precision
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int = 0

    @property
    def n(self) -> int:
        return self.qweight.shape[1] if self.precision is Precision.W4 else self.qweight.shape[0]

    @property
    def k(self) -> int:
        return self.qweight.shape[0] * W4_PACK if self.precision is Precision.W4 else self.qweight.shape[1]

    @staticmethod
    def of(lw: LayerWeights, name: str) -> "QuantWeight":
        t = lw.tensors
        try:
            if lw.precision is Precision.W4:
                qw, s, z = t[f"{name}.qweight"], t[f"{name}.scales"], t[f"{name}.zeros"]
                return QuantWeight(Precision.W4, qw, s, z, w4_group_size_of(qw, s))
            if lw.precision is Precision.W8:
                return QuantWeight(Precision.W8, t[f"{name}.qweight"], t[f"{name}.scales"])
        except KeyError as e:
            raise ValueError(f"layer {lw.index} at {lw.precision.value} has no tensor {e.args[0]!r} "
                             f"(projection {name!r})") from None
        raise ValueError(f"layer {lw.index}: precision {lw.precision!r} is not quantized")

    def dequantize(self) -> torch.Tensor:
        """``W`` ``[N, K]`` in the scales' dtype (the reference)."""
        if self.precision is Precision.W4:
            return dequantize_w4(self.qweight, self.scales, self.zeros, self.group_size)
        return dequantize_w8(self.qweight, self.scales)


@dataclass(frozen=True)
class Path:
    """One way to compute the product: ``kind`` is ``"gemv"``, ``"gemm"``, ``"gemm_t"`` (weight-stationary) or
    ``"dequant_mm"``."""

    kind: str
    config: object = None  # GemvConfig / GemmConfig of the kernels; None for dequant_mm

    @property
    def name(self) -> str:
        return "dequant_mm" if self.config is None else self.config.name


def reference_matmul(x: torch.Tensor, w: QuantWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` through the pure-PyTorch reference (dequantize, then ``F.linear``; any device): the computation
    of :func:`~morphserve.kernels.w4a16.w4a16_matmul_ref` and :func:`~morphserve.kernels.w8a16.w8a16_matmul_ref`,
    without importing the Triton modules on CPU."""
    return dense_linear(x, w.dequantize().to(x.dtype), out)


def run_path(path: Path, x: torch.Tensor, w: QuantWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` (``x`` 2-D) through one Triton path, into ``out`` when given."""
    from morphserve.kernels import w4a16, w8a16

    if path.kind == "dequant_mm":
        scratch = dequant_scratch(x.device, x.dtype, w.n * w.k)
        if w.precision is Precision.W4:
            return w4a16.w4a16_dequant_mm(x, w.qweight, w.scales, w.zeros, w.group_size, scratch, out)
        return w8a16.w8a16_dequant_mm(x, w.qweight, w.scales, scratch, out)
    if w.precision is Precision.W4:
        fn = w4a16.w4a16_gemv if path.kind == "gemv" else w4a16.w4a16_gemm  # gemm_t: GemmConfig.weight_a
        return fn(x, w.qweight, w.scales, w.zeros, w.group_size, path.config, out)
    fn = w8a16.w8a16_gemv if path.kind == "gemv" else w8a16.w8a16_gemm
    return fn(x, w.qweight, w.scales, path.config, out)


# GEMM tiles (block_m, block_n, num_warps, num_stages) tried per M bucket (the first bound >= M applies).  From the
# compiler's resource report (float16, sm_90): no register spills except W4's 64x128 and 128x128 tiles (a few hundred
# bytes of stack); the tuner measures them anyway.  The one- and two-warp W8 tiles (and the two-warp W4 ``gemm_t``
# tiles below) won a sweep of ``mma.sync`` tiles against the dispatcher at M = 4-32 on an H200 (2026-12-04,
# ``benchmarks/probe_gemm_warps.py``): W8 1.03-1.25x faster at M = 4-16 on all seven 7B/8B shapes, W4 within 5%.
_GEMM_TILES: dict[Precision, tuple[tuple[int, tuple[tuple[int, int, int, int], ...]], ...]] = {
    Precision.W4: (
        (16, ((16, 64, 4, 4), (16, 128, 4, 4), (16, 256, 4, 3))),
        (32, ((32, 64, 4, 4), (32, 128, 4, 4))),
        (64, ((64, 64, 4, 4), (64, 128, 4, 4))),
        (2048, ((64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3))),
    ),
    Precision.W8: (
        (16, ((16, 64, 4, 4), (16, 128, 4, 4), (16, 64, 2, 3), (16, 128, 2, 3), (16, 128, 2, 2), (16, 64, 1, 3))),
        (32, ((32, 64, 4, 4), (32, 128, 4, 4), (32, 128, 2, 3))),
        (64, ((64, 64, 4, 4), (64, 128, 4, 4))),
        (2048, ((64, 128, 4, 4), (128, 128, 8, 3))),
    ),
}
# Weight-stationary GEMM tiles (block_m, block_n, num_warps, num_stages) per M bucket (``*_gemm_t``: the weight tile
# is the MMA's A operand and the batch its N dimension, so block_m may be as small as 16).  No register spills on
# sm_90 in the compiler's resource report (float16, 16-byte aligned operands); W4 needs a group size >= 128.  The
# W4 block_n = 256 tiles were added after a prototype (``benchmarks/probe_w4_perm.py`` in commit 7f1a722) won most
# M = 4-64 cells with them (113-221 registers, no spills, except 64 x 256 with 4 warps: 32 bytes of stack), and
# its M = 64 winners used two pipeline stages, hence the stage-2 tiles there.
_GEMM_T_MIN_M = 2
_GEMM_T_TILES: dict[Precision, tuple[tuple[int, tuple[tuple[int, int, int, int], ...]], ...]] = {
    Precision.W4: (
        (16, ((16, 64, 4, 3), (16, 128, 4, 3), (16, 256, 4, 3), (16, 256, 8, 3), (16, 128, 2, 3), (16, 128, 2, 2))),
        (32, ((32, 64, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (32, 256, 8, 3))),
        (64, ((64, 64, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (64, 64, 4, 2), (64, 128, 4, 2), (64, 256, 4, 2))),
        (2048, ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3))),
    ),
    Precision.W8: (
        (16, ((16, 64, 4, 4), (16, 128, 4, 4))),
        (32, ((32, 64, 4, 4), (32, 128, 4, 4))),
        (64, ((64, 64, 4, 3), (64, 128, 4, 3))),
        (2048, ((128, 64, 4, 3), (128, 128, 8, 3))),
    ),
}
# GEMV (block_n, num_warps[, stages, rows_step, late]) for W4, (block_n, num_warps, block_c) for W8.  W4 gives each
# thread 4 or 8 output columns (block_n 128 or 256 per warp).  Chosen by the compiler's resource report (no spills),
# instruction counts and H200 sweeps at M = 1 on every Llama-2-7B / Llama-3-8B shape (BENCHMARKS.md, issue #3):
# the register-prefetch kernel (best on the smallest shapes), the four pipelined configurations that came closest to
# the best of 420 (2026-12-02), and the three late-reduction ones that won five of the seven shapes in a sweep of 450
# (2026-12-03, ``probe_w4_gemv.py sweep --space late``).  W8: the configurations that won or came within 8% on every
# shape of a 275-configuration sweep (2026-12-03, ``probe_w8_gemv.py``), next to the three shipped before.
_GEMV_SHAPES = {Precision.W4: ((128, 1), (256, 2), (512, 4), (256, 1, 2, 8), (128, 1, 2, 8), (512, 2, 2, 4),
                               (128, 2, 2, 16), (256, 1, 1, 4, True), (128, 2, 2, 16, True), (256, 4, 2, 16, True)),
                Precision.W8: ((32, 4, 64), (64, 4, 64), (64, 8, 64), (8, 2, 128), (8, 2, 256), (4, 2, 256),
                               (16, 2, 64), (64, 2, 32), (16, 4, 256))}


def _split_options(kind: str, tiles: int, max_split: int, num_sms: int, m: int, n: int) -> list[int]:
    from morphserve.kernels.w4a16 import SplitKWorkspace

    opts = {1}
    if m * n <= SplitKWorkspace.DEFAULT_CAPACITY:
        for waves in _SPLITK_WAVES[kind]:
            s = (waves * num_sms + tiles - 1) // tiles
            if s > 1:
                opts.add(min(s, max_split))
    return sorted(opts)


def candidates(w: QuantWeight, m: int, num_sms: int) -> list[Path]:
    """Every path worth timing for ``m`` rows (``m`` is a bucket size) of weight ``w`` on a GPU with
    ``num_sms`` multiprocessors."""
    from morphserve.kernels.w4a16 import GemmConfig, GemvConfig
    from morphserve.kernels.w8a16 import W8_WORD

    n, k = w.n, w.k
    out: list[Path] = []
    if m <= _GEMV_MAX_M:
        for bn, warps, *rest in _GEMV_SHAPES[w.precision]:
            if w.precision is Precision.W4:
                max_split, cfg = k // w.group_size, GemvConfig(bn, warps, 1, *rest)
            else:
                step = W8_WORD * rest[0]  # input features per step
                max_split, cfg = (k + step - 1) // step, GemvConfig(bn, warps, 1, block_c=rest[0])
            tiles = m * ((n + bn - 1) // bn)
            for s in _split_options("gemv", tiles, max_split, num_sms, m, n):
                out.append(Path("gemv", replace(cfg, split_k=s)))
    tiles_for_m = next((t for bound, t in _GEMM_TILES[w.precision] if m <= bound), None)
    if tiles_for_m is not None:
        block_k = 0
        if w.precision is Precision.W8:
            block_k = next(b for b in (128, 64, 32, 16) if k % b == 0) if k % 16 == 0 else 0
        if w.precision is Precision.W4 or block_k:
            max_split = k // (w.group_size if w.precision is Precision.W4 else block_k)
            weight_a_ok = m >= _GEMM_T_MIN_M and not (w.precision is Precision.W4 and w.group_size < 128)
            t_tiles = next((t for bound, t in _GEMM_T_TILES[w.precision] if m <= bound), ()) if weight_a_ok else ()
            for kind, tile_set in (("gemm", tiles_for_m), ("gemm_t", t_tiles)):
                for bm, bn, warps, stages in tile_set:
                    tiles = ((m + bm - 1) // bm) * ((n + bn - 1) // bn)
                    for s in _split_options("gemm", tiles, max_split, num_sms, m, n):
                        out.append(Path(kind, GemmConfig(bm, bn, warps, stages, s, block_k,
                                                         weight_a=kind == "gemm_t")))
    out.append(Path("dequant_mm"))
    return out


# ---- scratch for dequantize + cuBLAS ---------------------------------------------------------------------------------
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def set_scratch_budget(nbytes: int) -> None:
    """Cap the dequantize + cuBLAS scratch buffer at ``nbytes`` per (device, dtype); drops existing buffers."""
    global SCRATCH_BYTES
    if nbytes < (1 << 20):
        raise ValueError(f"scratch budget {nbytes} bytes is below 1 MiB")
    SCRATCH_BYTES = int(nbytes)
    _SCRATCH.clear()


def dequant_scratch(device: torch.device, dtype: torch.dtype, elems: int) -> torch.Tensor:
    """The scratch buffer for ``(device, dtype)``, grown to ``min(elems, budget)`` elements if smaller."""
    device = _canonical(device)
    want = min(elems, SCRATCH_BYTES // dtype.itemsize)
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < want:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the dequantize scratch must be allocated before CUDA graph capture; "
                               "tune the shapes first (morphserve.quant.dispatch.tune_shapes)")
        _SCRATCH[(device, dtype)] = buf = torch.empty(want, dtype=dtype, device=device)
    return buf


def _canonical(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ---- timing and the table --------------------------------------------------------------------------------------------
@dataclass
class Choice:
    """The measured decision for one key and M bucket (times in microseconds, medians)."""

    precision: str
    n: int
    k: int
    group_size: int
    dtype: str
    device: str
    bucket: int
    path: str
    us: float
    fp16_cublas_us: float | None  # cuBLAS on the dequantized FP16 weight (reference only; not a candidate)
    candidates: dict[str, float] = field(default_factory=dict)  # every correct candidate's time
    failed: dict[str, str] = field(default_factory=dict)  # excluded candidates and why


_TABLE: dict[tuple, Choice] = {}
_PATHS: dict[tuple, Path] = {}


def _key(w: QuantWeight, dtype: torch.dtype, device: torch.device, bucket: int) -> tuple:
    return (w.precision, w.n, w.k, w.group_size, dtype, device, bucket)


class Timer:
    """CUDA-event timing with an L2 flush before every run.

    The flush *reads* a buffer of at least twice the L2 size (a sum), so the timed kernel finds L2 full of clean,
    unrelated lines, as in a decode step where the previous kernels read other layers' weights.  A memset flush
    (as in ``triton.testing.do_bench``) leaves L2 full of dirty lines instead, whose write-back the timed kernel
    pays for: on an H200 that added up to 60 MB of traffic to every measurement and roughly doubled the time of
    the small W4 kernels (measured 2026-11-22).  A spin of :data:`_SPIN_CYCLES` GPU cycles follows the flush so
    that the Python work of launching the timed call overlaps GPU work instead of being timed: in one H200 run the
    end-to-end ``quant_matmul`` medians of a few shapes came out 1.2x to 3x above the kernel's own median because
    the GPU had gone idle before the launch."""

    def __init__(self, device: torch.device, reps: int = TIMING_REPS, warmup: int = TIMING_WARMUP):
        props = torch.cuda.get_device_properties(device)
        self.flush = torch.ones(max(2 * props.L2_cache_size, 256 << 20) // 4, dtype=torch.float32, device=device)
        self.reps, self.warmup = reps, warmup

    def median_us(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            self.flush.sum()
            torch.cuda._sleep(_SPIN_CYCLES)  # keeps the GPU busy while Python enqueues the timed call
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1000.0


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# Largest relative error (Frobenius) a candidate may show against dequantize + cuBLAS: both accumulate in float32,
# so they differ by output rounding (2**-11 float16, 2**-8 bfloat16) and summation order; a broken kernel is O(1).
_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}


def autotune(w: QuantWeight, dtype: torch.dtype, bucket: int, timer: Timer | None = None) -> Choice:
    """Time every candidate path for ``bucket`` rows of ``dtype`` activations against ``w`` (on ``w``'s CUDA
    device), record the fastest correct one in the table and return the decision.

    A candidate is correct when its output on the tuning input is within :data:`_TOLERANCE` of the dequantize +
    cuBLAS path (whose dequantization is bit-identical to the reference); candidates that fail to compile, run out
    of resources or are wrong are listed in ``Choice.failed`` with the reason and never chosen."""
    device = _canonical(w.qweight.device)
    if device.type != "cuda":
        raise ValueError(f"autotuning needs CUDA tensors, got weights on {device}")
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"no tuned {w.precision.value} path for N={w.n}, K={w.k}, M bucket {bucket} during "
                           "CUDA graph capture: tune before capturing (morphserve.quant.dispatch.tune_shapes)")
    if bucket not in M_BUCKETS:
        raise ValueError(f"M bucket {bucket} is not one of {M_BUCKETS}")
    if dtype not in _TOLERANCE:
        raise ValueError(f"activation dtype {dtype} is not supported; use one of {tuple(_TOLERANCE)}")
    timer = timer or Timer(device)
    gen = torch.Generator(device=device).manual_seed(bucket)
    x = torch.randn(bucket, w.k, generator=gen, device=device, dtype=torch.float32).to(dtype)
    props = torch.cuda.get_device_properties(device)
    ref = run_path(Path("dequant_mm"), x, w)
    if not bool(torch.isfinite(ref).all()):
        # the slot does not hold this variant's bytes yet (a layer graph at the swap's new precision is warmed up
        # and captured before the copy lands; morphserve.engine.cuda_graphs): the kernels' speed does not depend on
        # the values, so tune on a well-formed weight of the same shape, which keeps the correctness check meaningful
        w = random_weight(w.precision, w.n, w.k, w.group_size, w.scales.dtype, device)
        ref = run_path(Path("dequant_mm"), x, w)
    times: dict[str, float] = {}
    failed: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for p in candidates(w, bucket, props.multi_processor_count):
        try:
            err = _rel_err(run_path(p, x, w), ref)
            if not err <= _TOLERANCE[dtype]:  # also catches NaN
                failed[p.name] = f"relative error {err:.3g} against dequantize + cuBLAS"
                continue
            times[p.name] = timer.median_us(lambda p=p: run_path(p, x, w))
            paths[p.name] = p
        except Exception as e:  # noqa: BLE001 - compile/resource errors of one config; recorded, never chosen
            failed[p.name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    if failed:
        _LOG.warning("W%s N=%d K=%d M<=%d: %d candidate(s) excluded: %s", w.precision.value[1:], w.n, w.k, bucket,
                     len(failed), "; ".join(f"{k}: {v}" for k, v in failed.items()))
    best = min(times, key=times.__getitem__)
    fp16_us = None
    scratch = dequant_scratch(device, dtype, w.n * w.k)
    if scratch.numel() >= w.n * w.k:  # the whole FP16 weight fits: time cuBLAS alone for comparison
        wd = scratch[:w.n * w.k].view(w.n, w.k)
        wd.copy_(w.dequantize())
        fp16_us = timer.median_us(lambda: torch.mm(x, wd.t()))
    choice = Choice(w.precision.value, w.n, w.k, w.group_size, str(dtype).removeprefix("torch."), str(device),
                    bucket, best, times[best], fp16_us, times, failed)
    key = _key(w, dtype, device, bucket)
    _TABLE[key] = choice
    _PATHS[key] = paths[best]
    return choice


def chosen_path(w: QuantWeight, dtype: torch.dtype, m: int) -> Path:
    """The path the dispatcher runs for ``m`` rows (tuning the bucket first if it is new)."""
    device = _canonical(w.qweight.device)
    key = _key(w, dtype, device, bucket_of(m))
    path = _PATHS.get(key)
    if path is None:
        autotune(w, dtype, key[-1])
        path = _PATHS[key]
    return path


def chosen_table() -> list[dict]:
    """Every tuned decision as a plain dict (for logs and result files)."""
    return [asdict(c) for c in _TABLE.values()]


def clear_table() -> None:
    _TABLE.clear()
    _PATHS.clear()


def random_weight(precision: Precision, n: int, k: int, group_size: int, dtype: torch.dtype,
                  device: torch.device | str, seed: int = 0) -> QuantWeight:
    """A random weight in the engine layout (random codes, scales ~1e-2, random zero points), for tuning and
    benchmarks: timing does not depend on the values."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if precision is Precision.W4:
        if group_size <= 0 or k % group_size or group_size % W4_PACK:
            raise ValueError(f"group size {group_size} must be a positive multiple of {W4_PACK} dividing K={k}")
        qw = torch.randint(-2**31, 2**31 - 1, (k // W4_PACK, n), generator=gen, device=device, dtype=torch.int32)
        s = (torch.rand(k // group_size, n, generator=gen, device=device) * 0.02 + 1e-3).to(dtype)
        z = torch.randint(0, 16, (k // group_size, n), generator=gen, device=device).to(dtype)
        return QuantWeight(precision, qw, s, z, group_size)
    if precision is Precision.W8:
        qw = torch.randint(-127, 128, (n, k), generator=gen, device=device, dtype=torch.int8)
        s = (torch.rand(n, generator=gen, device=device) * 0.02 + 1e-3).to(dtype)
        return QuantWeight(precision, qw, s)
    raise ValueError(f"precision {precision!r} is not quantized")


def tune_shapes(shapes: Iterable[tuple[int, int]], group_size: int, dtype: torch.dtype, device: torch.device | str,
                max_m: int = M_BUCKETS[-1], precisions: Iterable[Precision] = (Precision.W8, Precision.W4),
                progress: bool = True) -> list[Choice]:
    """Tune every ``(N, K)`` in ``shapes`` for every M bucket up to ``bucket_of(max_m)`` with random weights."""
    from tqdm import tqdm

    device = _canonical(device)
    buckets = [b for b in M_BUCKETS if b <= bucket_of(max_m)]
    jobs = [(p, n, k) for p in precisions for n, k in dict.fromkeys(shapes)]
    timer = Timer(device)
    out = []
    bar = tqdm(total=len(jobs) * len(buckets), desc="tuning W8/W4 linear paths", disable=not progress)
    for p, n, k in jobs:
        w = random_weight(p, n, k, group_size, dtype, device)
        for b in buckets:
            out.append(autotune(w, dtype, b, timer))
            bar.update()
        del w
    bar.close()
    return out


def tune_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, max_m: int,
               progress: bool = True) -> list[Choice]:
    """:func:`tune_shapes` for the four projections of ``cfg`` (a :class:`~morphserve.model.config.ModelConfig`)
    with its W4 group size; ``max_m`` is the most tokens one forward step runs."""
    from morphserve.quant.layouts import projection_shapes, w4_group_size

    return tune_shapes(projection_shapes(cfg).values(), w4_group_size(cfg), dtype, device, max_m,
                       progress=progress)


# ---- the registered linear functions ---------------------------------------------------------------------------------
def quant_matmul(x: torch.Tensor, w: QuantWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` of shape ``[..., K]``: references off CUDA, the tuned Triton path on CUDA.  ``out``
    (``x`` 2-D): a contiguous ``[M, N]`` tensor the result is written into."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has {x.shape[-1]} input features, the W{w.precision.value[1:]} weight {w.k}")
    if out is not None and x.dim() != 2:
        raise ValueError(f"quant_matmul with out= needs a 2-D x [M, K], got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.device.type != "cuda":
        y = reference_matmul(x2, w, out)
    elif x2.shape[0] == 0:
        y = output_buffer(out, 0, w.n, x2)
    else:
        y = run_path(chosen_path(w, x2.dtype, x2.shape[0]), x2, w, out)
    return y.reshape(*lead, w.n)


def linear_w4(x: torch.Tensor, lw: LayerWeights, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    return quant_matmul(x, QuantWeight.of(lw, name), out)


def linear_w8(x: torch.Tensor, lw: LayerWeights, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    return quant_matmul(x, QuantWeight.of(lw, name), out)


register_linear(Precision.W4, linear_w4)
register_linear(Precision.W8, linear_w8)
