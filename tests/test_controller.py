"""The morphing controller: level -> precision maps along the ladder, hysteresis, dwell, budgets, modes."""

from dataclasses import replace

import pytest

from morphserve.engine.controller import MODES, ModeConfig, MorphController, mode_config
from morphserve.engine.monitor import MonitorSnapshot
from morphserve.memory.weight_arena import Precision

P = Precision
ORDER = [5, 2, 7, 0, 1, 3, 4, 6]


def snap(step, kv=0.5, queue=0, delay=0.0, preempt=0):
    return MonitorSnapshot(step=step, time=step * 0.01, kv_utilization=kv, free_blocks=10, total_blocks=100,
                           queue_len=queue, queueing_delay_s=delay, running=4, preemptions_in_window=preempt,
                           ttft_p95_s=None, tpot_mean_s=None)


def test_ladder_maps_are_nested_prefixes_of_the_order():
    c = MorphController(mode_config("default", max_layer_fraction=0.5), 8, ORDER)
    assert c.max_layers == 4 and c.max_level == 8
    maps = [c.target_map(level) for level in range(c.max_level + 1)]
    assert maps[0] == [P.FP16] * 8
    assert [i for i, p in enumerate(maps[2]) if p != P.FP16] == sorted(ORDER[:2])
    assert all(maps[4][i] == P.W8 for i in ORDER[:4])
    assert maps[6][5] == P.W4 and maps[6][2] == P.W4 and maps[6][7] == P.W8 and maps[6][0] == P.W8
    assert all(maps[8][i] == P.W4 for i in ORDER[:4]) and all(maps[8][i] == P.FP16 for i in ORDER[4:])
    for a, b in zip(maps, maps[1:]):  # consecutive levels: exactly one layer moves one rung
        assert sum(x != y for x, y in zip(a, b)) == 1
    perf = MorphController(mode_config("performance"), 8, ORDER)
    assert perf.target_map(3) == [P.W4 if i in ORDER[:3] else P.FP16 for i in range(8)]
    with pytest.raises(ValueError, match="outside"):
        perf.target_map(perf.max_level + 1)


def test_pressure_must_persist_and_dwell_applies():
    mode = mode_config("default", persist_steps=3, min_dwell_steps=5, layers_per_decision=2)
    c = MorphController(mode, 8, ORDER)
    assert c.decide(snap(0, kv=0.95)) is None and c.decide(snap(1, kv=0.95)) is None
    d = c.decide(snap(2, kv=0.95))
    assert d is not None and (d.old_level, d.new_level) == (0, 2) and "kv 95%" in d.reason
    for s in range(3, 7):  # pressure persists but the dwell time has not passed
        assert c.decide(snap(s, kv=0.95)) is None
    assert c.decide(snap(7, kv=0.95)).new_level == 4
    # a single spike after a calm step does not count
    c2 = MorphController(mode, 8, ORDER)
    for s, kv in enumerate([0.95, 0.95, 0.5, 0.95, 0.95]):
        assert c2.decide(snap(s, kv=kv)) is None


def test_each_pressure_signal_and_relief():
    mode = mode_config("performance", persist_steps=1, min_dwell_steps=0, relief_persist_steps=3,
                       layers_per_decision=1)
    c = MorphController(mode, 8, ORDER)
    assert "queueing" in c.decide(snap(0, delay=0.2, queue=3)).reason
    assert "preemptions" in c.decide(snap(1, preempt=2)).reason
    assert c.level == 2
    assert c.decide(snap(2, kv=0.3, queue=1)) is None  # queue not empty: no relief
    assert c.decide(snap(3, kv=0.3)) is None and c.decide(snap(4, kv=0.3)) is None
    d = c.decide(snap(5, kv=0.3))
    assert d.new_level == 1 and d.reason.startswith("relief")
    assert c.decide(snap(6, kv=0.7)) is None  # between kv_low and kv_high: neither


def test_level_is_bounded():
    c = MorphController(mode_config("accuracy", persist_steps=1, min_dwell_steps=0), 8, ORDER)
    for s in range(20):
        c.decide(snap(s, kv=0.99))
    assert c.level == c.max_level == 2 and c.target_map().count(P.W8) == 2


def test_modes_and_validation():
    assert set(MODES) == {"accuracy", "default", "performance"}
    a, d, p = MODES["accuracy"], MODES["default"], MODES["performance"]
    assert a.kv_high > d.kv_high > p.kv_high and a.persist_steps > d.persist_steps > p.persist_steps
    assert a.max_layer_fraction < d.max_layer_fraction < p.max_layer_fraction
    with pytest.raises(ValueError, match="unknown morphing mode 'turbo'"):
        mode_config("turbo")
    with pytest.raises(ValueError, match="kv_low < kv_high"):
        mode_config("default", kv_low=0.95)
    with pytest.raises(ValueError, match="ladder"):
        ModeConfig("x", (P.FP16,), 0.5, 1, 0.9, 0.5, 0.1, 1, 1, 0)
    with pytest.raises(ValueError, match="permutation"):
        MorphController(MODES["default"], 4, [0, 1, 1, 2])
    assert mode_config("default", ladder=["w4"]).ladder == (P.W4,)
    assert all(m.copy_mib_per_step == 16 for m in MODES.values()) and mode_config("default", copy_mib_per_step=None)
    with pytest.raises(ValueError, match="copy_mib_per_step must be >= 1 MiB or None .* got 0"):
        mode_config("default", copy_mib_per_step=0)


def test_stale_preemptions_do_not_block_relief_when_idle():
    mode = mode_config("performance", persist_steps=1, min_dwell_steps=0, relief_persist_steps=2,
                       layers_per_decision=1)
    c = MorphController(mode, 8, ORDER)
    c.decide(snap(0, preempt=1))
    assert c.level == 1
    idle = MonitorSnapshot(step=1, time=0.02, kv_utilization=0.0, free_blocks=100, total_blocks=100, queue_len=0,
                           queueing_delay_s=0.0, running=0, preemptions_in_window=1, ttft_p95_s=None,
                           tpot_mean_s=None)
    assert c.decide(idle) is None
    assert c.decide(replace(idle, step=2)).new_level == 0
