"""Loader for compressed-tensors ``pack-quantized`` W4A16 checkpoints (what llm-compressor writes).

``config.json`` carries ``quantization_config = {quant_method: "compressed-tensors", format: "pack-quantized",
quantization_status: "compressed", config_groups: {name: {targets: [...], weights: {num_bits: 4, type: "int",
strategy: "group", group_size: G, symmetric: bool, ...}, input_activations: null}}, ignore: [...]}``.
Each quantized linear ``[N, K]`` is stored as (compressed-tensors 0.19, ``compressors/pack_quantized``):

* ``weight_packed`` int32 ``[N, K // 8]``: bits ``4j .. 4j+3`` of ``weight_packed[n, r]`` hold ``q + 8`` for the
  signed code ``q in [-8, 7]`` of ``W[n, 8r + j]`` (dense packing along K, least significant first, offset 8);
* ``weight_scale`` ``[N, K // G]`` (the checkpoint's float dtype);
* ``weight_zero_point`` (asymmetric only) int32 ``[ceil(N / 8), K // G]``, packed along N the same way: bits
  ``4j .. 4j+3`` of ``zp[m, g]`` hold ``z + 8`` for output channel ``8m + j``.  (Checkpoints from older
  compressed-tensors versions store it unpacked, int8 ``[N, K // G]``; both are read.)  Symmetric checkpoints have
  no zero point: ``z = 0``;
* ``weight_shape`` ``[2]`` = ``(N, K)``;
* ``W[n, k] = (q - z) * s``.

Because both code and zero point carry the same +8 offset, the stored nibbles are already the engine's unsigned
codes: the engine's ``qweight`` is those codes repacked (:func:`morphserve.quant.packing.pack_w4`: transposed, and
position-major within each group), its ``zeros`` are the unpacked offset zero points (8 for symmetric
checkpoints), its ``scales`` are ``weight_scale`` transposed.
"""

from __future__ import annotations

from typing import Any

import torch

from morphserve.quant.checkpoint import QuantizedCheckpoint
from morphserve.quant.packing import W4_PACK, QuantFormatError, W4Weight, pack_w4

_OFFSET = 8  # compressed-tensors stores signed 4-bit values as value + 8


def _unpack_rows(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """compressed-tensors 4-bit values packed along dim 0 (int32 ``[ceil(rows / 8), C]``) to uint8 ``[rows, C]``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.unsqueeze(1) >> shifts.view(1, W4_PACK, 1)) & 0xF  # [words, j, C]
    return nib.reshape(-1, packed.shape[1])[:rows].to(torch.uint8)


class CompressedTensorsCheckpoint(QuantizedCheckpoint):
    method = "compressed-tensors"

    def _parse_quantization_config(self, qc: dict[str, Any]) -> None:
        where = self.path / "config.json"
        if str(qc.get("quant_method", "")).lower() != "compressed-tensors":
            raise QuantFormatError(f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}, "
                                   f"expected 'compressed-tensors'")
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise QuantFormatError(f"{where}: quantization_status {status!r}: only compressed checkpoints are read")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise QuantFormatError(f"{where}: quantization_config has no config_groups")
        weight_args = []
        for gname, group in groups.items():
            fmt = group.get("format") or qc.get("format")
            if fmt != "pack-quantized":
                raise QuantFormatError(f"{where}: config group {gname!r} has format {fmt!r}; only 'pack-quantized' "
                                       f"is supported")
            if group.get("input_activations") or group.get("output_activations"):
                raise QuantFormatError(f"{where}: config group {gname!r} quantizes activations; only weight-only "
                                       f"(W4A16) checkpoints are supported")
            w = group.get("weights")
            if not isinstance(w, dict):
                raise QuantFormatError(f"{where}: config group {gname!r} has no weights arguments")
            if w.get("num_bits") != 4:
                raise QuantFormatError(f"{where}: config group {gname!r}: unsupported bit width "
                                       f"num_bits={w.get('num_bits')!r}; only 4-bit is supported")
            if w.get("type", "int") != "int":
                raise QuantFormatError(f"{where}: config group {gname!r}: weight type {w.get('type')!r} is not 'int'")
            if w.get("strategy") != "group":
                raise QuantFormatError(f"{where}: config group {gname!r}: strategy {w.get('strategy')!r}; only "
                                       f"'group' quantization is supported")
            if w.get("dynamic", False):
                raise QuantFormatError(f"{where}: config group {gname!r}: dynamic weight quantization is not "
                                       f"supported")
            g = w.get("group_size")
            if not isinstance(g, int) or g <= 0 or g % W4_PACK:
                raise QuantFormatError(f"{where}: config group {gname!r}: group_size {g!r} must be a positive "
                                       f"multiple of {W4_PACK}")
            weight_args.append((g, bool(w.get("symmetric", True))))
        if len(set(weight_args)) != 1:
            raise QuantFormatError(f"{where}: config groups use different (group_size, symmetric) settings "
                                   f"{sorted(set(weight_args))}; one W4 scheme per model is supported")
        self.group_size, self.symmetric = weight_args[0]

    def w4_linear(self, module: str, n: int, k: int, dtype: torch.dtype) -> W4Weight:
        self._require_quantized(module, "weight_packed")
        g = self.group_size
        if k % g:
            raise QuantFormatError(f"{self.path}: {module} has K={k}, not a multiple of group size {g}")
        shape = self.tensor(f"{module}.weight_shape", dtypes=(torch.int32, torch.int64))
        if shape.tolist() != [n, k]:
            raise QuantFormatError(f"{self.path}: tensor {module + '.weight_shape'!r} is {shape.tolist()}, "
                                   f"expected {[n, k]}")
        packed = self.tensor(f"{module}.weight_packed", dtypes=(torch.int32,), shape=(n, k // W4_PACK))
        scale = self.tensor(f"{module}.weight_scale", dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            shape=(n, k // g))
        zp_name = f"{module}.weight_zero_point"
        if self.symmetric:
            zeros = torch.full((k // g, n), float(_OFFSET), dtype=dtype)
        else:
            if not self.has(zp_name):
                raise QuantFormatError(f"{self.path}: asymmetric checkpoint has no tensor {zp_name!r}")
            zp = self.tensor(zp_name, dtypes=(torch.int32, torch.int8))
            if zp.dtype == torch.int32 and tuple(zp.shape) == (-(-n // W4_PACK), k // g):
                zu = _unpack_rows(zp, n)  # offset codes, [N, K//G]
            elif zp.dtype == torch.int8 and tuple(zp.shape) == (n, k // g):
                zu = (zp.to(torch.int32) + _OFFSET).to(torch.uint8)
            else:
                raise QuantFormatError(f"{self.path}: tensor {zp_name!r} is {zp.dtype} {tuple(zp.shape)}, expected "
                                       f"int32 {(-(-n // W4_PACK), k // g)} (packed) or int8 {(n, k // g)}")
            zeros = zu.t().to(dtype).contiguous()
        # their dense packing along K (natural order) -> the engine's position-major order within groups
        codes = _unpack_rows(packed.t(), k).t()  # [N, K]
        return W4Weight(pack_w4(codes, g), scale.t().to(dtype).contiguous(), zeros, g)
