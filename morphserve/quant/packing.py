"""The engine's storage format for quantized linear weights, and its pure-PyTorch reference.

This module *is* the layout specification that the GPU kernels (``morphserve/kernels/w4a16.py``,
``morphserve/kernels/w8a16.py``) are written against.  Every source of quantized weights (round-to-nearest,
AWQ GEMM checkpoints, compressed-tensors checkpoints, llm-compressor calibration) converts into it.

A linear weight ``W`` has shape ``[N, K]`` (out features, in features), as in ``torch.nn.functional.linear``.
Per decoder layer the projections are ``qkv`` (``K = hidden``), ``o`` (``K = q_size``), ``gate_up``
(``K = hidden``) and ``down`` (``K = intermediate``); ``qkv`` rows are ``[q; k; v]`` and ``gate_up`` rows are
``[gate; up]`` (see :mod:`morphserve.memory.weight_arena`).

W4: asymmetric 4-bit, groups of ``G`` consecutive input features (``G`` divides ``K``; ``R = G / 8`` word rows
per group)
    ``{name}.qweight``  int32       ``[K // 8, N]``  bits ``4j .. 4j+3`` (``j = 0..7``, least significant first) of
                                                   ``qweight[g R + r, n]`` hold the code of ``W[n, g G + j R + r]``:
                                                   *position-major within each group* (word row ``r`` of group ``g``
                                                   holds the inputs ``r, r + R, ..., r + 7R`` of the group), neither
                                                   natural order nor AWQ's interleaved ``[0,2,4,6,1,3,5,7]``.
                                                   Codes are unsigned, ``q in [0, 15]``.
    ``{name}.scales``   model dtype ``[K // G, N]``  one scale per (group, output channel).
    ``{name}.zeros``    model dtype ``[K // G, N]``  the integer zero point ``z in [0, 15]`` stored as a float
                                                   (exact in float16/bfloat16/float32).
    ``W[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n]``.

W8: symmetric 8-bit, one scale per output channel
    ``{name}.qweight``  int8        ``[N, K]``      codes ``q in [-127, 127]`` (row-major, like the FP16 weight).
    ``{name}.scales``   model dtype ``[N]``
    ``W[n, k] = q[n, k] * s[n]``.

Packing W4 along K with output channels contiguous (``[K // 8, N]``) lets a GEMM kernel load one int32 row per 8
reduction steps for a contiguous tile of output channels (coalesced along N), the way AWQ's and GPTQ's kernels read
their weights, and keeps a nibble trivial to unpack (``(word >> 4j) & 0xF``).  The position-major order inside a
group is for the activations: a kernel multiplies nibble ``j`` of the group's ``R`` word rows with the ``R``
*consecutive* inputs ``x[g G + j R : g G + (j + 1) R]``, so a tensor-core kernel streams those slices straight from
memory into its operand buffers; in natural order they were ``R`` inputs 8 apart, which had to be gathered and
re-stored in registers before every product (measured on an H200, 2026-12-03: BENCHMARKS.md, issue #3).  The order
depends on ``G``, so packing and unpacking take the group size.

The references below compute ``(q - z) * s`` in float32 and round once to the scale dtype.  For float16 scales this
is bit-identical to computing in float16 (``q - z`` is a small integer, so the float32 product is exact and the one
rounding is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morphserve.memory.weight_arena import LayerWeights
from morphserve.model.linear import dense_linear

W4_PACK = 8  # 4-bit codes per int32 word
W4_MAX_CODE = 15
W8_MAX_CODE = 127

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # bit offset of code j inside its word


class QuantFormatError(ValueError):
    """Quantized tensors that do not follow the engine layout (or a checkpoint format); names the bad value."""


@dataclass(frozen=True)
class W4Weight:
    """One linear weight in the engine's W4 layout (see the module docstring)."""

    qweight: torch.Tensor  # int32 [K // 8, N]
    scales: torch.Tensor  # model dtype [K // G, N]
    zeros: torch.Tensor  # model dtype [K // G, N], integer values 0..15
    group_size: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * W4_PACK

    def validate(self, name: str) -> "W4Weight":
        check_w4(name, self.qweight, self.scales, self.zeros, self.group_size)
        return self

    def dequantize(self) -> torch.Tensor:
        return dequantize_w4(self.qweight, self.scales, self.zeros, self.group_size)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors under their slot names ``{name}.qweight`` etc."""
        return {f"{name}.qweight": self.qweight, f"{name}.scales": self.scales, f"{name}.zeros": self.zeros}

    @staticmethod
    def concat_out(parts: list["W4Weight"]) -> "W4Weight":
        """Stack weights along the output dimension (rows of ``W``): how ``qkv`` and ``gate_up`` are fused."""
        g = {p.group_size for p in parts}
        k = {p.in_features for p in parts}
        if len(g) != 1 or len(k) != 1:
            raise QuantFormatError(f"cannot fuse W4 weights with group sizes {sorted(g)} and in_features {sorted(k)}")
        return W4Weight(torch.cat([p.qweight for p in parts], dim=1), torch.cat([p.scales for p in parts], dim=1),
                        torch.cat([p.zeros for p in parts], dim=1), g.pop())


@dataclass(frozen=True)
class W8Weight:
    """One linear weight in the engine's W8 layout (see the module docstring)."""

    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # model dtype [N]

    def validate(self, name: str) -> "W8Weight":
        check_w8(name, self.qweight, self.scales)
        return self

    def dequantize(self) -> torch.Tensor:
        return dequantize_w8(self.qweight, self.scales)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.qweight": self.qweight, f"{name}.scales": self.scales}

    @staticmethod
    def concat_out(parts: list["W8Weight"]) -> "W8Weight":
        return W8Weight(torch.cat([p.qweight for p in parts], dim=0), torch.cat([p.scales for p in parts], dim=0))


