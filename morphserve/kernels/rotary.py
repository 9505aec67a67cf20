"""Rotary position embedding (rotate-half RoPE, as transformers' Llama) in Triton.

Reference: :func:`morphserve.kernels.reference.rotary`, which computes ``x * cos + rotate_half(x) * sin`` with
``cos``/``sin`` gathered at each token's position in the activation dtype.  The kernel rounds exactly where the
reference does (each product to the activation dtype, then the sum), so in float16 the two agree to the last bit
except where the hardware's fused paths differ.

``cos``/``sin`` are the model's full tables (``[max_position, head_dim]``); the kernel gathers the row of each
token's position itself, so a step passes only its ``positions`` (int64, on the device).

:func:`rope_rotate` is the shared ``@triton.jit`` helper; the KV-store kernel (:mod:`.kv_store`) fuses it with the
store of K and V, which is what the engine runs.  :func:`rotary` is the standalone kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.triton_support import launch_options


@triton.jit
def rope_rotate(x, x_partner, cos, sin, d, HALF: tl.constexpr):
    """Rotate rows ``x`` (``[R, D]``) whose rotate-half partners (element ``(d + HALF) % D``) are ``x_partner``;
    ``cos``/``sin`` are ``[D]`` (or broadcastable).  Rounds like the reference: products, then sum, in x's dtype."""
    rot = tl.where(d < HALF, -x_partner, x_partner)
    a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)
    b = (rot.to(tl.float32) * sin.to(tl.float32)).to(x.dtype)
    return (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, pos_ptr, cos_ptr, sin_ptr, num_heads, stride_xt, stride_xh, stride_ot,
                   stride_oh, D: tl.constexpr, HEADS_P2: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, D)
    h = tl.arange(0, HEADS_P2)[:, None]
    hmask = h < num_heads
    cos = tl.load(cos_ptr + pos * D + d)[None, :]
    sin = tl.load(sin_ptr + pos * D + d)[None, :]
    row = x_ptr + t * stride_xt + h * stride_xh
    x = tl.load(row + d[None, :], mask=hmask, other=0.0)
    xp = tl.load(row + ((d + D // 2) % D)[None, :], mask=hmask, other=0.0)
    y = rope_rotate(x, xp, cos, sin, d[None, :], D // 2)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d[None, :], y, mask=hmask)


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` (``[T, heads, head_dim]``, last dim contiguous) at ``positions`` (``[T]`` int64) with the full
    ``cos``/``sin`` tables (``[max_position, head_dim]``, x's dtype); returns a new contiguous tensor."""
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"rotary expects [T, heads, head_dim] with a contiguous last dim, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    t, heads, d = x.shape
    if d & (d - 1) or cos.shape[-1] != d or cos.dtype != x.dtype or sin.shape != cos.shape:
        raise ValueError(f"rotary: head_dim {d} must be a power of two matching cos/sin {tuple(cos.shape)} "
                         f"{cos.dtype} (x is {x.dtype})")
    if positions.shape != (t,):
        raise ValueError(f"rotary: positions has shape {tuple(positions.shape)}, expected ({t},)")
    out = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    if t:
        _rotary_kernel[(t,)](x, out, positions, cos, sin, heads, x.stride(0), x.stride(1), out.stride(0),
                             out.stride(1), D=d, HEADS_P2=triton.next_power_of_2(heads), **launch_options(x.device))
    return out
