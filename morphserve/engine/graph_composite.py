"""Composite decode graphs: one executable CUDA graph chaining per-layer graphs as child graphs.

A decode step replayed as one graph per layer pays a gap on the GPU at every graph boundary (10-17 us on an H200 at
batch 8-32, ``benchmarks/probe_swap_step.py``).  Chaining the same per-layer graphs as child nodes of one graph
(``cudaGraphAddChildGraphNode``) removes those gaps and needs no Python capture: building one
costs ``cudaGraphInstantiate`` (1-5 ms), and re-targeting an existing one to another precision map with
``cudaGraphExecUpdate`` costs about 0.1 ms when the per-layer graphs have the same node structure at both
precisions (``benchmarks/probe_graph_update.py``: true at batch 1 once every kernel uses the same PDL launch
attribute; at batch 8 and 32 an FP16 layer has one or two kernels more than a W8/W4 one, so those maps are
instantiated).

A *flat* composite (:func:`flat_chain`) copies the per-layer graphs' kernel nodes in instead of adding them as
child-graph nodes, and joins consecutive layers with the programmatic-launch edges a captured whole step has there;
it then has the whole-step graph's node structure and speed (a chain of child graphs has plain edges at its layer
boundaries: 0-1% slower at batch 1 on an H100, BENCHMARKS.md, issue 5, eighth campaign).

PyTorch has no API for child-graph nodes or for copying kernel nodes, so this module calls the CUDA runtime and
driver that PyTorch loaded, through ``ctypes``.  The per-layer graphs must be captured with ``keep_graph=True``
(their ``cudaGraph_t`` is the child); a composite copies its children's nodes, so it stays valid while the
per-layer graphs' memory (their captured buffers) is alive.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

_LIBS: dict[str, ctypes.CDLL] = {}


def _loaded(name: str) -> ctypes.CDLL:
    """A shared library this process (PyTorch) has loaded, by the start of its file name."""
    lib = _LIBS.get(name)
    if lib is None:
        torch.cuda.init()
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if Path(path).name.startswith(name + ".so"):
                lib = _LIBS[name] = ctypes.CDLL(path)
                break
        else:
            raise RuntimeError(f"{name} is not loaded in this process")
    return lib


def cudart() -> ctypes.CDLL:
    """The CUDA runtime library this process (PyTorch) has loaded."""
    return _loaded("libcudart")


def cudriver() -> ctypes.CDLL:
    """The CUDA driver library this process has loaded."""
    return _loaded("libcuda")


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


class KernelNodeParams(ctypes.Structure):  # CUDA_KERNEL_NODE_PARAMS_v2 (driver API)
    _fields_ = [("func", ctypes.c_void_p), ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint),
                ("blockDimZ", ctypes.c_uint), ("sharedMemBytes", ctypes.c_uint), ("kernelParams", ctypes.c_void_p),
                ("extra", ctypes.c_void_p), ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


PROGRAMMATIC = 1  # cudaGraphDependencyTypeProgrammatic


def _nodes(graph: int) -> list[int]:
    rt = cudart()
    n = ctypes.c_size_t(0)
    g = ctypes.c_void_p(graph)
    check(rt.cudaGraphGetNodes(g, None, ctypes.byref(n)), "cudaGraphGetNodes")
    nodes = (ctypes.c_void_p * n.value)()
    check(rt.cudaGraphGetNodes(g, nodes, ctypes.byref(n)), "cudaGraphGetNodes")
    return list(nodes)


def _node_type(node: int) -> str:
    t = ctypes.c_int(-1)
    check(cudart().cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t)), "cudaGraphNodeGetType")
    return NODE_TYPES.get(t.value, str(t.value))


def _edge_data_api(name: str):
    """The runtime's edge-data variant of graph function ``name``: ``name_v2`` in CUDA 12.3-12.9, the plain name
    from CUDA 13 on (before 12.3 the plain name has no edge-data parameter, and calling it with one would pass
    the wrong arguments: refused)."""
    rt = cudart()
    fn = getattr(rt, name + "_v2", None)
    if fn is not None:
        return fn
    version = ctypes.c_int(0)
    check(rt.cudaRuntimeGetVersion(ctypes.byref(version)), "cudaRuntimeGetVersion")
    if version.value < 13000:
        raise RuntimeError(f"CUDA runtime {version.value} has no {name} with edge data (needs CUDA 12.3 or newer)")
    return getattr(rt, name)


def _edges(graph: int) -> list[tuple[int, int, EdgeData]]:
    """The edges of ``graph`` as (from node, to node, edge data)."""
    g = ctypes.c_void_p(graph)
    get_edges = _edge_data_api("cudaGraphGetEdges")
    m = ctypes.c_size_t(0)
    check(get_edges(g, None, None, None, ctypes.byref(m)), "cudaGraphGetEdges")
    frm, to, data = (ctypes.c_void_p * m.value)(), (ctypes.c_void_p * m.value)(), (EdgeData * m.value)()
    check(get_edges(g, frm, to, data, ctypes.byref(m)), "cudaGraphGetEdges")
    return [(frm[k], to[k], data[k]) for k in range(m.value)]


def structure(graph: int) -> tuple[tuple[str, ...], tuple[tuple, ...]]:
    """The node structure of a ``cudaGraph_t``: its node types (in the order the runtime lists them: creation
    order for a captured graph) and its edges as (from index, to index, from port, to port, type), sorted; a
    programmatic (PDL) edge has type 1.  ``cudaGraphExecUpdate`` re-targets an executable graph only to a graph of
    the same topology and node types, so two graphs with different structures never update into each other (equal
    structures are necessary, not sufficient: an update may still refuse, e.g. a changed kernel attribute)."""
    nodes = _nodes(graph)
    index = {nd: k for k, nd in enumerate(nodes)}
    types = tuple(_node_type(nd) for nd in nodes)
    edges = [(index[f], index[t], d.from_port, d.to_port, d.type) for f, t, d in _edges(graph)]
    return types, tuple(sorted(edges))


class NotFlattenable(Exception):
    """A child graph holds a node :func:`flat_chain` does not copy (only kernel nodes are copied)."""


def flat_chain(children: list[int]) -> int:
    """A new ``cudaGraph_t`` running ``children`` one after another with their kernel nodes copied in (no child-graph
    nodes): each child's edges are kept with their data, and each child's last kernel leads to the next child's
    first one through the same kind of edge the whole-step graph has there.  That is a programmatic-launch (PDL)
    edge when the next kernel's function is one that a programmatic edge leads to inside some child (it was
    launched with programmatic stream serialization and waits for its predecessor in-kernel: every such kernel of
    this engine does), else a plain edge.  A chain of child-graph nodes has plain edges at every boundary, where a
    captured whole step overlaps the next kernel's launch with the previous one's tail.  Raises
    :class:`NotFlattenable` for a child with other node types or more than one first or last node."""
    rt, drv = cudart(), cudriver()
    vp = ctypes.c_void_p
    add_deps = _edge_data_api("cudaGraphAddDependencies")
    g = vp()
    check(rt.cudaGraphCreate(ctypes.byref(g), ctypes.c_uint(0)), "cudaGraphCreate")

    def edge(a: int, b: int, data: EdgeData | None) -> None:
        d = data if data is not None else EdgeData()
        check(add_deps(g, (vp * 1)(a), (vp * 1)(b), ctypes.byref(d), ctypes.c_size_t(1)), "cudaGraphAddDependencies")

    try:
        pdl_into: dict[int, EdgeData] = {}  # kernel function -> data of a programmatic edge leading to it
        ends = []  # per child: (first node, its function), last node
        for child in children:
            nodes = _nodes(child)
            copies, funcs = {}, {}
            for nd in nodes:
                kind = _node_type(nd)
                if kind != "kernel":
                    raise NotFlattenable(f"a child graph holds a {kind} node")
                p = KernelNodeParams()
                check(drv.cuGraphKernelNodeGetParams_v2(vp(nd), ctypes.byref(p)), "cuGraphKernelNodeGetParams")
                out = vp()
                check(drv.cuGraphAddKernelNode_v2(ctypes.byref(out), g, None, ctypes.c_size_t(0), ctypes.byref(p)),
                      "cuGraphAddKernelNode")
                check(drv.cuGraphKernelNodeCopyAttributes(out, vp(nd)), "cuGraphKernelNodeCopyAttributes")
                copies[nd], funcs[nd] = out.value, p.func
            edges = _edges(child)
            for f, t, d in edges:
                edge(copies[f], copies[t], d)
                if d.type == PROGRAMMATIC:
                    pdl_into.setdefault(funcs[t], d)
            has_in, has_out = {t for _, t, _ in edges}, {f for f, _, _ in edges}
            first = [nd for nd in nodes if nd not in has_in]
            last = [nd for nd in nodes if nd not in has_out]
            if len(first) != 1 or len(last) != 1:
                raise NotFlattenable(f"a child graph has {len(first)} first and {len(last)} last nodes")
            ends.append(((copies[first[0]], funcs[first[0]]), copies[last[0]]))
        for (_, last), ((first, func), _) in zip(ends, ends[1:]):
            edge(last, first, pdl_into.get(func))
    except Exception:
        rt.cudaGraphDestroy(g)
        raise
    return g.value


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

    def __init__(self, children: list[int], signature: object = None, flat: bool = False):
        """``signature``: the children's structures (see :func:`structure`), kept for the caller to pick a
        composite to re-target.  ``flat``: copy the children's kernels in (:func:`flat_chain`) instead of adding
        them as child-graph nodes (:func:`chain`); raises :class:`NotFlattenable` where that cannot be done."""
        rt = cudart()
        self.signature = signature
        self.flat = flat
        self.exec = ctypes.c_void_p()
        g = flat_chain(children) if flat else chain(children)
        try:
            check(rt.cudaGraphInstantiate(ctypes.byref(self.exec), ctypes.c_void_p(g), ctypes.c_ulonglong(0)),
                  "cudaGraphInstantiate")
        finally:
            rt.cudaGraphDestroy(ctypes.c_void_p(g))
        self.num_updates = 0
        self.upload()

    def update(self, children: list[int], signature: object = None) -> bool:
        """Re-target the executable graph to ``children`` in place (``cudaGraphExecUpdate``; launches already
        enqueued are not affected).  False when the structure differs (or a flat graph's new children cannot be
        flattened): the graph is then unusable and must be closed (CUDA leaves a failed update's graph undefined)."""
        rt = cudart()
        try:
            g = flat_chain(children) if self.flat else chain(children)
        except NotFlattenable:
            return False
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
