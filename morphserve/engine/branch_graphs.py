"""Branch graphs: one decode graph per batch bucket that serves every precision map, swaps in flight included.

Why.  A step with a layer swap in flight must order one layer against the swap's copy: the copy may start only
after the step's last read of the layer's old bytes, and the first step at the new precision may read the layer
only after the copy has landed.  Replaying one graph per layer with the swapper's event wait and record between
them (:meth:`DecodeGraphs.run_layerwise`) costs 1.03-1.11x a whole-step graph on an H200 (32 launches and the gaps
between them), and capturing a whole-step graph for each new map costs more host time than the step itself
(``BENCHMARKS.md``, issue #5).

How.  The graph of bucket ``b`` is captured once, with every layer written as

    gate(l) -> fork -> [ layer l at precision p ] for each variant p of l (parallel branches) -> join -> done(l)

and is then edited, not recaptured, with ``cudaGraphNodeSetEnabled`` (:mod:`morphserve.engine.graph_nodes`): the
host enables the branch of each layer's precision for the next launch and disables the others (a disabled node
runs nothing but keeps its dependencies, so the disabled branches cost only empty nodes off the critical path).
The branches of a layer read and write the same static activation buffers; exactly one is enabled.

``gate(l)`` and ``done(l)`` are the swap protocol (:mod:`morphserve.kernels.stream_flags`), disabled except in the
steps that need them: ``gate(l)`` in the first step at a layer's new precision (waits for the swapper's ``ready``
flag set by the copy stream, and consumes it); ``done(l)`` in a step whose swap of ``l`` is queued (increments the
layer's counter after the layer's last kernel; the copy stream waits for that count before it copies).

A graph is valid for the variants it was captured with (the staged precisions of each layer) and the swapper's
flag tensors; :class:`~morphserve.engine.cuda_graphs.DecodeGraphs` recaptures when either changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from morphserve.engine.graph_nodes import capture_nodes, set_enabled, toggleable
from morphserve.memory.weight_arena import Precision

if TYPE_CHECKING:
    from morphserve.engine.cuda_graphs import DecodeGraphs


@dataclass
class BranchGraph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket, vocab] float32, written by each launch
    variants: tuple[tuple[Precision, ...], ...]  # per layer, the precisions it has a branch for
    flags: tuple[int, int]  # data_ptr of the swapper's ready flags and done counters the gates were captured with
    branches: dict[tuple[int, Precision], list[int]]  # the nodes of each branch of a multi-variant layer
    gates: list[list[int]]
    dones: list[list[int]]
    selected: list[Precision]  # the enabled branch of each layer
    gates_on: set[int] = field(default_factory=set)
    dones_on: set[int] = field(default_factory=set)
    toggles: int = 0  # nodes enabled or disabled since the capture (host work per step)

    @property
    def exec(self) -> int:
        return self.graph.raw_cuda_graph_exec()

    def apply(self, precisions: list[Precision], gates: set[int], dones: set[int]) -> None:
        """Set up the next launch: layer ``l`` runs at ``precisions[l]``; the gates of ``gates`` and the done
        counters of ``dones`` run, the others do not."""
        ex = self.exec
        for i, p in enumerate(precisions):
            cur = self.selected[i]
            if cur == p:
                continue
            if p not in self.variants[i]:
                raise RuntimeError(f"layer {i} runs at {p.value} in this step but its branch graph has only "
                                   f"{[v.value for v in self.variants[i]]}")
            self._toggle(ex, self.branches[(i, cur)], False)
            self._toggle(ex, self.branches[(i, p)], True)
            self.selected[i] = p
        for on, want, nodes in ((self.gates_on, gates, self.gates), (self.dones_on, dones, self.dones)):
            for i in on - want:
                self._toggle(ex, nodes[i], False)
            for i in want - on:
                self._toggle(ex, nodes[i], True)
            on.clear()
            on.update(want)

    def _toggle(self, ex: int, nodes: list[int], enabled: bool) -> None:
        set_enabled(ex, nodes, enabled)
        self.toggles += len(nodes)


def capture_branch_graph(graphs: "DecodeGraphs", b: int, variants: tuple[tuple[Precision, ...], ...],
                         ready: torch.Tensor, done: torch.Tensor) -> BranchGraph:
    """Capture bucket ``b``'s branch graph (see the module docstring) and select the arena's current precisions.
    ``ready`` and ``done``: the swapper's int32 ``[num_layers]`` flag and counter tensors."""
    from morphserve.kernels.stream_flags import wait_flag  # Triton: imported only once a GPU graph is captured

    model, arena = graphs.model, graphs.model.arena
    n = model.cfg.num_layers
    if len(variants) != n:
        raise ValueError(f"variants for {len(variants)} layers, the model has {n}")
    saved = list(arena.layers)
    current = [lw.precision for lw in saved]
    for i, (vs, p) in enumerate(zip(variants, current)):
        if p not in vs:
            raise ValueError(f"layer {i} is at {p.value}, which is not among its variants {[v.value for v in vs]}")
    st = graphs._stage(b)
    streams = [torch.cuda.Stream(device=model.device) for _ in range(max(len(vs) for vs in variants))]

    def body(nodes: dict | None):
        """The step on the bucket's static buffers.  ``nodes`` is None for the eager warm-up (every branch runs,
        no gates: nothing would set their flags), else a dict that receives each toggled piece's nodes."""
        main = torch.cuda.current_stream()

        def piece(key, stream: torch.cuda.Stream, fn: Callable[[], None]) -> None:
            if nodes is None:
                fn()
                return
            before = capture_nodes(stream)
            fn()
            nodes[key] = toggleable(capture_nodes(stream) - before, f"branch graph piece {key}")

        try:
            with graphs.kernels.linear_scope():
                for i in range(n):
                    if nodes is not None:
                        piece(("gate", i), main, lambda: wait_flag(ready[i:i + 1]))
                    if len(variants[i]) == 1:
                        graphs._layer_step(i, st, head=False)
                    else:
                        fork = torch.cuda.Event()
                        fork.record(main)
                        ends = []
                        for p, s in zip(variants[i], streams):
                            s.wait_event(fork)
                            with torch.cuda.stream(s):
                                arena.set_precision(i, p)
                                piece(("branch", i, p), s, lambda: graphs._layer_step(i, st, head=False))
                                ends.append(torch.cuda.Event())
                                ends[-1].record(s)
                        for e in ends:
                            main.wait_event(e)
                    if nodes is not None:
                        piece(("done", i), main, lambda: done[i:i + 1].add_(1))
                return model.head(st.x, st.residual, st.batch.logits_indices, graphs.kernels)
        finally:
            arena.layers[:] = saved

    graphs._pad_inputs(b)
    graphs._fresh_pool()
    side = torch.cuda.Stream(device=model.device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body(None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    nodes: dict = {}
    with torch.cuda.graph(graph, pool=graphs.mempool, capture_error_mode="thread_local"):
        logits = body(nodes)
    graph.instantiate()
    bg = BranchGraph(graph, logits, variants, (ready.data_ptr(), done.data_ptr()),
                     {(k[1], k[2]): v for k, v in nodes.items() if k[0] == "branch"},
                     [nodes[("gate", i)] for i in range(n)], [nodes[("done", i)] for i in range(n)], list(current))
    ex = bg.exec
    for i in range(n):  # everything is enabled after instantiation: keep only the current precisions' branches
        set_enabled(ex, bg.gates[i] + bg.dones[i], False)
        for p in variants[i]:
            if p != current[i]:
                set_enabled(ex, bg.branches[(i, p)], False)
    return bg
