"""The per-device split workspace: float32 partial sums and per-tile arrival counters for kernels that split one
output tile over several programs and let the last program to arrive finish it (no second launch, no memset).

Users: the split-K W4A16/W8A16 kernels (partial sums added into :attr:`SplitKWorkspace.partials` with atomics),
the split-K fp16 GEMV (:mod:`morphserve.kernels.gemv`) and split decode attention
(:mod:`morphserve.kernels.attention`), which keep their partial results in per-call buffers and use only the
counters.  Every user leaves what it touched at zero when it finishes, so the buffers are allocated once, their
addresses never change (CUDA graphs stay valid), and kernels that run one after another on a stream may share
them.  Kernels that use them must not run concurrently on two streams.  Under programmatic dependent launch a
kernel may start before the previous one finishes, but every user touches the workspace only after its
``pdl_wait``, which returns once the previous kernel has completed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


class SplitKWorkspace:
    """Float32 partial sums ``[capacity]`` (indexed ``m * N + n``) and one int32 arrival counter per output tile,
    zero at rest.  Allocated once per device; kernels leave both zeroed when they finish."""

    DEFAULT_CAPACITY = 1 << 23  # partial sums (32 MiB)
    DEFAULT_MAX_TILES = 1 << 17

    def __init__(self, device: torch.device, capacity: int = DEFAULT_CAPACITY, max_tiles: int = DEFAULT_MAX_TILES):
        self.capacity = capacity
        self.max_tiles = max_tiles
        self.partials = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.counters = torch.zeros(max_tiles, dtype=torch.int32, device=device)

    def check(self, m: int, n: int, tiles: int) -> None:
        if m * n > self.capacity or tiles > self.max_tiles:
            raise ValueError(f"split-K output [{m}, {n}] with {tiles} tiles exceeds the workspace "
                             f"({self.capacity} partial sums, {self.max_tiles} tiles); use split_k=1")


_WORKSPACES: dict[torch.device, SplitKWorkspace] = {}


def splitk_workspace(device: torch.device) -> SplitKWorkspace:
    """The per-device split-K workspace (created on first use, 32 MiB + 512 KiB)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ws = _WORKSPACES.get(device)
    if ws is None:
        ws = _WORKSPACES[device] = SplitKWorkspace(device)
    return ws


@triton.jit
def splitk_arrive(cnt_ptr, tile_id, FENCE: tl.constexpr):
    """Count this program's arrival at output tile ``tile_id`` after its partial results are written; returns how
    many programs of the tile arrived before it (the last one sees ``split_k - 1``).  Every thread fences its own
    writes (``fence.acq_rel.gpu``; ``FENCE`` is False only under the interpreter), the block synchronizes, then one
    acquire-release atomic counts the block, so the last block's later L2 loads see every partial result."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [tile_id], dtype=tl.int32,
                                  is_pure=False, pack=1)
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
