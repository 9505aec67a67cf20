"""The feed of sampled tokens into the next step's input, in Triton (asynchronous steps).

Reference: :func:`morphserve.kernels.reference.feed_tokens`.  With asynchronous steps the engine launches step
``n + 1`` before step ``n``'s sampled tokens reach the host: the host writes a placeholder ``-(1 + r)`` where
step ``n + 1`` needs row ``r`` of step ``n``'s tokens, and this kernel replaces the placeholders on the device.
The reference is five elementwise and indexing kernels (about 12 us on the critical path of a batch-1 step on an
H200: BENCHMARKS.md, fast path, thirteenth campaign); this is one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from morphserve.kernels.pdl import pdl_trigger, pdl_wait
from morphserve.kernels.triton_support import launch_options

BLOCK = 1024
# Launched without programmatic dependent launch: with it, H200 decode steps at batch 32 took 0.35 ms (5%) longer
# (alternated in one engine; batch 1 was not slower, nor were batches 8 and 64 in a full run).  The feed runs just
# before the graph launch; the mechanism is not established.  Without it the batch-1 gain stays (BENCHMARKS.md,
# fast path, thirteenth campaign).
PDL = False


# The row counts change step by step and the token views start anywhere in the step's upload: neither is
# specialized, so no step compiles a new variant while serving (a first version did, three times in one run).
@triton.jit(do_not_specialize=["n", "n_feed"], do_not_specialize_on_alignment=["tok_ptr", "feed_ptr"])
def _feed_kernel(tok_ptr, feed_ptr, n, n_feed, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_trigger(USE_PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    t = tl.load(tok_ptr + i, mask=m, other=0)
    hole = t < 0
    r = tl.minimum(tl.maximum(-t - 1, 0), n_feed - 1)
    f = tl.load(feed_ptr + r, mask=m & hole, other=0)
    tl.store(tok_ptr + i, tl.where(hole, f, t), mask=m)


def feed_tokens(tokens: torch.Tensor, feed: torch.Tensor) -> None:
    """Replace the placeholders ``-(1 + r)`` of ``tokens`` (int64 ``[T]``, contiguous, on the device) in place by
    ``feed[r]`` (int64, ``r`` clamped to its rows).  Nothing waits for the device."""
    if (tokens.dim() != 1 or tokens.dtype != torch.int64 or not tokens.is_contiguous() or feed.dim() != 1
            or feed.dtype != torch.int64 or not feed.is_contiguous() or feed.device != tokens.device):
        raise ValueError(f"feed_tokens expects contiguous int64 [T] tokens and int64 [R] feed on one device, got "
                         f"tokens {tuple(tokens.shape)} {tokens.dtype} and feed {tuple(feed.shape)} {feed.dtype} "
                         f"on {tokens.device} / {feed.device}")
    if feed.shape[0] == 0:
        raise ValueError("feed_tokens: the feed is empty (no step in flight to read placeholders from)")
    n = tokens.shape[0]
    if n:
        opts = launch_options(tokens.device) if PDL else {"USE_PDL": False}
        _feed_kernel[(triton.cdiv(n, BLOCK),)](tokens, feed, n, feed.shape[0], BLOCK=BLOCK, **opts)
