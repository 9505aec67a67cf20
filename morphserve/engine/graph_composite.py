"""One executable CUDA graph assembled from per-layer decode graphs, with the layer swapper's event nodes between them.

A decode step with a layer swap queued or in flight needs two things a whole-step graph captured in Python cannot
give cheaply: the precision map of the step is new (a Python capture of the whole model costs ~50-70 ms on an H200),
and the swapper must act *between layers* (the compute stream waits for the swap's copy just before the swapped
layer; the copy waits for the layer's last read in the step before).  Replaying one graph per layer gives both, but
32 separate launches cost 1.03-1.11x a whole-step graph at batch 8-32 (``benchmarks/probe_swap_step.py``).

A :class:`Composite` is built from the per-layer graphs that already exist (captured once per layer, precision and
batch bucket, kept as ``cudaGraph_t`` with ``keep_graph=True``) through the CUDA runtime's graph API:
``cudaGraphAddChildGraphNode`` per layer in a chain, an event-wait node before a layer whose swap copy must land
first, an event-record node after a layer whose swap copy may start behind it; then one ``cudaGraphInstantiate``
(4-6 ms of host time for a 32-layer model, measured on an H200).  It is launched with one ``cudaGraphLaunch``.
Graph semantics make it equivalent to the per-layer replay with the hooks run between layers: "each launch of the
graph will record the event to capture execution of the node's dependencies", and a wait node "waits for all work
captured in the event" when launched.  Child graphs are copied into the composite, which therefore keeps the same
kernel arguments (the same static buffers and weight addresses) as the per-layer graphs.

The runtime library is the one PyTorch loaded (found in ``/proc/self/maps``), called through ``ctypes``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Sequence

import torch

_RUNTIME: ctypes.CDLL | None = None


def cuda_runtime() -> ctypes.CDLL:
    """The CUDA runtime library this process's PyTorch has loaded (raises if none is: no composites then)."""
    global _RUNTIME
    if _RUNTIME is None:
        torch.cuda.init()
        maps = Path("/proc/self/maps")
        paths = [ln.split()[-1] for ln in maps.read_text().splitlines() if "libcudart.so" in ln] \
            if maps.exists() else []
        if not paths:
            raise RuntimeError("the CUDA runtime (libcudart) is not loaded in this process")
        _RUNTIME = ctypes.CDLL(paths[0])
    return _RUNTIME


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUDA error {rc}")


def event_handle(event: torch.cuda.Event) -> int:
    """The ``cudaEvent_t`` of a recorded PyTorch event (PyTorch creates the CUDA event at its first record)."""
    handle = event.cuda_event
    if not handle:
        raise ValueError("the event has never been recorded, so it has no CUDA event yet")
    return handle


class Composite:
    """An executable graph chaining ``children`` (``cudaGraph_t`` handles, one per layer), with an event wait
    before child ``i`` for each ``(i, event)`` of ``waits`` and an event record after it for each of ``records``.
    ``keep`` holds Python objects the graph refers to (the events, the graphs owning the children) for as long as
    the composite lives."""

    def __init__(self, children: Sequence[int], waits: Sequence[tuple[int, torch.cuda.Event]] = (),
                 records: Sequence[tuple[int, torch.cuda.Event]] = (), keep: Any = None):
        rt = self._rt = cuda_runtime()
        self.keep = keep
        self.events = [e for _, e in waits] + [e for _, e in records]
        wait_at = {i: event_handle(e) for i, e in waits}
        record_at = {i: event_handle(e) for i, e in records}
        vp = ctypes.c_void_p
        self._graph = vp()
        self._exec = vp()
        _check(rt.cudaGraphCreate(ctypes.byref(self._graph), ctypes.c_uint(0)), "cudaGraphCreate")
        try:
            prev = None

            def add(fn, what: str, arg: int) -> None:
                nonlocal prev
                node = vp()
                deps = (vp * 1)(prev) if prev is not None else None
                _check(fn(ctypes.byref(node), self._graph, deps, ctypes.c_size_t(0 if prev is None else 1), vp(arg)),
                       what)
                prev = node

            for i, child in enumerate(children):
                if i in wait_at:
                    add(rt.cudaGraphAddEventWaitNode, "cudaGraphAddEventWaitNode", wait_at[i])
                add(rt.cudaGraphAddChildGraphNode, "cudaGraphAddChildGraphNode", child)
                if i in record_at:
                    add(rt.cudaGraphAddEventRecordNode, "cudaGraphAddEventRecordNode", record_at[i])
            _check(rt.cudaGraphInstantiate(ctypes.byref(self._exec), self._graph, ctypes.c_ulonglong(0)),
                   "cudaGraphInstantiate")
        except Exception:
            self.close()
            raise

    def launch(self) -> None:
        """Launch on the current stream (asynchronous, like a graph replay)."""
        _check(self._rt.cudaGraphLaunch(self._exec, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)),
               "cudaGraphLaunch")

    def close(self) -> None:
        if self._exec.value:
            self._rt.cudaGraphExecDestroy(self._exec)
            self._exec = ctypes.c_void_p()
        if self._graph.value:
            self._rt.cudaGraphDestroy(self._graph)
            self._graph = ctypes.c_void_p()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the runtime may be gone
            pass
