"""The few CUDA graph node calls PyTorch does not expose, through the CUDA runtime PyTorch has loaded (ctypes).

* :func:`capture_nodes`: the nodes of the graph a stream is capturing into, so far.  The set difference of two
  calls around a piece of captured code is the piece's nodes.
* :func:`set_enabled`: ``cudaGraphNodeSetEnabled`` on an instantiated graph.  A disabled kernel, memcpy or memset
  node does nothing when the graph is launched, but its dependencies stay (it acts as an empty node).  The change
  applies to launches after the call; launches already enqueued are not affected (CUDA runtime API reference).

Used by :mod:`morphserve.engine.branch_graphs`.  CUDA only.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

# cudaGraphNodeType values of the node kinds that cudaGraphNodeSetEnabled accepts
KERNEL, MEMCPY, MEMSET, EMPTY = 0, 1, 2, 5
TOGGLEABLE = (KERNEL, MEMCPY, MEMSET)


@lru_cache(maxsize=1)
def cudart() -> ctypes.CDLL:
    """The CUDA runtime library this process (PyTorch) has loaded."""
    torch.cuda.init()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "libcudart.so" in path:
            return ctypes.CDLL(path)
    raise RuntimeError("libcudart is not loaded in this process (is PyTorch built with CUDA?)")


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUDA error {rc}")


def _capture_info():
    """``cudaStreamGetCaptureInfo`` with a ``graph_out`` argument: ``_v3`` and ``_v2`` (CUDA 12), or the plain name
    (CUDA 13, where it has the ``_v3`` signature).  All take ``(stream, status*, id*, graph*, ...)``; the remaining
    arguments are optional and passed as NULL."""
    rt = cudart()
    for name in ("cudaStreamGetCaptureInfo_v3", "cudaStreamGetCaptureInfo_v2", "cudaStreamGetCaptureInfo"):
        fn = getattr(rt, name, None)
        if fn is not None:
            return fn
    raise RuntimeError("the CUDA runtime has no cudaStreamGetCaptureInfo")


def capture_graph(stream: torch.cuda.Stream) -> int:
    """The ``cudaGraph_t`` that ``stream`` is capturing into."""
    status, graph = ctypes.c_int(), ctypes.c_void_p()
    null = ctypes.c_void_p()
    check(_capture_info()(ctypes.c_void_p(stream.cuda_stream), ctypes.byref(status), null, ctypes.byref(graph),
                          null, null, null), "cudaStreamGetCaptureInfo")
    if status.value != 1 or not graph.value:  # cudaStreamCaptureStatusActive
        raise RuntimeError(f"stream {stream} is not capturing (status {status.value})")
    return graph.value


def graph_nodes(graph: int) -> list[int]:
    rt = cudart()
    n = ctypes.c_size_t()
    check(rt.cudaGraphGetNodes(ctypes.c_void_p(graph), None, ctypes.byref(n)), "cudaGraphGetNodes")
    if n.value == 0:
        return []
    arr = (ctypes.c_void_p * n.value)()
    check(rt.cudaGraphGetNodes(ctypes.c_void_p(graph), arr, ctypes.byref(n)), "cudaGraphGetNodes")
    return [a for a in arr[:n.value]]


def capture_nodes(stream: torch.cuda.Stream) -> set[int]:
    """The nodes captured so far into the graph ``stream`` is capturing into (all streams of the capture)."""
    return set(graph_nodes(capture_graph(stream)))


def node_type(node: int) -> int:
    t = ctypes.c_int()
    check(cudart().cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t)), "cudaGraphNodeGetType")
    return t.value


def toggleable(nodes: set[int], what: str) -> list[int]:
    """The nodes of ``nodes`` to enable and disable as one piece (empty nodes are left alone); raises if a node is
    of a kind that cannot be disabled (events, host callbacks, child graphs)."""
    out = []
    for n in nodes:
        t = node_type(n)
        if t in TOGGLEABLE:
            out.append(n)
        elif t != EMPTY:
            raise RuntimeError(f"{what} captured a graph node of type {t}, which cannot be disabled")
    return sorted(out)


def set_enabled(graph_exec: int, nodes: list[int], enabled: bool) -> None:
    rt, ex, on = cudart(), ctypes.c_void_p(graph_exec), ctypes.c_uint(1 if enabled else 0)
    for n in nodes:
        check(rt.cudaGraphNodeSetEnabled(ex, ctypes.c_void_p(n), on), "cudaGraphNodeSetEnabled")
