"""The Llama decoder (data plane): weights in the arena, KV in the paged pool, one forward per engine step.

A step's batch is flat: the scheduled tokens of every sequence concatenated (prefill chunks and single decode
tokens mixed), with per-sequence metadata in :class:`ForwardBatch`.  Kernels come from a :class:`KernelSet`; this
issue ships the pure-PyTorch reference set, which runs on CPU and CUDA alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from morphserve.kernels import reference as ref
from morphserve.memory.kv_pool import KVPool
from morphserve.memory.weight_arena import WeightArena
from morphserve.model.config import ModelConfig
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


class LlamaModel:
    def __init__(self, source: WeightSource, dtype: torch.dtype, device: torch.device | str):
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
    def forward(self, batch: ForwardBatch, pool: KVPool) -> torch.Tensor:
        """Runs every layer on the batch, writing this step's K/V into the pool; returns float32 logits for
        ``batch.logits_indices``."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        q_size, kv_size = cfg.q_size, cfg.kv_size
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]
        x = self.embed[batch.token_ids]
        residual = None
        for lw in self.arena.layers:
            if residual is None:
                residual, h = x, ref.rms_norm(x, lw["input_norm"], eps)
            else:
                h, residual = ref.add_rms_norm(x, residual, lw["input_norm"], eps)
            qkv = linear(h, lw, "qkv")
            qh = qkv[:, :q_size].view(-1, cfg.num_heads, cfg.head_dim)
            kh = qkv[:, q_size:q_size + kv_size].view(-1, cfg.num_kv_heads, cfg.head_dim)
            vh = qkv[:, q_size + kv_size:].view(-1, cfg.num_kv_heads, cfg.head_dim)
            qh, kh = ref.rotary(qh, cos, sin), ref.rotary(kh, cos, sin)
            pool.store(lw.index, kh, vh, batch.slot_mapping)
            attn = ref.paged_attention(qh, pool, lw.index, batch.query_start, batch.context_lens,
                                       batch.block_tables, self.scale)
            x = linear(attn, lw, "o")
            h, residual = ref.add_rms_norm(x, residual, lw["post_norm"], eps)
            x = linear(ref.silu_and_mul(linear(h, lw, "gate_up")), lw, "down")
        h, _ = ref.add_rms_norm(x, residual, self.final_norm, eps)
        h = h[batch.logits_indices]
        return torch.nn.functional.linear(h, self.lm_head).float()
