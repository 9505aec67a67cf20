"""The kernels a forward pass runs, behind one interface: the pure-PyTorch reference set and the Triton set.

:class:`LlamaModel.forward <morphserve.model.llama.LlamaModel.forward>` is written once against
:class:`KernelSet`; the set decides how each step is computed:

=====================  ===========================================  ==============================================
operation              :class:`ReferenceKernels` (CPU path, truth)  :class:`TritonKernels` (the CUDA fast path)
=====================  ===========================================  ==============================================
RMSNorm (+ residual)   ``reference.rms_norm`` / ``add_rms_norm``    :mod:`morphserve.kernels.norm` (in place)
RoPE + KV store        ``reference.rotary`` + ``KVPool.store``      :func:`morphserve.kernels.kv_store.rope_and_store`
paged attention        ``reference.paged_attention`` (per seq)      :mod:`morphserve.kernels.attention` (decode steps:
                                                                    RoPE + KV store in the same launch,
                                                                    :func:`.attention.rope_store_decode`)
SiLU-and-mul           ``reference.silu_and_mul``                   :mod:`morphserve.kernels.activation`
projections            ``linear()`` -> ``F.linear``                 ``linear()`` -> Triton GEMV at small M (fp16/bf16);
                                                                    batch-1 split-K sums accumulated for the consumer
LM head                ``F.linear``                                 Triton GEMV at small M, else ``F.linear``
greedy argmax          ``reference.greedy`` (``torch.argmax``)      :mod:`morphserve.kernels.argmax`
token feed (async)     ``reference.feed_tokens``                    :mod:`morphserve.kernels.token_feed`
=====================  ===========================================  ==============================================

Projections always go through :func:`morphserve.model.linear.linear` (the precision dispatch); the Triton set
only opens the :func:`morphserve.kernels.gemv.enabled` scope around the forward, in which the FP16 kernel takes
the Triton path for small batches.

:meth:`KernelSet.begin` turns a :class:`~morphserve.model.llama.ForwardBatch` into the per-step state its kernels
need (the reference set gathers the RoPE rows; the Triton set builds :class:`PagedAttentionMetadata`, reusing the
device tensors the model runner uploaded).  A set that needs more per-step host data on the device names it in
:meth:`KernelSet.upload_regions`: the model runner uploads those arrays as more regions of the step's one packed
upload (:meth:`~morphserve.engine.model_runner.ModelRunner.upload`), never by copies of their own; the Triton set
sends its prefill tile map this way.  :func:`select_kernel_set` picks the Triton set on CUDA and the
reference set on CPU.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

import numpy as np
import torch
import torch.nn.functional as F

from morphserve.kernels import reference as ref
from morphserve.kernels.triton_support import interpreting, triton_usable
from morphserve.memory.kv_pool import KVPool
from morphserve.memory.weight_arena import LayerWeights, Precision
from morphserve.model.linear import linear

if TYPE_CHECKING:
    from morphserve.model.llama import ForwardBatch, LlamaModel


class KernelSet(ABC):
    """One implementation of every non-projection kernel of the decoder (see the module docstring)."""

    name: str

    @abstractmethod
    def begin(self, model: "LlamaModel", batch: "ForwardBatch", pool: KVPool) -> Any:
        """Per-step state shared by the layers of one forward."""

    def upload_regions(self, query_start: np.ndarray) -> tuple[np.ndarray, ...]:
        """1-D int64 host arrays this set's kernels read in a step whose sequence ``s`` owns the query rows
        ``query_start[s]:query_start[s+1]``.  The model runner uploads them with the step's other metadata, in one
        packed upload, and hands their device views to :meth:`begin` as ``batch.kernel_regions`` (in this order).
        Default: none."""
        return ()

    def linear_scope(self) -> ContextManager[None]:
        """Context entered around the forward (how projections are routed)."""
        return contextlib.nullcontext()

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    @abstractmethod
    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` and its RMSNorm: returns ``(normed, new residual)``."""

    @abstractmethod
    def rope_and_store(self, qkv: torch.Tensor, state: Any, pool: KVPool, layer: int) -> torch.Tensor:
        """Rotate Q and K of the fused projection, store K/V of ``layer``; returns Q ``[T, heads, head_dim]``."""

    @abstractmethod
    def attention(self, q: torch.Tensor, state: Any, pool: KVPool, layer: int) -> torch.Tensor:
        """Causal paged attention of ``q`` against the cache; returns ``[T, heads * head_dim]``."""

    def rope_store_attention(self, qkv: Any, state: Any, pool: KVPool, layer: int) -> torch.Tensor:
        """:meth:`rope_and_store` then :meth:`attention`: ``qkv`` (a :meth:`projection` result) in, the attention
        output ``[T, heads * head_dim]`` out.  A set may fuse the two (the Triton set, in decode steps)."""
        return self.attention(self.rope_and_store(qkv, state, pool, layer), state, pool, layer)

    @abstractmethod
    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...

    def projection(self, x: torch.Tensor, lw: LayerWeights, name: str) -> Any:
        """``linear(x, lw, name)`` for a result that only this set's kernels consume (RoPE + KV store, add-RMSNorm,
        SiLU-and-multiply); a set may return a form that they read directly (the Triton set: a batch-1 split-K
        product's accumulated sums, :mod:`morphserve.kernels.split_accum`).  Default: the tensor."""
        return linear(x, lw, name)

    def finish(self, x: Any) -> torch.Tensor:
        """A :meth:`projection` result as a tensor."""
        return x

    def abandon(self) -> None:
        """Called when a forward fails part-way: drop state a produced result left for a consumer that never ran."""

    @abstractmethod
    def lm_head(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """float32 logits ``h @ weight.T``."""

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """The argmax of each row of ``logits`` (int64 ``[S]``; the first maximum, as ``torch.argmax``)."""
        return ref.greedy(logits)

    def feed_tokens(self, tokens: torch.Tensor, feed: torch.Tensor) -> None:
        """Replace the placeholders ``-(1 + r)`` of a step's device input ``tokens`` by ``feed[r]`` (asynchronous
        steps: the tokens of the step in flight), in place, without waiting for the device."""
        ref.feed_tokens(tokens, feed)


@dataclass
class _ReferenceState:
    batch: "ForwardBatch"
    cos: torch.Tensor  # [T, head_dim], gathered at each token's position
    sin: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float


class ReferenceKernels(KernelSet):
    """The pure-PyTorch kernels of :mod:`morphserve.kernels.reference` (runs on CPU and CUDA)."""

    name = "reference"

    def begin(self, model: "LlamaModel", batch: "ForwardBatch", pool: KVPool) -> _ReferenceState:
        cfg = model.cfg
        return _ReferenceState(batch, model.cos[batch.positions], model.sin[batch.positions], cfg.num_heads,
                               cfg.num_kv_heads, cfg.head_dim, model.scale)

    def rms_norm(self, x, weight, eps):
        return ref.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return ref.add_rms_norm(x, residual, weight, eps)

    def rope_and_store(self, qkv, state: _ReferenceState, pool, layer):
        q_size, kv_size = state.num_heads * state.head_dim, state.num_kv_heads * state.head_dim
        qh = qkv[:, :q_size].view(-1, state.num_heads, state.head_dim)
        kh = qkv[:, q_size:q_size + kv_size].view(-1, state.num_kv_heads, state.head_dim)
        vh = qkv[:, q_size + kv_size:].view(-1, state.num_kv_heads, state.head_dim)
        qh, kh = ref.rotary(qh, state.cos, state.sin), ref.rotary(kh, state.cos, state.sin)
        pool.store(layer, kh, vh, state.batch.slot_mapping)
        return qh

    def attention(self, q, state: _ReferenceState, pool, layer):
        b = state.batch
        return ref.paged_attention(q, pool, layer, b.query_start, b.context_lens, b.block_tables, state.scale)

    def silu_and_mul(self, gate_up):
        return ref.silu_and_mul(gate_up)

    def lm_head(self, h, weight):
        return F.linear(h, weight).float()


@dataclass
class _TritonState:
    batch: "ForwardBatch"
    addr: Any  # KVAddress
    meta: Any  # PagedAttentionMetadata
    cos: torch.Tensor  # full tables [max_position, head_dim]
    sin: torch.Tensor
    num_heads: int
    scale: float


def _max_query_len(query_start: np.ndarray) -> int:
    """The longest sequence's query rows in a step (0 for a step without sequences)."""
    return int(np.diff(query_start).max()) if len(query_start) > 1 else 0


class TritonKernels(KernelSet):
    """The Triton kernels (compiled on CUDA; under the interpreter on CPU, for tests)."""

    name = "triton"

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        if not triton_usable(device):
            hint = ("CUDA tensors need compiled kernels: unset TRITON_INTERPRET" if device.type == "cuda" else
                    "on CPU they run only under the interpreter (morphserve.kernels.triton_support."
                    "enable_interpreter() before importing the kernels)")
            raise ValueError(f"Triton kernels cannot run on device {str(device)!r}: {hint}")
        # Imported here: the kernel modules decorate @triton.jit functions, which must happen after the
        # interpreter switch on CPU, and the CPU reference path never needs Triton.
        from morphserve.kernels import activation, argmax, attention, gemv, kv_store, norm, split_accum, token_feed

        self._activation, self._attention, self._gemv = activation, attention, gemv
        self._kv_store, self._norm, self._split_accum = kv_store, norm, split_accum
        self._argmax, self._token_feed = argmax, token_feed
        self.device = device
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 4)
        self._addr: dict[int, Any] = {}

    def address(self, pool: KVPool) -> Any:
        addr = self._addr.get(id(pool))
        if addr is None or addr.seg_base_ptr is not pool.seg_base_ptr:
            addr = self._addr[id(pool)] = self._kv_store.KVAddress.of(pool)
        return addr

    def upload_regions(self, query_start: np.ndarray) -> tuple[np.ndarray, ...]:
        """The prefill tile map (tile -> sequence, tile -> first query row) of a step that is not decode-only; none
        for a decode step.  Uploaded with the step's metadata: a pageable copy of its own would block the host and,
        on the copy engine, wait behind a layer swap's copy in flight (see :mod:`morphserve.kernels.host_upload`)."""
        if _max_query_len(query_start) == 1:
            return ()
        return self._attention.prefill_tile_map_host(np.asarray(query_start, dtype=np.int64))

    def metadata(self, batch: "ForwardBatch", num_kv_heads: int, group: int = 1) -> Any:
        """The attention metadata of ``batch``: its uploaded device tensors, plus the prefill tile map (uploaded with
        them, see :meth:`upload_regions`) or the decode split count.  A batch without device metadata (built from
        lists) has its metadata and tile map copied to the device here."""
        attn = self._attention
        if batch.query_start_t is None or batch.context_lens_t is None or batch.block_tables_t is None:
            meta = attn.PagedAttentionMetadata.from_lists(batch.query_start, batch.context_lens,
                                                          batch.block_tables, batch.token_ids.device)
        else:
            meta = attn.PagedAttentionMetadata(batch.query_start_t, batch.context_lens_t, batch.block_tables_t,
                                               _max_query_len(np.asarray(batch.query_start, dtype=np.int64)))
            if not meta.is_decode:
                if len(batch.kernel_regions) != 2:
                    raise ValueError(f"a prefill batch with device metadata needs its tile map uploaded with it "
                                     f"(2 kernel regions, from TritonKernels.upload_regions), got "
                                     f"{len(batch.kernel_regions)} regions")
                meta.tile_seq, meta.tile_start = batch.kernel_regions
        if meta.is_decode:
            meta.num_splits = batch.num_splits or attn.decode_splits(meta.num_seqs, num_kv_heads, self.num_sms,
                                                                     group=group)
        return meta

    def begin(self, model: "LlamaModel", batch: "ForwardBatch", pool: KVPool) -> _TritonState:
        cfg = model.cfg
        meta = self.metadata(batch, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads)
        return _TritonState(batch, self.address(pool), meta, model.cos, model.sin, cfg.num_heads, model.scale)

    def linear_scope(self):
        return self._gemv.enabled()

    def rms_norm(self, x, weight, eps):
        return self._norm.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self._norm.add_rms_norm(x, residual, weight, eps)

    def rope_and_store(self, qkv, state: _TritonState, pool, layer):
        b = state.batch
        return self._kv_store.rope_and_store(qkv, state.num_heads, b.positions, state.cos, state.sin, state.addr,
                                             layer, b.slot_mapping)

    def attention(self, q, state: _TritonState, pool, layer):
        return self._attention.paged_attention(q, state.addr, layer, state.meta, state.scale)

    def rope_store_attention(self, qkv, state: _TritonState, pool, layer):
        b, meta = state.batch, state.meta
        # one launch (rope_store_decode) in decode steps that split the context (small batches): there it saves
        # about 1% of a batch-1 step (BENCHMARKS.md, fast path, thirteenth campaign).  With one split per sequence
        # (batch 32 and up on an H200) every program would pay the rotation and the store before its loop; that
        # case is not measured yet, so those steps keep the separate RoPE kernel
        if meta.is_decode and meta.num_splits > 1 and self._attention.FUSE_ROPE_DECODE:
            return self._attention.rope_store_decode(qkv, state.num_heads, b.positions, state.cos, state.sin,
                                                     state.addr, layer, b.slot_mapping, meta, state.scale)
        return super().rope_store_attention(qkv, state, pool, layer)

    def silu_and_mul(self, gate_up):
        return self._activation.silu_and_mul(gate_up)

    def projection(self, x, lw, name):
        if lw.precision is Precision.FP16:  # the FP16 kernel, asked to hand batch-1 split-K sums over as they are
            return self._gemv.matmul(x, lw.tensors[name], accumulate=True)
        return linear(x, lw, name)  # quantized layers: their own kernels

    def finish(self, x):
        return self._split_accum.finish(x)

    def abandon(self):
        self._split_accum.reset()

    def lm_head(self, h, weight):
        # accumulated sums are rounded to h's dtype and widened in one kernel; a tensor is widened as it is
        return self._split_accum.finish(self._gemv.matmul(h, weight, accumulate=True), dtype=torch.float32)

    def greedy(self, logits):
        return self._argmax.greedy(logits)

    def feed_tokens(self, tokens, feed):
        self._token_feed.feed_tokens(tokens, feed)


KERNEL_SETS = ("reference", "triton")


def select_kernel_set(device: torch.device | str, name: str | None = None) -> KernelSet:
    """``name`` ("reference" or "triton"), or by default: Triton on CUDA, the reference set elsewhere (also on
    CPU under the Triton interpreter, which is for tests that ask for it by name)."""
    device = torch.device(device)
    if name is None:
        name = "triton" if device.type == "cuda" and not interpreting() else "reference"
    if name == "reference":
        return ReferenceKernels()
    if name == "triton":
        return TritonKernels(device)
    raise ValueError(f"unknown kernel set {name!r}; choose one of {KERNEL_SETS}")
