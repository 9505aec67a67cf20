"""Staged variants: every (layer, precision) variant as ONE pinned host buffer, ready to be copied into its slot.

The buffer for ``(i, p)`` holds exactly the first ``layout_for(p, cfg, dtype).nbytes`` bytes that slot ``i`` must
contain when layer ``i`` runs at precision ``p``: the variant's tensors at their layout offsets, alignment padding
zero-filled (for FP16, the slot's bytes as loaded, padding included, so restoring FP16 is byte-identical).  A swap is
therefore a single host-to-device copy, ``slot[:nbytes].copy_(buf, non_blocking=True)`` on a copy stream, followed by
``arena.set_precision(i, p)`` once the copy is complete (:meth:`StagedVariants.write_into` does both synchronously).

Buffers are allocated with ``pin_memory=True`` when CUDA is available (page-locked memory, so the copy is a true
asynchronous DMA), in ordinary memory otherwise.  Host cost: FP16 + W8 + W4 = about 1 + 0.50 + 0.27 = 1.77x the
decoder weights (``nbytes()`` reports the exact figure).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from tqdm.auto import tqdm

from morphserve.memory.weight_arena import LayerLayout, Precision, WeightArena, layout_for
from morphserve.model.config import ModelConfig
from morphserve.quant.checkpoint import QuantizedCheckpoint
from morphserve.quant.variants import VariantBuilder, VariantInfo, check_variant

if TYPE_CHECKING:
    from morphserve.model.llama import LlamaModel


def host_buffer(nbytes: int, pin: bool | None = None) -> torch.Tensor:
    """``nbytes`` of host memory as a uint8 tensor: pinned when ``pin`` (default: when CUDA is available)."""
    pin = torch.cuda.is_available() if pin is None else pin
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class StagedVariants:
    """The host-side store of every layer's variants (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pin: bool | None = None):
        self.cfg = cfg
        self.dtype = dtype
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.buffers: dict[tuple[int, Precision], torch.Tensor] = {}
        self.info: dict[Precision, VariantInfo] = {}
        self.v_drift: dict[int, float] = {}  # W4 checkpoint variants: v_row_scale_drift per layer

    def layout(self, precision: Precision) -> LayerLayout:
        return layout_for(precision, self.cfg, self.dtype)

    # ---- filling ----------------------------------------------------------------------------------------------
    def add(self, i: int, precision: Precision, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stage layer ``i``'s variant ``tensors`` (any device) at ``precision``; returns its buffer."""
        if not 0 <= i < self.cfg.num_layers:
            raise IndexError(f"layer {i} out of range [0, {self.cfg.num_layers})")
        layout = self.layout(precision)
        check_variant(tensors, layout, f"layer {i}")
        buf = host_buffer(layout.nbytes, self.pin).zero_()
        views = layout.views(buf)
        for name, t in tensors.items():
            views[name].copy_(t)
        self.buffers[(i, precision)] = buf
        return buf

    def add_slot_bytes(self, i: int, slot: torch.Tensor) -> torch.Tensor:
        """Stage layer ``i``'s FP16 variant as a byte copy of its slot (which must hold the FP16 layer)."""
        layout = self.layout(Precision.FP16)
        if slot.dtype != torch.uint8 or slot.numel() < layout.nbytes:
            raise ValueError(f"layer {i}: slot of {slot.numel()} {slot.dtype} elements cannot hold the FP16 layout "
                             f"({layout.nbytes} bytes)")
        buf = host_buffer(layout.nbytes, self.pin)
        buf.copy_(slot[:layout.nbytes])
        self.buffers[(i, Precision.FP16)] = buf
        return buf

    @classmethod
    @torch.no_grad()
    def build(cls, model: "LlamaModel", w4: str | QuantizedCheckpoint = "rtn",
              precisions: Iterable[Precision] = (Precision.FP16, Precision.W8, Precision.W4),
              calibration: dict[str, Any] | None = None, pin: bool | None = None) -> "StagedVariants":
        """Stage every layer of ``model`` (all layers FP16) at every precision in ``precisions``.

        Variants are built one layer at a time and copied straight into their host buffers, so peak extra memory is
        one layer's intermediates.  ``w4``: ``"rtn"`` or a W4 checkpoint; ``calibration``: provenance recorded with
        a checkpoint's W4 variants."""
        precisions = tuple(precisions)
        staged = cls(model.cfg, model.dtype, pin)
        builder = VariantBuilder(model, w4, calibration)
        staged.info = {p: builder.info[p] for p in precisions}
        for i in tqdm(range(model.cfg.num_layers), desc="staging layer variants", unit="layer", leave=False):
            for p in precisions:
                if p == Precision.FP16:
                    staged.add_slot_bytes(i, model.arena.slot(i))
                else:
                    staged.add(i, p, builder.layer(i, p))
        staged.v_drift = dict(builder.v_drift)
        return staged

    # ---- reading ----------------------------------------------------------------------------------------------
    def buffer(self, i: int, precision: Precision) -> torch.Tensor:
        try:
            return self.buffers[(i, precision)]
        except KeyError:
            raise KeyError(f"no staged {precision.value} variant for layer {i}") from None

    def tensors(self, i: int, precision: Precision) -> dict[str, torch.Tensor]:
        """Layer ``i``'s staged variant as named views into its host buffer."""
        return self.layout(precision).views(self.buffer(i, precision))

    def nbytes(self, precision: Precision | None = None) -> int:
        """Host bytes staged (for one precision, or all)."""
        return sum(b.numel() for (_, p), b in self.buffers.items() if precision is None or p == precision)

    def write_into(self, arena: WeightArena, i: int, precision: Precision, non_blocking: bool = False) -> None:
        """Copy the staged ``(i, precision)`` variant into slot ``i`` and switch the layer's views to it.

        With ``non_blocking=True`` on CUDA the copy is only enqueued on the current stream: the caller must order
        the next use of layer ``i`` after it (the layer swapper does this with its copy stream and an event)."""
        if arena.cfg != self.cfg or arena.dtype != self.dtype:
            raise ValueError("the arena was built for another model config or dtype than these staged variants")
        buf = self.buffer(i, precision)
        arena.slot(i)[:buf.numel()].copy_(buf, non_blocking=non_blocking)
        arena.set_precision(i, precision)

    def metadata(self) -> dict[str, Any]:
        """What was staged: per precision its source and bytes per layer, plus the model's W4 group size."""
        from morphserve.quant.layouts import w4_group_size

        return {
            "w4_group_size": w4_group_size(self.cfg),
            "pinned": self.pin,
            "w4_v_row_scale_drift_max": max(self.v_drift.values()) if self.v_drift else None,
            "variants": {p.value: {**info.to_json(), "layer_bytes": self.layout(p).nbytes,
                                   "total_bytes": self.nbytes(p)} for p, info in self.info.items()},
        }
