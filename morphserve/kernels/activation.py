"""SiLU-and-multiply (the SwiGLU gate of the Llama MLP) in Triton.

Reference: :func:`morphserve.kernels.reference.silu_and_mul`: ``silu(gate) * up`` with ``gate_up = [gate | up]``
along the last dimension (the layout of the fused ``gate_up`` projection).  As in PyTorch, ``silu`` is computed in
float32 and rounded to the activation dtype before the product, which is rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.split_accum import Accumulated, input_args, load_input, zero_input
from morphserve.kernels.triton_support import launch_options, tl_dtype


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, part_stride, BLOCK: tl.constexpr, PARTS: tl.constexpr,
                         DTYPE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < n
    row = x_ptr + t * stride_x
    g = load_input(row, c, m, PARTS, part_stride, DTYPE)
    u = load_input(row + n, c, m, PARTS, part_stride, DTYPE)
    zero_input(row, c, m, PARTS, part_stride)
    zero_input(row + n, c, m, PARTS, part_stride)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + t * stride_o + c, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def silu_and_mul(gate_up: "torch.Tensor | Accumulated") -> torch.Tensor:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]`` for ``gate_up`` of shape ``[T, 2 * I]`` (or the projection's
    accumulated sums: :mod:`morphserve.kernels.split_accum`)."""
    if (len(gate_up.shape) != 2 or gate_up.shape[1] % 2
            or (isinstance(gate_up, torch.Tensor) and gate_up.stride(1) != 1)):
        raise ValueError(f"silu_and_mul expects [T, 2*I] with contiguous rows, got {tuple(gate_up.shape)}")
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        xp, stride_x, parts, part_stride = input_args(gate_up)
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](xp, out, n, stride_x, out.stride(0), part_stride, BLOCK=block,
                                                         PARTS=parts, DTYPE=tl_dtype(gate_up.dtype), num_warps=4,
                                                         **launch_options(gate_up.device))
    return out
