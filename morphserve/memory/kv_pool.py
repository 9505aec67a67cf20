"""The paged KV cache: a list of memory segments addressed through a segment table.

Block layout (SwiftLLM's, chosen so that any freed byte range becomes whole blocks)::

    segment tensor: [num_blocks, num_layers, 2 (k, v), num_kv_heads, block_size, head_dim]

All layers of a block are adjacent, so one block is ``block_bytes`` contiguous bytes and a segment can live in
*any* byte range big enough for whole blocks: the base pool (one allocation made at start-up) or, later, the free
tail of a decoder layer's weight slot after that layer was quantized (an *extension segment*).

Block addressing::

    global block id = (segment index << shift) | local index          (an int32)
    segment index   = id >> shift,  local index = id & (2**shift - 1)

Segment index 0 is the base pool; indices ``1 + 2*l + r`` (``r`` in {0, 1}) are reserved for the extension segments
carved from layer ``l``'s slot: ``r = 0`` for the region freed by the layer's first step down the precision ladder
(e.g. FP16 -> W8), ``r = 1`` for the further region freed by the second (W8 -> W4).  A segment's ids therefore
never collide with another's, and releasing one rung's region leaves the other's blocks in place.  ``shift`` is
fixed at start-up, large enough for the biggest segment that can ever exist (the base pool, or a whole weight slot).
The scheduler and block tables only ever see global ids; they do not change when segments come and go.

The segment table (``seg_base_ptr``: int64 data pointer per index, 0 when absent; ``seg_num_blocks``) is a device
tensor updated *in place* when a segment is attached or detached, so kernels (and CUDA graphs captured against it)
resolve any block through one indexed load: ``addr = seg_base_ptr[id >> shift] + (id & mask) * block_bytes``.
The pure-PyTorch reference path uses :meth:`KVPool.gather` / :meth:`KVPool.store`, which resolve ids the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morphserve.model.config import ModelConfig


@dataclass
class Segment:
    index: int  # position in the segment table
    tensor: torch.Tensor  # [num_blocks, num_layers, 2, kv_heads, block_size, head_dim]
    origin: str  # "base" or "layer:<i>"

    @property
    def num_blocks(self) -> int:
        return self.tensor.shape[0]


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, max_segment_blocks: int | None = None):
        if num_blocks <= 0:
            raise ValueError(f"the KV pool needs at least one block, got num_blocks={num_blocks}")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.cfg = cfg
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_shape = (cfg.num_layers, 2, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.block_bytes = self.block_nbytes(cfg, block_size, dtype)
        biggest = max(num_blocks, max_segment_blocks or 0)
        self.shift = max(1, (biggest - 1).bit_length())
        self.max_segments = 1 + 2 * cfg.num_layers
        if (self.max_segments << self.shift) >= 2 ** 31:
            raise ValueError(f"block id space overflows int32: {self.max_segments} segments of up to "
                             f"{biggest} blocks")
        self.segments: dict[int, Segment] = {}
        self.seg_base_ptr = torch.zeros(self.max_segments, dtype=torch.int64, device=self.device)
        self.seg_num_blocks = torch.zeros(self.max_segments, dtype=torch.int32, device=self.device)
        base = torch.zeros((num_blocks, *self.block_shape), dtype=dtype, device=self.device)
        self._attach(Segment(0, base, "base"))

    @staticmethod
    def block_nbytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return cfg.num_layers * 2 * cfg.num_kv_heads * block_size * cfg.head_dim * dtype.itemsize

    # ---- segments -------------------------------------------------------------------------------------------
    def blocks_fitting(self, nbytes: int) -> int:
        return nbytes // self.block_bytes

    def segment_from_bytes(self, raw: torch.Tensor) -> torch.Tensor:
        """View a uint8 byte range (e.g. a slot's free tail) as whole KV blocks."""
        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise ValueError("an extension segment is carved from a 1-D uint8 byte range")
        start = (-raw.data_ptr()) % 256  # keep blocks 256-byte aligned
        n = self.blocks_fitting(raw.numel() - start)
        return raw[start:start + n * self.block_bytes].view(self.dtype).view(n, *self.block_shape)

    def attach(self, index: int, tensor: torch.Tensor, origin: str) -> Segment:
        if not 1 <= index < self.max_segments:
            raise ValueError(f"extension segment index must be in [1, {self.max_segments}), got {index}")
        if index in self.segments:
            raise ValueError(f"segment {index} is already attached ({self.segments[index].origin})")
        if tensor.shape[0] > (1 << self.shift):
            raise ValueError(f"segment of {tensor.shape[0]} blocks exceeds the id space (2**{self.shift})")
        return self._attach(Segment(index, tensor, origin))

    def _attach(self, seg: Segment) -> Segment:
        if tuple(seg.tensor.shape[1:]) != self.block_shape or seg.tensor.dtype != self.dtype:
            raise ValueError(f"segment shape {tuple(seg.tensor.shape)}/{seg.tensor.dtype} does not match blocks "
                             f"{self.block_shape}/{self.dtype}")
        self.segments[seg.index] = seg
        self.seg_base_ptr[seg.index] = seg.tensor.data_ptr()
        self.seg_num_blocks[seg.index] = seg.num_blocks
        return seg

    def detach(self, index: int) -> Segment:
        if index == 0:
            raise ValueError("the base pool cannot be detached")
        seg = self.segments.pop(index)
        self.seg_base_ptr[index] = 0
        self.seg_num_blocks[index] = 0
        return seg

    def block_ids(self, index: int) -> range:
        seg = self.segments[index]
        return range(index << self.shift, (index << self.shift) + seg.num_blocks)

    @property
    def num_blocks(self) -> int:
        return sum(s.num_blocks for s in self.segments.values())

    # ---- addressing (reference path) ------------------------------------------------------------------------
    def split_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ids >> self.shift, ids & ((1 << self.shift) - 1)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write k, v (``[T, kv_heads, head_dim]``) of ``layer`` at global slots ``block_id * block_size + off``."""
        blocks, offs = slot_mapping // self.block_size, slot_mapping % self.block_size
        segs, local = self.split_ids(blocks)
        for index, seg in self.segments.items():
            m = segs == index
            if not bool(m.any()):
                continue
            seg.tensor[local[m], layer, 0, :, offs[m]] = k[m].to(self.dtype)
            seg.tensor[local[m], layer, 1, :, offs[m]] = v[m].to(self.dtype)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks (every layer's K and V) from global ids ``src`` to ``dst``; one contiguous copy per
        block, grouped by (source segment, destination segment)."""
        if len(src) != len(dst):
            raise ValueError(f"copy_blocks: {len(src)} sources for {len(dst)} destinations")
        groups: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        mask = (1 << self.shift) - 1
        for s, d in zip(src, dst):
            g = groups.setdefault((s >> self.shift, d >> self.shift), ([], []))
            g[0].append(s & mask)
            g[1].append(d & mask)
        for (si, di), (sl, dl) in groups.items():
            src_t, dst_t = self.segments[si].tensor, self.segments[di].tensor
            dst_t[torch.tensor(dl, device=self.device)] = src_t[torch.tensor(sl, device=self.device)]

    def gather(self, layer: int, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer`` for the first ``length`` tokens stored in ``block_ids`` (in order):
        ``[length, kv_heads, head_dim]`` each.  (``select`` + ``index_select`` rather than mixed advanced
        indexing, which PyTorch serves through a slow general path.)"""
        segs, local = self.split_ids(block_ids)
        if len(self.segments) == 1:
            blocks = self.segments[0].tensor.select(1, layer).index_select(0, local)
        else:
            blocks = torch.empty((block_ids.numel(), 2, self.cfg.num_kv_heads, self.block_size, self.cfg.head_dim),
                                 dtype=self.dtype, device=self.device)
            for index, seg in self.segments.items():
                pos = (segs == index).nonzero().squeeze(1)
                if pos.numel():
                    blocks.index_copy_(0, pos, seg.tensor.select(1, layer).index_select(0, local[pos]))
        kv = blocks.permute(1, 0, 3, 2, 4).reshape(2, -1, self.cfg.num_kv_heads, self.cfg.head_dim)[:, :length]
        return kv[0], kv[1]