# ---- W4 ---------------------------------------------------------------------------------------------------------
def _check_w4_group(k: int, group_size: int) -> None:
    if group_size <= 0 or group_size % W4_PACK or k % group_size:
        raise QuantFormatError(f"W4 group size {group_size} must be a positive multiple of {W4_PACK} dividing "
                               f"in_features K={k}")


def pack_w4(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pack unsigned 4-bit codes ``[N, K]`` (any integer dtype, values 0..15) into the engine's int32 ``[K // 8, N]``
    for groups of ``group_size`` inputs (position-major within each group, see the module docstring)."""
    if codes.dim() != 2:
        raise QuantFormatError(f"W4 codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if k % W4_PACK:
        raise QuantFormatError(f"W4 in_features K={k} is not a multiple of {W4_PACK}")
    _check_w4_group(k, group_size)
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > W4_MAX_CODE):
        raise QuantFormatError(f"W4 codes must lie in [0, {W4_MAX_CODE}], got [{int(c.min())}, {int(c.max())}]")
    rows = group_size // W4_PACK
    # [K, N] -> [groups, j, r, N] (k = g G + j R + r) -> [groups, r, j, N] -> [K // 8, j, N]
    c = c.t().reshape(k // group_size, W4_PACK, rows, n).transpose(1, 2).reshape(k // W4_PACK, W4_PACK, n)
    shifts = _SHIFTS.to(c.device).view(1, W4_PACK, 1)
    # Disjoint bit fields: the sum is the bitwise OR.  int32 wraps for code 8..15 in the top nibble, which is the
    # intended two's-complement bit pattern.
    return (c << shifts).sum(dim=1, dtype=torch.int32)


def unpack_w4(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_w4`: int32 ``[K // 8, N]`` to uint8 codes ``[N, K]``."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise QuantFormatError(f"W4 qweight must be 2-D int32 [K // 8, N], got {qweight.dtype} "
                               f"{tuple(qweight.shape)}")
    words, n = qweight.shape
    k = words * W4_PACK
    _check_w4_group(k, group_size)
    shifts = _SHIFTS.to(qweight.device).view(1, W4_PACK, 1)
    codes = (qweight.unsqueeze(1) >> shifts) & 0xF  # [K // 8, j, N]
    codes = codes.reshape(k // group_size, group_size // W4_PACK, W4_PACK, n).transpose(1, 2)  # [groups, j, r, N]
    return codes.reshape(k, n).t().to(torch.uint8)


def check_w4(name: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    """Raise :class:`QuantFormatError` naming ``name`` unless the tensors follow the engine's W4 layout."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise QuantFormatError(f"{name}.qweight must be 2-D int32 [K // 8, N], got {qweight.dtype} "
                               f"{tuple(qweight.shape)}")
    k, n = qweight.shape[0] * W4_PACK, qweight.shape[1]
    if group_size <= 0 or group_size % W4_PACK or k % group_size:
        raise QuantFormatError(f"{name}: group size {group_size} must be a positive multiple of {W4_PACK} "
                               f"dividing in_features K={k}")
    want = (k // group_size, n)
    for part, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != want:
            raise QuantFormatError(f"{name}.{part} has shape {tuple(t.shape)}, expected {want} "
                                   f"(K={k}, group size {group_size}, N={n})")
        if not t.dtype.is_floating_point:
            raise QuantFormatError(f"{name}.{part} must be floating point (the model dtype), got {t.dtype}")
    if zeros.numel():
        zmin, zmax = float(zeros.min()), float(zeros.max())
        if zmin < 0 or zmax > W4_MAX_CODE or not torch.equal(zeros, zeros.round()):
            raise QuantFormatError(f"{name}.zeros must hold integers in [0, {W4_MAX_CODE}], got values in "
                                   f"[{zmin}, {zmax}]")


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``W = (q - z) * s`` as a ``[N, K]`` tensor in the scales' dtype (the reference every W4 kernel must match)."""
    k, n = qweight.shape[0] * W4_PACK, qweight.shape[1]
    _check_w4_group(k, group_size)
    if tuple(scales.shape) != (k // group_size, n) or tuple(zeros.shape) != tuple(scales.shape):
        raise QuantFormatError(f"W4 scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not match "
                               f"qweight for N={n}, K={k}, group size {group_size}")
    codes = unpack_w4(qweight, group_size).to(torch.float32)  # [N, K]
    s = scales.to(torch.float32).t().repeat_interleave(group_size, dim=1)  # [N, K]
    z = zeros.to(torch.float32).t().repeat_interleave(group_size, dim=1)
    return ((codes - z) * s).to(scales.dtype)


# ---- W8 ---------------------------------------------------------------------------------------------------------
def check_w8(name: str, qweight: torch.Tensor, scales: torch.Tensor) -> None:
    """Raise :class:`QuantFormatError` naming ``name`` unless the tensors follow the engine's W8 layout."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise QuantFormatError(f"{name}.qweight must be 2-D int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    if tuple(scales.shape) != (qweight.shape[0],) or not scales.dtype.is_floating_point:
        raise QuantFormatError(f"{name}.scales must be a floating-point [N] = ({qweight.shape[0]},) tensor, got "
                               f"{scales.dtype} {tuple(scales.shape)}")


def dequantize_w8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``W = q * s[n]`` as a ``[N, K]`` tensor in the scales' dtype."""
    check_w8("w8", qweight, scales)
    return (qweight.to(torch.float32) * scales.to(torch.float32).unsqueeze(1)).to(scales.dtype)


# ---- reference linear kernels (CPU path and ground truth) -------------------------------------------------------
def w4_group_size_of(qweight: torch.Tensor, scales: torch.Tensor) -> int:
    """The group size implied by the shapes of a W4 weight (``K / (K // G)``)."""
    k = qweight.shape[0] * W4_PACK
    if scales.shape[0] == 0 or k % scales.shape[0]:
        raise QuantFormatError(f"W4 scales with {scales.shape[0]} groups do not divide K={k}")
    return k // scales.shape[0]


def reference_linear_w4(x: torch.Tensor, lw: LayerWeights, name: str,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for W4 projection ``name`` of layer ``lw``: dequantize, then ``F.linear`` (any device)."""
    t = lw.tensors
    qweight, scales, zeros = t[f"{name}.qweight"], t[f"{name}.scales"], t[f"{name}.zeros"]
    w = dequantize_w4(qweight, scales, zeros, w4_group_size_of(qweight, scales))
    return dense_linear(x, w.to(x.dtype), out)


def reference_linear_w8(x: torch.Tensor, lw: LayerWeights, name: str,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for W8 projection ``name`` of layer ``lw``: dequantize, then ``F.linear`` (any device)."""
    t = lw.tensors
    w = dequantize_w8(t[f"{name}.qweight"], t[f"{name}.scales"])
    return dense_linear(x, w.to(x.dtype), out)
