"""Slot layouts of the W8 and W4 layer variants, registered with the weight arena.

A quantized variant is packed at the start of the layer's slot (:mod:`morphserve.memory.weight_arena`), every
tensor on a 256-byte boundary, in this order::

    input_norm | post_norm | qkv.* | o.* | gate_up.* | down.*

with ``{proj}.qweight, {proj}.scales[, {proj}.zeros]`` per projection in the format of
:mod:`morphserve.quant.packing`.  The norms are part of the variant because AWQ rescales them.  The layout is a pure
function of ``(ModelConfig, dtype)``: the W4 group size is derived from the config by :func:`w4_group_size`.
"""

from __future__ import annotations

import torch

from morphserve.memory.weight_arena import LayerLayout, Precision, layout_for, register_layout
from morphserve.model.config import ModelConfig, ModelError
from morphserve.quant.packing import W4_PACK

PROJECTIONS = ("qkv", "o", "gate_up", "down")
W4_GROUP_SIZES = (128, 64)  # preferred first


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{projection: (N, K)}`` of one decoder layer (out features, in features)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, h), "o": (h, cfg.q_size), "gate_up": (2 * i, h), "down": (h, i)}


def w4_group_size(cfg: ModelConfig) -> int:
    """The model's W4 group size: 128 when it divides every projection's in-features, else 64.

    SmolLM2-135M (hidden 576) gets 64; the Llama-2/3 and CodeLlama shapes get 128.  Raises ModelError when neither
    divides every in-features (no W4 variant is possible for that shape)."""
    ks = sorted({k for _, k in projection_shapes(cfg).values()})
    for g in W4_GROUP_SIZES:
        if all(k % g == 0 for k in ks):
            return g
    raise ModelError(f"model {cfg.name!r}: no W4 group size in {W4_GROUP_SIZES} divides every projection's "
                     f"in-features {ks}")


def w8_layout(cfg: ModelConfig, dtype: torch.dtype) -> LayerLayout:
    h = cfg.hidden_size
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = [("input_norm", (h,), dtype), ("post_norm", (h,), dtype)]
    for name, (n, k) in projection_shapes(cfg).items():
        entries += [(f"{name}.qweight", (n, k), torch.int8), (f"{name}.scales", (n,), dtype)]
    return LayerLayout.pack(Precision.W8, entries)


def w4_layout(cfg: ModelConfig, dtype: torch.dtype) -> LayerLayout:
    h, g = cfg.hidden_size, w4_group_size(cfg)
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = [("input_norm", (h,), dtype), ("post_norm", (h,), dtype)]
    for name, (n, k) in projection_shapes(cfg).items():
        entries += [(f"{name}.qweight", (k // W4_PACK, n), torch.int32), (f"{name}.scales", (k // g, n), dtype),
                    (f"{name}.zeros", (k // g, n), dtype)]
    return LayerLayout.pack(Precision.W4, entries)


def register_quant_layouts() -> None:
    """Register the W8 and W4 layouts with the weight arena (idempotent; done on ``import morphserve.quant``)."""
    register_layout(Precision.W8, w8_layout)
    register_layout(Precision.W4, w4_layout)


def slot_fraction(precision: Precision, cfg: ModelConfig, dtype: torch.dtype) -> float:
    """Bytes of ``precision``'s variant over bytes of the FP16 slot (the fraction of the slot it occupies)."""
    return layout_for(precision, cfg, dtype).nbytes / layout_for(Precision.FP16, cfg, dtype).nbytes
