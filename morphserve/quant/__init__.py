"""Quantized layer variants (W8, W4) of the engine's decoder layers.

Importing this package makes the W8 and W4 precisions usable by the engine:

* their slot layouts are registered with the weight arena (:mod:`morphserve.quant.layouts`);
* their linear kernels are registered with :func:`morphserve.model.linear.register_linear`: by the CUDA-aware
  dispatch module :mod:`morphserve.quant.dispatch` when it is installed (it falls back to the references on CPU),
  otherwise by the pure-PyTorch references of :mod:`morphserve.quant.packing` (dequantize, then ``F.linear``).

Modules (one concept each): ``packing`` (the engine's storage format and its reference), ``rtn`` (round-to-nearest),
``layouts`` (slot layouts, the per-model W4 group size), ``awq_gemm`` and ``compressed_tensors`` (checkpoint
loaders), ``calibrate`` (AWQ with llm-compressor), ``variants`` (every variant of every layer), ``staging`` (the
variants' bytes in pinned host memory).
"""

from __future__ import annotations

import importlib
import importlib.util

from morphserve.memory.weight_arena import Precision
from morphserve.model.linear import register_linear
from morphserve.quant.layouts import register_quant_layouts, w4_group_size
from morphserve.quant.packing import (QuantFormatError, W4Weight, W8Weight, dequantize_w4, dequantize_w8,
                                      reference_linear_w4, reference_linear_w8)

register_quant_layouts()

if importlib.util.find_spec("morphserve.quant.dispatch") is not None:
    importlib.import_module("morphserve.quant.dispatch")  # registers the CUDA-aware W8/W4 linear dispatch
else:
    register_linear(Precision.W8, reference_linear_w8)
    register_linear(Precision.W4, reference_linear_w4)

__all__ = ["QuantFormatError", "W4Weight", "W8Weight", "dequantize_w4", "dequantize_w8", "reference_linear_w4",
           "reference_linear_w8", "w4_group_size"]
