"""The systems compared in the artifact, all run inside the same engine so that only the policy differs.

================  =======================================================================================
system            what it is
================  =======================================================================================
``fp16``          every layer FP16 for the whole run (the paper's FP16 / SwiftLLM baseline)
``w4``            every layer W4 for the whole run, with the freed weight memory turned into KV blocks
                  (the paper's static AWQ INT4 baseline)
``selective-K``   the ``K`` least important layers (importance order) W4 for the whole run, the rest FP16,
                  freed memory as KV blocks (the paper's Table 5 static selective baseline; K = 8, 16)
``morphserve-M``  MorphServe: layers swapped at runtime by the controller in mode ``M`` (accuracy, default,
                  performance), KV capacity resized with them
================  =======================================================================================

:func:`attach_system` builds the staged variants, the swapper, the KV resizer and the controller (or the static
map) for an engine, applies a static map before serving, and installs the morpher in the engine's step loop.
:func:`attach_static` does the same for any explicit static precision map (the static systems above, and
baselines that choose their own map, e.g. ``baselines.llm_pq``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from morphserve.engine.controller import MorphController, mode_config
from morphserve.engine.morpher import Morpher
from morphserve.memory.kv_resizer import KVResizer, ReleasePolicy
from morphserve.memory.layer_swapper import LayerSwapper, ScratchBlocks
from morphserve.memory.weight_arena import Precision

_LOG = logging.getLogger(__name__)

STATIC_SYSTEMS = ("fp16", "w4", "selective-8", "selective-16")
DYNAMIC_SYSTEMS = ("morphserve-accuracy", "morphserve-default", "morphserve-performance")
SYSTEMS = STATIC_SYSTEMS + DYNAMIC_SYSTEMS


@dataclass(frozen=True)
class SystemSpec:
    name: str
    static_w4_layers: int | None  # static systems: how many layers (by importance order) are W4; None = all
    mode: str | None  # dynamic systems: the controller mode

    @property
    def dynamic(self) -> bool:
        return self.mode is not None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "static_w4_layers": self.static_w4_layers, "mode": self.mode}


def system_spec(name: str) -> SystemSpec:
    if name == "fp16":
        return SystemSpec(name, 0, None)
    if name == "w4":
        return SystemSpec(name, None, None)
    m = re.fullmatch(r"selective-(\d+)", name)
    if m:
        return SystemSpec(name, int(m.group(1)), None)
    m = re.fullmatch(r"morphserve-(accuracy|default|performance)", name)
    if m:
        return SystemSpec(name, None, m.group(1))
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)} (selective-K for any K)")


def static_map(spec: SystemSpec, num_layers: int, order: list[int]) -> list[Precision]:
    k = num_layers if spec.static_w4_layers is None else spec.static_w4_layers
    if not 0 <= k <= num_layers:
        raise ValueError(f"{spec.name}: cannot make {k} of {num_layers} layers W4")
    chosen = set(order[:k])
    return [Precision.W4 if i in chosen else Precision.FP16 for i in range(num_layers)]


def _swapper_and_resizer(engine, staged, copy_budget: int | None = None) -> tuple[LayerSwapper, KVResizer]:
    scratch = ScratchBlocks(engine.pool, engine.block_manager) if engine.device.type == "cuda" else None
    swapper = LayerSwapper(engine.model.arena, staged, engine.device, scratch=scratch, copy_budget=copy_budget)
    resizer = KVResizer(engine.pool, engine.block_manager, engine.model.arena,
                        lambda: [r.block_table for r in engine.scheduler.running])
    return swapper, resizer


def reserve_for_staging(engine, swapper: LayerSwapper, ladder) -> int:
    """Keep enough free base-pool KV blocks for one staged swap between any rungs of ``ladder`` (the largest
    quantized variant's bytes) out of the sequences' reach, and make the swapper stage every swap: one that finds
    the scratch taken waits for a later step instead of running in place with per-layer graphs (slower steps;
    BENCHMARKS.md, issue 5).  Returns the reserve in blocks (0 without scratch, i.e. on CPU).  A base pool too small
    to spare the reserve (more than a quarter of it) keeps the in-place fallback and no reserve."""
    need = swapper.max_scratch_blocks(ladder)
    base = engine.pool.segments[0].num_blocks
    if need == 0 or 4 * need > base:
        if need:
            _LOG.warning("base KV pool of %d blocks cannot spare %d for staged swaps: swaps may run in place",
                         base, need)
        return 0
    engine.block_manager.set_base_reserve(need)
    swapper.staged_only = True
    return need


def attach_static(engine, precisions: list[Precision], staged=None,
                  release_policy: ReleasePolicy = ReleasePolicy.MIGRATE) -> Morpher:
    """Install the static precision map ``precisions`` (one per layer) on ``engine`` (idle and all-FP16): stage
    FP16 and the quantized precisions the map uses (unless ``staged`` is given), bring every layer to its precision
    now (freed slot bytes become KV blocks) and install the morpher.  Returns the morpher."""
    n = engine.model_config.num_layers
    precisions = [Precision(p) for p in precisions]
    if len(precisions) != n:
        raise ValueError(f"a static map needs one precision per layer: got {len(precisions)} for {n} layers")
    import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and kernels)
    from morphserve.quant.staging import StagedVariants

    if staged is None:
        used = tuple(p for p in Precision if p != Precision.FP16 and p in precisions)
        staged = StagedVariants.build(engine.model, precisions=(Precision.FP16, *used))
    swapper, resizer = _swapper_and_resizer(engine, staged)
    morpher = Morpher(engine, swapper, resizer, static_map=precisions, release_policy=release_policy)
    morpher.apply_now()
    engine.morpher = morpher
    return morpher


def attach_system(engine, name: str, order: list[int], staged=None, mode_overrides: dict[str, Any] | None = None,
                  release_policy: ReleasePolicy = ReleasePolicy.MIGRATE) -> Morpher | None:
    """Install system ``name`` on ``engine`` (which must be idle and all-FP16).  ``order``: swap order, least
    important layer first.  Returns the morpher (None for ``fp16``, which needs none)."""
    spec = system_spec(name)
    n = engine.model_config.num_layers
    if sorted(order) != list(range(n)):
        raise ValueError(f"swap order must be a permutation of 0..{n - 1}")
    if spec.static_w4_layers == 0:
        return None
    if not spec.dynamic:
        return attach_static(engine, static_map(spec, n, order), staged, release_policy)
    import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and kernels)
    from morphserve.quant.staging import StagedVariants

    mode = mode_config(spec.mode, **(mode_overrides or {}))
    if staged is None:
        staged = StagedVariants.build(engine.model, precisions=(Precision.FP16, *mode.ladder))
    budget = None if mode.copy_mib_per_step is None else mode.copy_mib_per_step << 20
    swapper, resizer = _swapper_and_resizer(engine, staged, budget)
    reserve_for_staging(engine, swapper, mode.ladder)
    controller = MorphController(mode, n, list(order))
    morpher = Morpher(engine, swapper, resizer, controller=controller, release_policy=release_policy)
    engine.morpher = morpher
    return morpher
