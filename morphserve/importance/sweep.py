"""Evaluate many precision configurations of one model on the same windows, sharing every common prefix.

Greedy importance search and the order study both ask the same question many times: what does the model output
when the layers of a set are quantized?  Configurations that agree on layers ``0..j`` have identical residual
streams up to layer ``j``, so :func:`sweep` computes the configurations as a prefix tree, one layer at a time:

* at layer ``j`` every *group* (configurations with the same precisions on layers ``0..j-1``, hence the same
  hidden state) splits by the precision its members give layer ``j``;
* all groups that run layer ``j`` at the same precision are concatenated along the window axis and run as one
  batch (one weight read, larger GEMMs, which matters on CPU where small GEMMs run at a fraction of peak);
* after the last layer each distinct configuration is reduced once (``reduce`` receives its final-normed hidden
  state) and the result is shared by every duplicate.

The cost is the number of nodes of the prefix tree times the tokens per window batch; :class:`SweepStats` counts
it in *token-layers* (one decoder layer applied to one token), the unit in which profiling costs are reported.
For the greedy searches of :mod:`morphserve.importance.orders` (candidates ``Q + {p}`` for every remaining ``p``)
this is the suggested "cache the prefix activations": the shared prefix before each candidate layer is computed
once and every candidate only pays for the layers from ``p`` on.

Peak memory is one hidden state per live group: at most ``len(configs) x B x T x hidden`` elements (callers cut
long inputs into window chunks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from morphserve.importance.runner import Config, LayerRunner
from morphserve.memory.weight_arena import Precision

R = TypeVar("R")


@dataclass
class SweepStats:
    """Work done by one or more sweeps."""

    layer_batches: int = 0  # calls of LayerRunner.layer
    token_layers: int = 0  # decoder layers applied, times tokens
    configs: int = 0  # distinct configurations reduced

    def add(self, other: "SweepStats") -> None:
        self.layer_batches += other.layer_batches
        self.token_layers += other.token_layers
        self.configs += other.configs


@torch.no_grad()
def sweep(runner: LayerRunner, x0: torch.Tensor, configs: Sequence[Sequence[Precision]],
          reduce: Callable[[torch.Tensor], R], desc: str | None = None) -> tuple[list[R], SweepStats]:
    """``reduce(final-normed hidden state)`` of every configuration in ``configs``, in order.

    ``x0``: the input of layer 0 (``runner.embed(tokens)``, ``[B, T, hidden]``).  ``desc`` shows a progress bar
    over layers."""
    if not configs:
        raise ValueError("sweep needs at least one configuration")
    checked = [runner.check_config(c) for c in configs]
    if x0.dim() != 3:
        raise ValueError(f"x0 must be the embedded windows [B, T, hidden], got shape {tuple(x0.shape)}")
    windows, tokens = x0.shape[0], x0.shape[0] * x0.shape[1]
    stats = SweepStats()
    groups: list[tuple[torch.Tensor, list[int]]] = [(x0, list(range(len(checked))))]
    for j in tqdm(range(runner.num_layers), desc=desc, unit="layer", leave=False, disable=desc is None):
        # split every group by the precision its members give layer j; children of one parent share its input
        children: dict[Precision, list[tuple[torch.Tensor, list[int]]]] = {}
        for hidden, members in groups:
            by_precision: dict[Precision, list[int]] = {}
            for m in members:
                by_precision.setdefault(checked[m][j], []).append(m)
            for p, ms in by_precision.items():
                children.setdefault(p, []).append((hidden, ms))
        groups = []
        for p, batch in children.items():
            x = torch.cat([h for h, _ in batch]) if len(batch) > 1 else batch[0][0]
            y = runner.layer(j, p, x)
            stats.layer_batches += 1
            stats.token_layers += tokens * len(batch)
            groups.extend((part, ms) for part, (_, ms) in zip(y.split(windows), batch))
    results: list[R | None] = [None] * len(checked)
    for hidden, members in groups:
        value = reduce(runner.final_norm(hidden))
        stats.configs += 1
        for m in members:
            results[m] = value
    return results, stats  # type: ignore[return-value]  (every index is the member of exactly one group)


def distinct_configs(configs: Sequence[Config]) -> list[Config]:
    """``configs`` without duplicates, first occurrence kept."""
    return list(dict.fromkeys(configs))


def tree_nodes(configs: Sequence[Config]) -> int:
    """Nodes of the prefix tree of ``configs`` (layer evaluations per window batch that :func:`sweep` performs)."""
    return len({c[:j + 1] for c in configs for j in range(len(c))})
