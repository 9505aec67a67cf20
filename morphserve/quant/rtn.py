"""Round-to-nearest (RTN) quantizers into the engine layout (:mod:`morphserve.quant.packing`).

RTN needs no calibration data: it is the W8 source for every model, the W4 source for synthetic-weight models, and
the baseline that activation-aware scaling (AWQ, :mod:`morphserve.quant.calibrate`) must beat.

* W8, symmetric per output channel: ``s[n] = max_k |W[n, k]| / 127``, ``q = clamp(round(W / s), -127, 127)``.
* W4, asymmetric per group of ``G`` input features: the group's range is widened to contain 0 (so that 0.0 is
  representable, as compressed-tensors' min-max observer does; the RTN baseline and the AWQ variant then differ
  only by AWQ's scaling), ``s = (max - min) / 15``, ``z = clamp(round(-min / s), 0, 15)``,
  ``q = clamp(round(W / s) + z, 0, 15)``.

Statistics are computed in float32; the scale is rounded to the model dtype *before* the codes are computed, so the
codes are the nearest ones for the scale that is actually stored.  The functions run on whatever device ``w`` is on
(quantizing a 7B model's layers on the GPU takes milliseconds each).
"""

from __future__ import annotations

import torch

from morphserve.quant.packing import W4_MAX_CODE, W8_MAX_CODE, QuantFormatError, W4Weight, W8Weight, pack_w4


def _positive(s: torch.Tensor) -> torch.Tensor:
    """Replace zero scales (all-zero rows or groups) by the dtype's smallest normal number."""
    return torch.where(s > 0, s, torch.full_like(s, torch.finfo(s.dtype).tiny))


def quantize_w8_rtn(w: torch.Tensor, dtype: torch.dtype | None = None) -> W8Weight:
    """Symmetric per-output-channel int8 quantization of ``w`` ``[N, K]``; scales in ``dtype`` (default: w's)."""
    if w.dim() != 2:
        raise QuantFormatError(f"W8 RTN needs a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    dtype = dtype or w.dtype
    wf = w.to(torch.float32)
    scales = _positive((wf.abs().amax(dim=1) / W8_MAX_CODE).to(dtype))
    q = torch.round(wf / scales.to(torch.float32).unsqueeze(1)).clamp_(-W8_MAX_CODE, W8_MAX_CODE)
    return W8Weight(q.to(torch.int8), scales)


def quantize_w4_rtn(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None) -> W4Weight:
    """Asymmetric group-wise 4-bit quantization of ``w`` ``[N, K]`` into the engine's W4 layout."""
    if w.dim() != 2:
        raise QuantFormatError(f"W4 RTN needs a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or group_size % 8 or k % group_size:
        raise QuantFormatError(f"W4 group size {group_size} must be a positive multiple of 8 dividing K={k}")
    dtype = dtype or w.dtype
    g = w.to(torch.float32).reshape(n, k // group_size, group_size)
    lo = g.amin(dim=2).clamp(max=0.0)
    hi = g.amax(dim=2).clamp(min=0.0)
    scales = _positive(((hi - lo) / W4_MAX_CODE).to(dtype))  # [N, K//G]
    s32 = scales.to(torch.float32)
    zeros = torch.round(-lo / s32).clamp_(0, W4_MAX_CODE)
    q = (torch.round(g / s32.unsqueeze(2)) + zeros.unsqueeze(2)).clamp_(0, W4_MAX_CODE)
    return W4Weight(pack_w4(q.reshape(n, k).to(torch.uint8), group_size), scales.t().contiguous(),
                    zeros.t().to(dtype).contiguous(), group_size)
