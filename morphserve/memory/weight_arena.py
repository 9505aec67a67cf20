"""The weight arena: one contiguous, fixed-address slot of device memory per decoder layer.

Layout (the design constraint every later mechanism relies on)::

    arena.storage  (one uint8 allocation, num_layers * slot_bytes)
    +--------------------+--------------------+-----+----------------------+
    | slot 0 (layer 0)   | slot 1 (layer 1)   | ... | slot L-1             |
    +--------------------+--------------------+-----+----------------------+
      slot i, FP16 variant (the largest; it sizes the slot):
      | input_norm | qkv | o | post_norm | gate_up | down |
      each tensor starts at a 256-byte aligned offset; the layout is a pure function of (config, dtype, precision).

* A layer's tensors are *views* into its slot, built from its current :class:`LayerLayout`.  Changing a layer's
  precision means writing the bytes of another variant into the same slot (in place: no pointer of the arena ever
  changes, so CUDA graphs captured against it stay valid) and switching the layout used to build the views.
* A quantized variant is smaller than the FP16 one; it is packed at the start of the slot and the slot's tail
  (:meth:`WeightArena.free_tail`) is free memory that the KV pool can adopt as an extension segment.
* Projections are fused the way the kernels consume them: ``qkv`` is ``[q_size + 2*kv_size, hidden]`` (rows of
  q, then k, then v) and ``gate_up`` is ``[2*intermediate, hidden]`` (gate rows, then up rows).  Norm weights are
  part of the layer variant (AWQ rescales them), so they live in the slot too.
* Embeddings, the final norm and the LM head are not swappable and live outside the arena.

Only the FP16 layout is defined in this module; quantized layouts register themselves through
:func:`register_layout` from the quantization package.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from morphserve.model.config import ModelConfig

ALIGN = 256  # bytes; every tensor in a slot starts on this boundary (coalesced/vectorised loads, TMA-friendly)


class Precision(str, Enum):
    """Storage precision of a decoder layer.  ``FP16`` means unquantized weights in the engine's compute dtype
    (float16 on GPU by default, bfloat16 or float32 when asked for, e.g. float32 for CPU reference runs).
    ``W8``: int8 weights, one scale per output channel (symmetric).  ``W4``: 4-bit weights in groups along the
    input dimension with a scale and a zero point per group (AWQ's asymmetric scheme).  A precision is usable once
    its layout (:func:`register_layout`) and its linear kernel (:func:`morphserve.model.linear.register_linear`)
    are registered; the quantization package registers W8 and W4."""

    FP16 = "fp16"
    W8 = "w8"
    W4 = "w4"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the start of the slot

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class LayerLayout:
    """Where each tensor of one layer variant sits inside a slot."""

    precision: Precision
    specs: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        """Bytes used from the start of the slot (aligned)."""
        return max(_align(s.offset + s.nbytes) for s in self.specs)

    def views(self, slot: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for s in self.specs:
            out[s.name] = slot[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
        return out

    @staticmethod
    def pack(precision: Precision, entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> "LayerLayout":
        specs, off = [], 0
        for name, shape, dtype in entries:
            spec = TensorSpec(name, tuple(shape), dtype, off)
            specs.append(spec)
            off = _align(off + spec.nbytes)
        return LayerLayout(precision, tuple(specs))


def fp16_layout(cfg: ModelConfig, dtype: torch.dtype) -> LayerLayout:
    h, i = cfg.hidden_size, cfg.intermediate_size
    return LayerLayout.pack(Precision.FP16, [
        ("input_norm", (h,), dtype),
        ("qkv", (cfg.q_size + 2 * cfg.kv_size, h), dtype),
        ("o", (h, cfg.q_size), dtype),
        ("post_norm", (h,), dtype),
        ("gate_up", (2 * i, h), dtype),
        ("down", (h, i), dtype),
    ])


LayoutFn = Callable[[ModelConfig, torch.dtype], LayerLayout]
_LAYOUTS: dict[Precision, LayoutFn] = {Precision.FP16: fp16_layout}


def register_layout(precision: Precision, fn: LayoutFn) -> None:
    _LAYOUTS[precision] = fn


def layout_for(precision: Precision, cfg: ModelConfig, dtype: torch.dtype) -> LayerLayout:
    try:
        return _LAYOUTS[precision](cfg, dtype)
    except KeyError:
        raise ValueError(f"no weight layout registered for precision {precision!r}; "
                         f"available: {[p.value for p in _LAYOUTS]}") from None


class LayerWeights:
    """The live view of one decoder layer: its precision and its tensors (views into the slot)."""

    __slots__ = ("index", "precision", "tensors")

    def __init__(self, index: int, precision: Precision, tensors: dict[str, torch.Tensor]):
        self.index = index
        self.precision = precision
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class WeightArena:
    """Owns the per-layer slots.  See the module docstring for the layout."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.full_layout = fp16_layout(cfg, dtype)
        self.slot_bytes = self.full_layout.nbytes
        self.storage = torch.empty(cfg.num_layers * self.slot_bytes, dtype=torch.uint8, device=self.device)
        self.layers: list[LayerWeights] = [
            LayerWeights(i, Precision.FP16, self.full_layout.views(self.slot(i))) for i in range(cfg.num_layers)
        ]
        # (layer, precision) -> its views: a slot never moves, so they are built once (a swap lands between two
        # steps on the engine thread; building the views took 0.1-0.3 ms of that, measured on an H200)
        self._views: dict[tuple[int, Precision], LayerWeights] = {(lw.index, lw.precision): lw for lw in self.layers}

    def slot(self, i: int) -> torch.Tensor:
        """The raw bytes of layer ``i``'s slot (a view; its address never changes)."""
        return self.storage[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def layout(self, i: int) -> LayerLayout:
        return layout_for(self.layers[i].precision, self.cfg, self.dtype)

    def set_precision(self, i: int, precision: Precision) -> None:
        """Re-point layer ``i``'s views at the layout of ``precision``.  The caller has already written (or
        scheduled the write of) that variant's bytes into the slot."""
        lw = self._views.get((i, precision))
        if lw is None:
            lw = self._views[(i, precision)] = LayerWeights(
                i, precision, layout_for(precision, self.cfg, self.dtype).views(self.slot(i)))
        self.layers[i] = lw

    def free_tail(self, i: int) -> tuple[int, int]:
        """``(offset, nbytes)`` of the part of slot ``i`` not used by its current variant (0 bytes at FP16)."""
        used = self.layout(i).nbytes
        return used, self.slot_bytes - used

    @property
    def nbytes(self) -> int:
        return self.storage.numel()

    def precisions(self) -> list[str]:
        return [lw.precision.value for lw in self.layers]
