"""Composite decode graphs: one executable CUDA graph chaining per-layer graphs as child graphs.

A decode step replayed as one graph per layer pays a gap on the GPU at every graph boundary (10-17 us on an H200 at
batch 8-32, ``benchmarks/probe_swap_step.py``).  Chaining the same per-layer graphs as child nodes of one graph
(``cudaGraphAddChildGraphNode``) runs at the whole-step graph's speed and needs no Python capture: building one
costs ``cudaGraphInstantiate`` (1-5 ms), and re-targeting an existing one to another precision map with
``cudaGraphExecUpdate`` costs about 0.1 ms when the per-layer graphs have the same node structure at both
precisions (``benchmarks/probe_graph_update.py``: true at batch 1 once every kernel uses the same PDL launch
attribute; at batch 8 and 32 an FP16 layer has one or two kernels more than a W8/W4 one, so those maps are
instantiated).

PyTorch has no API for child-graph nodes, so this module calls the CUDA runtime that PyTorch loaded, through
``ctypes``.  The per-layer graphs must be captured with ``keep_graph=True`` (their ``cudaGraph_t`` is the child); a
composite copies its children's nodes, so it stays valid while the per-layer graphs' memory (their captured
buffers) is alive.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

_RT: ctypes.CDLL | None = None


def cudart() -> ctypes.CDLL:
    """The CUDA runtime library this process (PyTorch) has loaded."""
    global _RT
    if _RT is None:
        torch.cuda.init()
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "libcudart.so" in path:
                _RT = ctypes.CDLL(path)
                break
        else:
            raise RuntimeError("libcudart is not loaded in this process")
    return _RT


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUDA error {rc}")


class UpdateResultInfo(ctypes.Structure):  # cudaGraphExecUpdateResultInfo
    _fields_ = [("result", ctypes.c_int), ("errorNode", ctypes.c_void_p), ("errorFromNode", ctypes.c_void_p)]


class EdgeData(ctypes.Structure):  # cudaGraphEdgeData
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty", 6: "wait_event",
              7: "event_record", 8: "ext_sem_signal", 9: "ext_sem_wait", 10: "mem_alloc", 11: "mem_free",
              12: "conditional"}


def structure(graph: int) -> tuple[tuple[str, ...], tuple[tuple, ...]]:
    """The node structure of a ``cudaGraph_t``: its node types (in the order the runtime lists them: creation
    order for a captured graph) and its edges as (from index, to index, from port, to port, type), sorted; a
    programmatic (PDL) edge has type 1.  ``cudaGraphExecUpdate`` re-targets an executable graph only to a graph of
    the same topology and node types, so two graphs with different structures never update into each other (equal
    structures are necessary, not sufficient: an update may still refuse, e.g. a changed kernel attribute)."""
    rt = cudart()
    n = ctypes.c_size_t(0)
    g = ctypes.c_void_p(graph)
    check(rt.cudaGraphGetNodes(g, None, ctypes.byref(n)), "cudaGraphGetNodes")
    nodes = (ctypes.c_void_p * n.value)()
    check(rt.cudaGraphGetNodes(g, nodes, ctypes.byref(n)), "cudaGraphGetNodes")
    index = {nd: k for k, nd in enumerate(nodes)}
    types = []
    for node in nodes:
        t = ctypes.c_int(-1)
        check(rt.cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t)), "cudaGraphNodeGetType")
        types.append(NODE_TYPES.get(t.value, str(t.value)))
    # CUDA 12.3-12.9 name the edge-data variant _v2; CUDA 13 made it the plain name
    get_edges = getattr(rt, "cudaGraphGetEdges_v2", None) or rt.cudaGraphGetEdges
    m = ctypes.c_size_t(0)
    check(get_edges(g, None, None, None, ctypes.byref(m)), "cudaGraphGetEdges")
    frm, to, data = (ctypes.c_void_p * m.value)(), (ctypes.c_void_p * m.value)(), (EdgeData * m.value)()
    check(get_edges(g, frm, to, data, ctypes.byref(m)), "cudaGraphGetEdges")
    edges = [(index[frm[k]], index[to[k]], data[k].from_port, data[k].to_port, data[k].type) for k in range(m.value)]
    return tuple(types), tuple(sorted(edges))


def chain(children: list[int], waits: list[int] | None = None, records: list[int] | None = None) -> int:
    """A new ``cudaGraph_t`` running ``children`` (``cudaGraph_t`` handles) one after another, optionally with an
    event-wait node before and an event-record node after each (``cudaEvent_t`` handles).  The caller owns it."""
    rt = cudart()
    vp = ctypes.c_void_p
    g = vp()
    check(rt.cudaGraphCreate(ctypes.byref(g), ctypes.c_uint(0)), "cudaGraphCreate")
    prev = None

    def add(fn, *args):
        nonlocal prev
        node = vp()
        deps = (vp * 1)(prev) if prev is not None else None
        check(fn(ctypes.byref(node), g, deps, ctypes.c_size_t(1 if prev is not None else 0), *args), fn.__name__)
        prev = node

    try:
        for i, child in enumerate(children):
            if waits is not None:
                add(rt.cudaGraphAddEventWaitNode, vp(waits[i]))
            add(rt.cudaGraphAddChildGraphNode, vp(child))
            if records is not None:
                add(rt.cudaGraphAddEventRecordNode, vp(records[i]))
    except Exception:
        rt.cudaGraphDestroy(g)
        raise
    return g.value


class CompositeGraph:
    """An executable graph of chained child graphs, re-targetable to other children of the same structure."""

    def __init__(self, children: list[int], signature: object = None):
        """``signature``: the children's structures (see :func:`structure`), kept for the caller to pick a
        composite to re-target."""
        rt = cudart()
        self.signature = signature
        self.exec = ctypes.c_void_p()
        g = chain(children)
        try:
            check(rt.cudaGraphInstantiate(ctypes.byref(self.exec), ctypes.c_void_p(g), ctypes.c_ulonglong(0)),
                  "cudaGraphInstantiate")
        finally:
            rt.cudaGraphDestroy(ctypes.c_void_p(g))
        self.num_updates = 0
        self.upload()

    def update(self, children: list[int], signature: object = None) -> bool:
        """Re-target the executable graph to ``children`` in place (``cudaGraphExecUpdate``; launches already
        enqueued are not affected).  False when the structure differs: the graph is then unusable and must be
        closed (CUDA leaves a failed update's graph undefined)."""
        rt = cudart()
        g = chain(children)
        info = UpdateResultInfo()
        try:
            rc = rt.cudaGraphExecUpdate(self.exec, ctypes.c_void_p(g), ctypes.byref(info))
        finally:
            rt.cudaGraphDestroy(ctypes.c_void_p(g))
        if rc != 0:
            rt.cudaGetLastError()  # the failure is also the runtime's last error, which PyTorch would raise later
            return False
        self.num_updates += 1
        self.signature = signature
        self.upload()
        return True

    def upload(self) -> None:
        """Upload the executable graph to the device now (``cudaGraphUpload`` on the current stream), so that its
        first launch does not pay for it: measured on an H200, a fresh or re-targeted composite's first launch cost
        about 1 ms of host time (a 7B decode step at batch 1: 5.3 ms wall for 4.2 ms on the GPU)."""
        stream = torch.cuda.current_stream().cuda_stream
        check(cudart().cudaGraphUpload(self.exec, ctypes.c_void_p(stream)), "cudaGraphUpload")

    def launch(self, stream: torch.cuda.Stream | None = None) -> None:
        s = stream if stream is not None else torch.cuda.current_stream()
        check(cudart().cudaGraphLaunch(self.exec, ctypes.c_void_p(s.cuda_stream)), "cudaGraphLaunch")

    def close(self) -> None:
        if self.exec:
            cudart().cudaGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
