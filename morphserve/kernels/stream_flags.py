"""Device-side waits on flags in GPU memory: how a layer swap's copy and the decode graph order each other.

A decode step that replays one CUDA graph cannot run host code between its layers, and CUDA's event nodes cost
as much as the per-layer launches they would replace (measured on an H200, ``BENCHMARKS.md``, issue #5).  So the
swap protocol uses two words of GPU memory per layer instead, written and waited on by tiny kernels:

* ``ready[l]`` (int32): the copy stream sets it to 1 once layer ``l``'s new variant has landed in its slot
  (:meth:`~morphserve.memory.layer_swapper.LayerSwapper.issue`).  The first step that runs the layer at the new
  precision waits for it with :func:`wait_flag`, which also *consumes* it (resets it to 0), so the next swap of
  the layer cannot pass on a stale 1.  An eager step that switches the layer consumes it the same way after its
  event wait.
* ``done[l]`` (int32): a counter the graph increments right after layer ``l`` in a step whose swap of ``l`` is
  queued (that step's last read of the bytes the copy overwrites).  The copy stream waits for the count the host
  expects with :func:`wait_at_least` before it starts the copy.

Both kernels spin on a volatile load with a single program of one warp (they occupy one SM slot while they wait).

References: :func:`wait_flag_ref` and :func:`wait_at_least_ref` (the same effect, for a condition that already
holds; a reference cannot wait for another stream).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _wait_flag_kernel(flag_ptr):
    v = tl.load(flag_ptr, volatile=True)
    while v == 0:
        v = tl.load(flag_ptr, volatile=True)
    tl.store(flag_ptr, 0)


@triton.jit(do_not_specialize=["value"])
def _wait_at_least_kernel(counter_ptr, value):
    v = tl.load(counter_ptr, volatile=True)
    while v < value:
        v = tl.load(counter_ptr, volatile=True)


def _check(t: torch.Tensor, what: str) -> None:
    if t.dtype != torch.int32 or t.numel() != 1:
        raise ValueError(f"{what} must be a 1-element int32 tensor, got {t.dtype}[{t.numel()}]")


def wait_flag(flag: torch.Tensor) -> None:
    """On the current stream: wait until ``flag`` (a 1-element int32 tensor) is nonzero, then reset it to 0."""
    _check(flag, "the flag")
    _wait_flag_kernel[(1,)](flag, num_warps=1)


def wait_at_least(counter: torch.Tensor, value: int) -> None:
    """On the current stream: wait until ``counter`` (a 1-element int32 tensor) is at least ``value``."""
    _check(counter, "the counter")
    if not -2**31 <= value < 2**31:
        raise ValueError(f"value {value} does not fit the int32 counter")
    _wait_at_least_kernel[(1,)](counter, value, num_warps=1)


def wait_flag_ref(flag: torch.Tensor) -> None:
    if int(flag.item()) == 0:
        raise RuntimeError("the flag is 0: the reference cannot wait for another stream to set it")
    flag.zero_()


def wait_at_least_ref(counter: torch.Tensor, value: int) -> None:
    if int(counter.item()) < value:
        raise RuntimeError(f"the counter is {int(counter.item())} < {value}: the reference cannot wait for it")
