"""The Llama decoder (data plane): weights in the arena, K/V in the paged pool, one forward per engine step.

A step's batch is flat: the scheduled tokens of every sequence concatenated (prefill chunks and single decode
tokens mixed), with per-sequence metadata in :class:`ForwardBatch`.  The forward is written once against a
:class:`~morphserve.model.kernel_set.KernelSet`: the pure-PyTorch reference set (CPU path and ground truth) or the
Triton set (the CUDA fast path), chosen per model (Triton on CUDA by default) or per call.  Projections always go
through :func:`~morphserve.model.linear.linear`, the precision dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from morphserve.memory.kv_pool import KVPool
from morphserve.memory.weight_arena import WeightArena
from morphserve.model.kernel_set import KernelSet, select_kernel_set
from morphserve.model.linear import linear
from morphserve.model.weight_source import WeightSource


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: global block id * block_size + offset, where each token's KV goes
    query_start: list[int]  # [S + 1]: sequence s owns rows query_start[s]:query_start[s+1]
    context_lens: list[int]  # [S]: tokens in the cache for s after this step
    block_tables: list[list[int]]  # [S][blocks]
    logits_indices: torch.Tensor  # [S'] rows whose next-token logits are needed
    # The same metadata as device tensors (int64), uploaded once per step by the model runner for the Triton
    # kernels; None when the caller built only the lists (the kernels then upload them).
    query_start_t: torch.Tensor | None = None  # [S + 1]
    context_lens_t: torch.Tensor | None = None  # [S]
    block_tables_t: torch.Tensor | None = None  # [S, W], padded with 0
    num_splits: int | None = None  # decode attention context splits, pinned by the CUDA-graph runner
    # Device views of the arrays the kernel set asked to have uploaded with the step (KernelSet.upload_regions, in
    # its order; the Triton set's prefill tile map), regions of the same packed upload.
    kernel_regions: tuple[torch.Tensor, ...] = ()

    def samples_every_row(self) -> bool:
        """Whether ``logits_indices`` is every row in order: a decode-only step (one row per sequence) in which
        every sequence samples (the model runner and the CUDA-graph runner list sampling rows in ascending order)."""
        t = self.token_ids.shape[0]
        qs = self.query_start
        return self.logits_indices.shape[0] == t and len(qs) == t + 1 and all(int(a) == i for i, a in enumerate(qs))


class LayerHooks(Protocol):
    """Called by :meth:`LlamaModel.forward` around each layer (implemented by the layer swapper)."""

    def before_forward(self) -> None:
        """Called by the runner before every forward, whether :meth:`active` or not (orders the step after work
        the hooks left on other streams)."""
        ...

    def before_layer(self, layer: int) -> None: ...

    def after_layer(self, layer: int) -> None: ...

    def after_step(self) -> None: ...

    def active(self) -> bool:
        """True while the hooks have work in a step (else steps may run without them)."""
        ...

    def step_precision(self, layer: int):
        """The precision layer ``layer`` runs at in the next step (its ``before_layer`` may switch it)."""
        ...


class LlamaModel:
    def __init__(self, source: WeightSource, dtype: torch.dtype, device: torch.device | str,
                 kernels: KernelSet | str | None = None):
        """``kernels``: a :class:`KernelSet`, its name ("reference", "triton"), or None for the device's default
        (Triton on CUDA, the reference set on CPU)."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        cfg = self.cfg = source.config
        self.dtype = dtype
        self.device = torch.device(device)
        self.synthetic = source.synthetic
        self.arena = WeightArena(cfg, dtype, self.device)
        h = cfg.hidden_size
        self.embed = torch.empty(cfg.vocab_size, h, dtype=dtype, device=self.device)
        self.final_norm = torch.empty(h, dtype=dtype, device=self.device)
        self.lm_head = self.embed if cfg.tie_word_embeddings else torch.empty_like(self.embed)
        self._load(source)
        # RoPE tables through transformers' own initialisers (every rope_type, attention scaling included).
        rope = LlamaRotaryEmbedding(cfg.to_hf())
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, rope.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * rope.attention_scaling).to(dtype=dtype, device=self.device)
        self.sin = (emb.sin() * rope.attention_scaling).to(dtype=dtype, device=self.device)
        self.scale = cfg.head_dim ** -0.5
        self.kernels = kernels if isinstance(kernels, KernelSet) else select_kernel_set(self.device, kernels)

    @torch.no_grad()
    def _load(self, source: WeightSource) -> None:
        cfg = self.cfg
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        source.load_into("model.embed_tokens.weight", self.embed)
        source.load_into("model.norm.weight", self.final_norm)
        if not cfg.tie_word_embeddings:
            source.load_into("lm_head.weight", self.lm_head)
        for i in tqdm(range(cfg.num_layers), desc=f"loading {cfg.name}", unit="layer", leave=False,
                      disable=cfg.num_layers < 8):
            w = self.arena.layers[i].tensors
            p = f"model.layers.{i}."
            source.load_into(p + "input_layernorm.weight", w["input_norm"])
            source.load_into(p + "self_attn.q_proj.weight", w["qkv"][:q])
            source.load_into(p + "self_attn.k_proj.weight", w["qkv"][q:q + kv])
            source.load_into(p + "self_attn.v_proj.weight", w["qkv"][q + kv:])
            source.load_into(p + "self_attn.o_proj.weight", w["o"])
            source.load_into(p + "post_attention_layernorm.weight", w["post_norm"])
            source.load_into(p + "mlp.gate_proj.weight", w["gate_up"][:inter])
            source.load_into(p + "mlp.up_proj.weight", w["gate_up"][inter:])
            source.load_into(p + "mlp.down_proj.weight", w["down"])

    def weight_bytes(self) -> int:
        extra = self.embed.numel() * (1 if self.cfg.tie_word_embeddings else 2) + self.final_norm.numel()
        return self.arena.nbytes + extra * self.dtype.itemsize

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, pool: KVPool, kernels: KernelSet | None = None,
                hooks: LayerHooks | None = None) -> torch.Tensor:
        """Runs every layer on the batch, writing this step's K/V into the pool; returns float32 logits for
        ``batch.logits_indices``.  ``kernels`` overrides the model's kernel set for this call.  ``hooks`` (the layer
        swapper) run before and after each layer: a layer's views are read only after its ``before_layer``, which
        may switch it to a new precision once that variant's copy has landed."""
        ks = kernels or self.kernels
        state = ks.begin(self, batch, pool)
        with ks.linear_scope():
            try:
                x, residual = self.embed[batch.token_ids], None
                for i in range(self.cfg.num_layers):
                    if hooks is not None:
                        hooks.before_layer(i)
                    x, residual = self.layer_forward(i, x, residual, state, pool, ks)
                    if hooks is not None:
                        hooks.after_layer(i)
                if hooks is not None:
                    hooks.after_step()
                return self.head(x, residual, batch.logits_indices, ks, batch.samples_every_row())
            except BaseException:
                ks.abandon()
                raise

    def layer_forward(self, i: int, x: torch.Tensor, residual: torch.Tensor | None, state, pool: KVPool,
                      ks: KernelSet, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer ``i`` at its current precision: ``(x, residual)`` in, ``(x, residual)`` out (``residual``
        is None before the first layer, whose input is the embedding).  ``state`` is ``ks.begin(...)``'s; the
        caller has entered ``ks.linear_scope()``.  ``out``: where the layer's output ``x`` is written (the last
        projection writes it there; it may be the input ``x``, which is read only before).  :meth:`forward` runs
        the layers through this, and so does the per-layer CUDA-graph runner (:mod:`morphserve.engine.cuda_graphs`)."""
        eps = self.cfg.rms_norm_eps
        lw = self.arena.layers[i]
        if residual is None:
            residual, h = x, ks.rms_norm(x, lw["input_norm"], eps)
        else:
            h, residual = ks.add_rms_norm(x, residual, lw["input_norm"], eps)
        # ks.projection: results only ks's kernels read (the Triton set may hand them over as accumulated sums)
        x = ks.projection(ks.rope_store_attention(ks.projection(h, lw, "qkv"), state, pool, lw.index), lw, "o")
        h, residual = ks.add_rms_norm(x, residual, lw["post_norm"], eps)
        act = ks.silu_and_mul(ks.projection(h, lw, "gate_up"))
        # with ``out`` the next layer (a separate graph) reads a plain tensor there; without, its add_rms_norm
        # (or the head) takes the result in the form ks gives it
        x = linear(act, lw, "down", out) if out is not None else ks.projection(act, lw, "down")
        return x, residual

    def head(self, x: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor, ks: KernelSet,
             every_row: bool = False) -> torch.Tensor:
        """float32 logits of ``rows`` after the last layer (the final norm is row-wise: only those rows).
        ``every_row`` (:meth:`ForwardBatch.samples_every_row`): ``rows`` is every row in order, so nothing is
        gathered; the final add then updates ``residual`` in place (the Triton set), which is not read again."""
        eps = self.cfg.rms_norm_eps
        if every_row:
            h, _ = ks.add_rms_norm(x, residual, self.final_norm, eps)
        else:
            x = ks.finish(x)
            h, _ = ks.add_rms_norm(x[rows], residual[rows], self.final_norm, eps)
        return ks.lm_head(h, self.lm_head)
