"""Loader for pre-quantized AWQ checkpoints in AutoAWQ's GEMM layout (e.g. ``TheBloke/Llama-2-7B-AWQ``).

``config.json`` carries ``quantization_config = {quant_method: "awq", bits: 4, group_size: G, zero_point: true,
version: "gemm"}`` (older files spell ``w_bit`` / ``q_group_size``).  Each quantized linear ``[N, K]`` is stored as

* ``qweight`` int32 ``[K, N // 8]``: nibble ``i`` (bits ``4i .. 4i+3``) of ``qweight[k, c]`` holds the code of
  ``W[8c + AWQ_ORDER[i], k]`` with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (AutoAWQ's interleave for its GEMM
  kernel); codes are unsigned, 0..15;
* ``qzeros`` int32 ``[K // G, N // 8]``: the integer zero points, packed the same way;
* ``scales`` float16 ``[K // G, N]``;
* ``W[n, k] = (q - z[k // G, n]) * s[k // G, n]``.

The loader un-interleaves the codes and repacks them into the engine's ``[K // 8, N]`` layout (position-major
within groups, :mod:`morphserve.quant.packing`), converts zero points to floats and scales to the model dtype.
GEMV-layout and other bit widths are rejected with an error naming the value.

Runtime swapping caveat: AutoAWQ applies an AWQ scale between ``v_proj`` and ``o_proj`` when their shapes allow it
(MHA models such as Llama-2-7B).  That scale changes the *values stored in the V cache*: K/V written while the layer
ran in FP16 and read after it was swapped to such a W4 variant (or the reverse) are in different units.  Calibrations
made by :mod:`morphserve.quant.calibrate` leave ``v_proj -> o_proj`` out for that reason;
:func:`morphserve.quant.variants.v_row_scale_drift` measures the effect for a loaded checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from morphserve.quant.checkpoint import QuantizedCheckpoint
from morphserve.quant.packing import W4_PACK, QuantFormatError, W4Weight, pack_w4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds output channel AWQ_ORDER[i] of its group of 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output channel j of a group of 8 sits in nibble AWQ_REVERSE_ORDER[j]


def unpack_awq_gemm(packed: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM-packed int32 ``[R, N // 8]`` to unsigned codes ``[R, N]`` in natural output-channel order."""
    r, c = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [R, N//8, nibble i]
    order = torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.long, device=packed.device)
    return nibbles[:, :, order].reshape(r, c * W4_PACK).to(torch.uint8)


class AWQGemmCheckpoint(QuantizedCheckpoint):
    method = "awq-gemm"

    def _parse_quantization_config(self, qc: dict[str, Any]) -> None:
        where = self.path / "config.json"
        method = str(qc.get("quant_method", "")).lower()
        if method != "awq":
            raise QuantFormatError(f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}, "
                                   f"expected 'awq'")
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise QuantFormatError(f"{where}: unsupported AWQ bit width {bits!r}; only 4-bit is supported")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantFormatError(f"{where}: AWQ version {qc.get('version')!r} is not supported; only the 'gemm' "
                                   f"layout is")
        if qc.get("zero_point", True) is not True:
            raise QuantFormatError(f"{where}: AWQ zero_point={qc.get('zero_point')!r}; only asymmetric "
                                   f"(zero_point: true) checkpoints are supported")
        group = qc.get("group_size", qc.get("q_group_size"))
        if not isinstance(group, int) or group <= 0 or group % W4_PACK:
            raise QuantFormatError(f"{where}: AWQ group_size {group!r} must be a positive multiple of {W4_PACK}")
        self.group_size = group

    def w4_linear(self, module: str, n: int, k: int, dtype: torch.dtype) -> W4Weight:
        self._require_quantized(module, "qweight")
        g = self.group_size
        if n % W4_PACK or k % g:
            raise QuantFormatError(f"{self.path}: {module} of shape [{n}, {k}] cannot be stored with AWQ GEMM "
                                   f"packing (N % 8 == 0) and group size {g} (K % G == 0)")
        qweight = self.tensor(f"{module}.qweight", dtypes=(torch.int32,), shape=(k, n // W4_PACK))
        qzeros = self.tensor(f"{module}.qzeros", dtypes=(torch.int32,), shape=(k // g, n // W4_PACK))
        scales = self.tensor(f"{module}.scales", dtypes=(torch.float16, torch.bfloat16, torch.float32),
                             shape=(k // g, n))
        codes = unpack_awq_gemm(qweight)  # [K, N]
        zeros = unpack_awq_gemm(qzeros)  # [K//G, N]
        return W4Weight(pack_w4(codes.t(), g), scales.to(dtype).contiguous(), zeros.to(dtype).contiguous(), g)
