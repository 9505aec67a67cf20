"""Pure-PyTorch reference implementations of every kernel the engine runs.

These are the CPU path and the ground truth that each GPU kernel is tested against.  Numerics follow transformers'
Llama implementation (RMSNorm in float32 then cast, rotate-half RoPE with cos/sin in the activation dtype) so that
greedy decoding matches ``transformers.generate`` token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from morphserve.memory.kv_pool import KVPool


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x``; returns ``(rms_norm(residual), residual)``."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE.  ``x``: ``[T, heads, head_dim]``; ``cos``/``sin``: ``[T, head_dim]`` (already gathered at
    each token's position and cast to ``x``'s dtype)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def paged_attention(q: torch.Tensor, pool: KVPool, layer: int, query_start: list[int], context_lens: list[int],
                    block_tables: list[list[int]], scale: float) -> torch.Tensor:
    """Causal attention of a flattened batch of sequences against the paged cache (which already holds this
    step's keys/values).  Sequence ``s`` owns query rows ``query_start[s]:query_start[s+1]``; those are the last
    tokens of its ``context_lens[s]`` cached tokens.  Returns ``[T, heads * head_dim]``."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // pool.cfg.num_kv_heads
    out = torch.empty(q.shape[0], num_heads * head_dim, dtype=q.dtype, device=q.device)
    for s, ctx in enumerate(context_lens):
        q0, q1 = query_start[s], query_start[s + 1]
        n = q1 - q0
        ids = torch.tensor(block_tables[s][:(ctx + pool.block_size - 1) // pool.block_size],
                           dtype=torch.int64, device=q.device)
        k, v = pool.gather(layer, ids, ctx)
        k = k.to(q.dtype).transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, ctx, hd]
        v = v.to(q.dtype).transpose(0, 1).repeat_interleave(group, dim=0)
        qs = q[q0:q1].transpose(0, 1)  # [heads, n, hd]
        qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos  # [n, ctx]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        out[q0:q1] = o.transpose(0, 1).reshape(n, num_heads * head_dim)
    return out


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The index of the first maximum of each row (int64 ``[S]``), as transformers' greedy search picks it."""
    return logits.argmax(dim=-1)


def feed_tokens(tokens: torch.Tensor, feed: torch.Tensor) -> None:
    """Replace the placeholders in a step's device input ``tokens`` in place: ``-(1 + r)`` stands for row ``r`` of
    ``feed``, the tokens the step in flight samples (asynchronous steps; stream order makes them ready).  Device
    operations only: nothing waits for the device."""
    hole = tokens < 0
    rows = (-tokens - 1).clamp_(0, feed.shape[0] - 1)
    tokens.copy_(torch.where(hole, feed.index_select(0, rows), tokens))
