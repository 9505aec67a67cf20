"""The morphing controller: from monitor snapshots to a target precision map.

The controller moves a single integer, the *morph level*, between 0 (every layer FP16) and ``max_level``.  A mode
turns levels into precision maps through a *ladder* and a swap order (least important layer first, from the
layer-importance profile):

* ladder ``(W8,)`` or ``(W4,)``: level ``k`` puts the first ``k`` layers of the order at that precision;
* ladder ``(W8, W4)``: levels ``1..M`` put the first layers at W8 one by one, levels ``M+1..2M`` then take those
  same layers, in the same order, from W8 to W4 (``M`` = ``max_layers``).

So consecutive levels differ by exactly one layer moving one rung, and every level's map is a prefix of the next:
whatever the level, the least important layers are the quantized ones.

Decisions (:meth:`MorphController.decide`):

* *pressure* when KV utilisation >= ``kv_high``, or the oldest waiting request has queued >= ``queue_delay_high_s``,
  or a request was preempted within the monitor's window while requests are still running or waiting;
* *relief* when KV utilisation <= ``kv_low``, the queue is empty and nothing was preempted in the window;
* the condition must hold for ``persist_steps`` consecutive steps (``relief_persist_steps`` for relief): hysteresis
  against single-step spikes;
* after a decision the controller waits ``min_dwell_steps`` steps before the next one;
* a decision moves the level by at most ``layers_per_decision`` (the per-step budget).

The controller only decides; :mod:`morphserve.engine.morpher` carries decisions out (swaps, KV growth and release).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from morphserve.engine.monitor import MonitorSnapshot
from morphserve.memory.weight_arena import Precision


@dataclass(frozen=True)
class ModeConfig:
    name: str
    ladder: tuple[Precision, ...]  # the rungs a layer goes down, in order
    max_layer_fraction: float  # share of the decoder layers that may be quantized
    layers_per_decision: int  # per-step budget: level change of one decision
    kv_high: float  # KV utilisation that counts as pressure
    kv_low: float  # KV utilisation under which relief can count
    queue_delay_high_s: float  # queueing delay of the oldest waiting request that counts as pressure
    persist_steps: int  # consecutive pressure steps before going down
    relief_persist_steps: int  # consecutive relief steps before going up
    min_dwell_steps: int  # steps between two decisions
    # staged-swap copy bytes enqueued per decode step, MiB (None: a swap's whole copy at its request).  On an H200 a
    # host-to-device copy slows the decode GEMVs it overlaps (5-6% of a batch-1 step with a copy through all of
    # it); 16 MiB per step did not measurably slow a step at batch 1-32 and lands a W4 layer of a 7B (107 MB) in 7
    # steps, a FP16 one (405 MB) in 25 (BENCHMARKS.md, issue 5)
    copy_mib_per_step: int | None = 16

    def __post_init__(self) -> None:
        if not self.ladder or any(p == Precision.FP16 for p in self.ladder):
            raise ValueError(f"mode {self.name!r}: ladder must list quantized precisions, got {self.ladder}")
        if not 0 < self.max_layer_fraction <= 1:
            raise ValueError(f"mode {self.name!r}: max_layer_fraction must be in (0, 1], got "
                             f"{self.max_layer_fraction}")
        if not 0 <= self.kv_low < self.kv_high <= 1:
            raise ValueError(f"mode {self.name!r}: need 0 <= kv_low < kv_high <= 1, got {self.kv_low}, "
                             f"{self.kv_high}")
        for f in ("layers_per_decision", "persist_steps", "relief_persist_steps"):
            if getattr(self, f) < 1:
                raise ValueError(f"mode {self.name!r}: {f} must be >= 1, got {getattr(self, f)}")
        if self.copy_mib_per_step is not None and self.copy_mib_per_step < 1:
            raise ValueError(f"mode {self.name!r}: copy_mib_per_step must be >= 1 MiB or None (unpaced), got "
                             f"{self.copy_mib_per_step}")
        if self.min_dwell_steps < 0 or self.queue_delay_high_s <= 0:
            raise ValueError(f"mode {self.name!r}: min_dwell_steps >= 0 and queue_delay_high_s > 0 required")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ladder"] = [p.value for p in self.ladder]
        return d


# Documented defaults.  ``accuracy`` waits for more pressure and only goes to W8 on at most a quarter of the layers;
# ``performance`` reacts early (the paper's example thresholds: KV > 85 %, queueing > 100 ms) and deep, straight to
# W4 on up to three quarters of the layers; ``default`` sits between, stepping layers through W8 then W4.  Every
# mode paces staged-swap copies at 16 MiB per step (``copy_mib_per_step``).
MODES: dict[str, ModeConfig] = {
    "accuracy": ModeConfig("accuracy", (Precision.W8,), 0.25, 1, kv_high=0.95, kv_low=0.60,
                           queue_delay_high_s=0.5, persist_steps=8, relief_persist_steps=64, min_dwell_steps=16),
    "default": ModeConfig("default", (Precision.W8, Precision.W4), 0.5, 2, kv_high=0.90, kv_low=0.60,
                          queue_delay_high_s=0.2, persist_steps=4, relief_persist_steps=48, min_dwell_steps=8),
    "performance": ModeConfig("performance", (Precision.W4,), 0.75, 4, kv_high=0.85, kv_low=0.50,
                              queue_delay_high_s=0.1, persist_steps=2, relief_persist_steps=32, min_dwell_steps=4),
}


def mode_config(name: str, **overrides: Any) -> ModeConfig:
    try:
        base = MODES[name]
    except KeyError:
        raise ValueError(f"unknown morphing mode {name!r}; choose one of {', '.join(MODES)}") from None
    if "ladder" in overrides:
        overrides["ladder"] = tuple(Precision(p) for p in overrides["ladder"])
    return replace(base, **overrides)


@dataclass(frozen=True)
class Decision:
    step: int
    old_level: int
    new_level: int
    reason: str


@dataclass
class MorphController:
    mode: ModeConfig
    num_layers: int
    order: list[int]  # swap order, least important first
    level: int = 0
    decisions: list[Decision] = field(default_factory=list)
    _pressure_run: int = 0
    _relief_run: int = 0
    _last_decision_step: int | None = None

    def __post_init__(self) -> None:
        if sorted(self.order) != list(range(self.num_layers)):
            raise ValueError(f"swap order must be a permutation of 0..{self.num_layers - 1}, got {self.order}")

    @property
    def max_layers(self) -> int:
        return max(1, int(self.mode.max_layer_fraction * self.num_layers))

    @property
    def max_level(self) -> int:
        return self.max_layers * len(self.mode.ladder)

    def target_map(self, level: int | None = None) -> list[Precision]:
        """The precision of every layer at ``level`` (default: the current level)."""
        level = self.level if level is None else level
        if not 0 <= level <= self.max_level:
            raise ValueError(f"level {level} outside [0, {self.max_level}]")
        out = [Precision.FP16] * self.num_layers
        m = self.max_layers
        for rung, precision in enumerate(self.mode.ladder):
            count = min(m, max(0, level - rung * m))
            for layer in self.order[:count]:
                out[layer] = precision
        return out

    def decide(self, snap: MonitorSnapshot) -> Decision | None:
        """Update the hysteresis counters with ``snap``; returns a decision when the level changes."""
        m = self.mode
        reasons = []
        if snap.kv_utilization >= m.kv_high:
            reasons.append(f"kv {snap.kv_utilization:.0%} >= {m.kv_high:.0%}")
        if snap.queueing_delay_s >= m.queue_delay_high_s:
            reasons.append(f"queueing {snap.queueing_delay_s * 1e3:.0f} ms >= {m.queue_delay_high_s * 1e3:.0f} ms")
        if snap.preemptions_in_window and (snap.running or snap.queue_len):  # stale once the engine is idle
            reasons.append(f"{snap.preemptions_in_window} preemptions in window")
        relief = (not reasons and snap.kv_utilization <= m.kv_low and snap.queue_len == 0)
        self._pressure_run = self._pressure_run + 1 if reasons else 0
        self._relief_run = self._relief_run + 1 if relief else 0
        if self._last_decision_step is not None and snap.step - self._last_decision_step < m.min_dwell_steps:
            return None
        new = self.level
        if self._pressure_run >= m.persist_steps and self.level < self.max_level:
            new = min(self.max_level, self.level + m.layers_per_decision)
            why = "pressure: " + ", ".join(reasons) + f" for {self._pressure_run} steps"
        elif self._relief_run >= m.relief_persist_steps and self.level > 0:
            new = max(0, self.level - m.layers_per_decision)
            why = (f"relief: kv {snap.kv_utilization:.0%} <= {m.kv_low:.0%}, empty queue for "
                   f"{self._relief_run} steps")
        if new == self.level:
            return None
        d = Decision(snap.step, self.level, new, why)
        self.level = new
        self._last_decision_step = snap.step
        self._pressure_run = self._relief_run = 0
        self.decisions.append(d)
        return d
