"""The LLM-PQ-style planner (baselines/llm_pq.py): the MILP equals brute force over every map, plans respect the
budget at both granularities, bad inputs and infeasible budgets raise naming the values, and the plugin installs
its plan as a static system on a tiny CPU engine (layers at the planned precisions, KV capacity as planned)."""

import itertools
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and linear kernels)
from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.engine.sampling_params import SamplingParams
from morphserve.importance.profile import PROFILE_FORMAT, PROFILE_VERSION, model_key, profile_path, write_profile
from morphserve.memory.weight_arena import Precision
from morphserve.model.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the baselines package

from baselines.llm_pq import (  # noqa: E402
    ALL_PRECISIONS,
    GRANULARITIES,
    InfeasiblePlan,
    Load,
    MemoryModel,
    PhaseCost,
    QualityScores,
    attach,
    load_for_engine,
    plan_precisions,
    solve_assignment,
)

P = Precision
LAYERS = 4


def brute_force(costs, sizes, capacity):
    """(best objective, best choices, second-best objective) over every assignment, or None if none fits."""
    best = []
    for choice in itertools.product(range(len(costs[0])), repeat=len(costs)):
        if sum(sizes[i][j] for i, j in enumerate(choice)) <= capacity:
            best.append((math.fsum(costs[i][j] for i, j in enumerate(choice)), choice))
    if not best:
        return None
    best.sort()
    return best[0][0], best[0][1], best[1][0] if len(best) > 1 else math.inf


def _capacities(rng, sizes):
    low, high = sum(min(r) for r in sizes), sum(max(r) for r in sizes)
    some = sum(rng.choice(r) for r in sizes)  # exactly the size of one assignment: a tight budget
    return [low - 1, low, some, rng.randint(low, high), high]


@pytest.mark.parametrize("layers", [3, 4, 5, 6])
def test_milp_equals_brute_force(layers):
    rng = random.Random(layers)
    for case in range(6):
        costs = [[0.0 if case % 2 == 0 and j == 0 else rng.random() * 10 ** rng.randint(-6, 0) for j in range(3)]
                 for _ in range(layers)]
        if case % 3 == 2:  # per-slot style: negative sizes (KV blocks gained)
            sizes = [[0, -rng.randint(5, 20), -rng.randint(20, 30)] for _ in range(layers)]
        else:  # pooled style: bytes, 256-aligned and large
            sizes = [sorted((rng.randint(1_000, 60_000) * 256 for _ in range(3)), reverse=True)
                     for _ in range(layers)]
        for capacity in _capacities(rng, sizes):
            want = brute_force(costs, sizes, capacity)
            if want is None:
                with pytest.raises(InfeasiblePlan, match=str(capacity)):
                    solve_assignment(costs, sizes, capacity)
                continue
            got = solve_assignment(costs, sizes, capacity)
            assert sum(sizes[i][j] for i, j in enumerate(got.choice)) == got.size <= capacity
            assert got.objective == pytest.approx(want[0], rel=1e-12, abs=1e-15)
            if want[2] - want[0] > 1e-9 * max(abs(want[0]), 1e-12):  # unique optimum: the same map
                assert got.choice == want[1]
            assert got.status == "optimal"


def test_milp_resolves_differences_far_below_the_solvers_absolute_gap():
    # W8 losses of ~1e-9 next to W4 losses of ~1: unscaled, HiGHS's absolute gap (1e-6) would hide the choice
    costs = [[0.0, 1e-9 * (1 + i), 1.0 + i] for i in range(5)]
    sizes = [[10, 5, 3] for _ in range(5)]
    got = solve_assignment(costs, sizes, 10 * 5 - 5 * 2)  # two layers must leave FP16
    assert got.choice == (1, 1, 0, 0, 0)
    assert got.objective == pytest.approx(3e-9, rel=1e-12)


def _cfg(layers=LAYERS, tied=False):
    return ModelConfig(name="plan-test", vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=layers,
                       num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048,
                       tie_word_embeddings=tied)


def _scores(rng, layers):
    return QualityScores.of({"w8": [rng.random() * 1e-5 for _ in range(layers)],
                             "w4": [rng.random() * 1e-3 for _ in range(layers)]}, "random test scores")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_plan_equals_brute_force_and_respects_the_budget(granularity):
    rng = random.Random(7)
    for layers in (3, 4, 5):
        cfg = _cfg(layers, tied=layers == 4)
        load = Load(3, 100, 28)
        probe = MemoryModel(cfg, torch.float32, 10 ** 12, 16, slot_offsets=tuple([64] * layers))
        fp16 = probe.fp16_weight_bytes + load.kv_blocks(16) * probe.block_bytes
        w4 = probe.weight_bytes([P.W4] * layers) + load.kv_blocks(16) * probe.block_bytes
        latency = PhaseCost(1e12, 1e11, 1e-4, {P.W8: 0.8, P.W4: 0.5}) if layers == 5 else None
        need = load.kv_blocks(16)
        slot_budgets = [probe.fp16_weight_bytes + 1024 + k * probe.block_bytes  # per-slot: FP16 weights + k blocks
                        for k in (0, 1, need // 3, need // 2, need - 1, need)]
        for budget in (w4 - 1, w4, w4 + probe.block_bytes, (w4 + fp16) // 2, fp16, *slot_budgets):
            mem = MemoryModel(cfg, torch.float32, budget, 16, reserve_bytes=1024, slot_offsets=tuple([64] * layers))
            scores = _scores(rng, layers)
            seconds = latency.seconds(mem, load) if latency else {p: 0.0 for p in ALL_PRECISIONS}
            w = latency.weight if latency else 0.0
            feasible = [m for m in itertools.product(ALL_PRECISIONS, repeat=layers)
                        if granularity == "pooled" or mem.base_kv_blocks() >= 1
                        if mem.kv_blocks(m, granularity) >= need]
            if not feasible:
                with pytest.raises(InfeasiblePlan, match="infeasible|leaves"):
                    plan_precisions(mem, load, scores, granularity=granularity, latency=latency)
                continue

            def objective(m, scores=scores, w=w, seconds=seconds):
                return math.fsum(scores.layer_loss(i, p) + w * seconds[p] for i, p in enumerate(m))

            best = min(feasible, key=objective)
            plan = plan_precisions(mem, load, scores, granularity=granularity, latency=latency)
            assert plan.objective == pytest.approx(objective(best), rel=1e-12, abs=1e-18)
            assert plan.precisions == best  # random scores: the optimum is unique
            assert plan.kv_blocks == mem.kv_blocks(plan.precisions, granularity) >= need == plan.kv_blocks_needed
            assert plan.weight_bytes + mem.reserve_bytes + need * mem.block_bytes <= budget
            doc = json.loads(plan.to_json())
            assert doc["code"] == plan.code and doc["kv_blocks_left"] == plan.kv_blocks_left >= 0
            assert doc["solver"]["status"] == "optimal" and doc["load"] == load.to_dict()


def test_per_slot_counts_whole_blocks_per_slot_and_is_never_looser_than_pooled():
    cfg = _cfg()
    for offset in (0, 64, 128):
        mem = MemoryModel(cfg, torch.float32, 10 ** 8, 16, slot_offsets=tuple([offset] * LAYERS))
        for m in itertools.product(ALL_PRECISIONS, repeat=LAYERS):
            assert mem.kv_blocks(m, "per-slot") <= mem.kv_blocks(m, "pooled")
        tail = mem.slot_bytes - mem.layer_bytes(P.W4) - (-(offset + mem.layer_bytes(P.W4))) % 256
        assert mem.slot_kv_blocks(0, P.W4) == tail // mem.block_bytes
        assert mem.slot_kv_blocks(0, P.FP16) == 0


def test_bad_inputs_raise_naming_the_value():
    cfg = _cfg()
    mem = MemoryModel(cfg, torch.float32, 10 ** 8)
    scores = _scores(random.Random(0), LAYERS)
    with pytest.raises(ValueError, match="num_seqs must be an integer >= 1, got 0"):
        Load(0, 10)
    with pytest.raises(ValueError, match="output_tokens .* got -1"):
        Load(1, 10, -1)
    with pytest.raises(ValueError, match="budget_bytes .* got 0"):
        MemoryModel(cfg, torch.float32, 0)
    with pytest.raises(ValueError, match="block_size must be a power of two, got 12"):
        MemoryModel(cfg, torch.float32, 10 ** 8, 12)
    with pytest.raises(ValueError, match="w4 loss of layer 1 is nan"):
        QualityScores.of({"w8": [0.0] * LAYERS, "w4": [0.0, float("nan"), 0.0, 0.0]}, "x")
    with pytest.raises(ValueError, match="w8 loss of layer 0 is -1"):
        QualityScores.of({"w8": [-1.0] * LAYERS, "w4": [0.0] * LAYERS}, "x")
    with pytest.raises(ValueError, match="quantized precisions"):
        QualityScores.of({"fp16": [0.0] * LAYERS}, "x")
    with pytest.raises(ValueError, match="quality scores for 3 layers, the model 'plan-test' has 4"):
        plan_precisions(mem, Load(1, 10), _scores(random.Random(0), 3))
    with pytest.raises(ValueError, match="granularity 'slots'"):
        plan_precisions(mem, Load(1, 10), scores, granularity="slots")
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        plan_precisions(mem, Load(1, 10), scores, precisions=["fp16", "int3"])
    with pytest.raises(ValueError, match=r"no quality scores for allowed precisions \['w8'\]"):
        plan_precisions(mem, Load(1, 10), QualityScores.of({"w4": [0.0] * LAYERS}, "x"))
    with pytest.raises(ValueError, match="peak_flops must be a positive number, got 0"):
        PhaseCost(0, 1e9, 1.0)
    with pytest.raises(ValueError, match=r"costs must be finite"):
        solve_assignment([[0.0, float("inf")]], [[1, 0]], 1)
    tiny = MemoryModel(cfg, torch.float32, mem.weight_bytes([P.W4] * LAYERS) + 5 * mem.block_bytes)
    with pytest.raises(InfeasiblePlan, match=rf"over the budget of {tiny.budget_bytes} by \d+") as err:
        plan_precisions(tiny, Load(2, 64), scores)
    assert isinstance(err.value, ValueError) and "4444" in str(err.value) and "needs 8 KV blocks" in str(err.value)
    with pytest.raises(InfeasiblePlan, match="keeps every slot at FP16 size"):
        plan_precisions(tiny, Load(1, 16), scores, granularity="per-slot")


# ---- the plugin on a tiny CPU engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("llm-pq-gqa"), "gqa", intermediate_size=512,
                                num_hidden_layers=LAYERS)


def _engine(path, extra_blocks, max_num_seqs=4, max_model_len=160):
    """An engine whose budget leaves the all-FP16 model ``extra_blocks`` KV blocks."""
    probe = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=1))
    budget = probe.model.weight_bytes() + extra_blocks * probe.pool.block_bytes
    return LLMEngine(EngineConfig(model=str(path), memory_budget_bytes=budget, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, max_num_batched_tokens=64))


def test_plugin_installs_the_plan_and_serves(tiny, tmp_path):
    engine = _engine(tiny, 10)
    need = 4 * -(-160 // 16)
    assert load_for_engine(engine, "llm-pq") == Load(4, 160, 0)
    morpher = attach(engine, "llm-pq", list(range(LAYERS)), profiles_root=tmp_path)
    plan = morpher.plan
    assert engine.model.arena.precisions() == [p.value for p in plan.precisions]
    assert engine.block_manager.num_total_blocks == plan.kv_blocks >= need == plan.kv_blocks_needed
    assert plan.granularity == "per-slot" and any(p != P.FP16 for p in plan.precisions)
    assert all("no profile" in s for s in plan.scores.to_dict()["source"].values())
    assert engine.morpher is morpher and morpher.static_map == list(plan.precisions)
    ids = [engine.add_request([5 + i] * 20, SamplingParams(max_tokens=6, ignore_eos=True)) for i in range(4)]
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    assert all(outs[i].error is None and len(outs[i].output_token_ids) == 6 for i in ids)


def _w4_profile(model: str, mds: list[float]) -> dict:
    return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "precision": "w4",
           "model": {"name": model, "key": model_key(model), "num_layers": len(mds)},
           "order": sorted(range(len(mds)), key=lambda i: mds[i]),
           "scores": {"lts": [0.0] * len(mds), "lrs": [0.0] * len(mds), "mds_alone": mds},
           "settings": {"strategy": "lis", "variant_tag": "rtn"}, "calibration": {"tokens_sha256": "0" * 64}}


def test_plugin_uses_the_profile_and_derives_the_w8_proxy(tiny, tmp_path):
    engine = _engine(tiny, 10, max_num_seqs=2)
    mds = [0.5, 1e-4, 2e-4, 0.3]  # layers 1 and 2 nearly free to quantize
    write_profile(_w4_profile(str(tiny), mds), profile_path(str(tiny), "w4", tmp_path))
    morpher = attach(engine, "llm-pq-s2-p120-o40", [1, 2, 3, 0], profiles_root=tmp_path)
    plan = morpher.plan
    assert plan.load == Load(2, 120, 40) and plan.kv_blocks_needed == 20
    src = plan.scores.source
    assert src[P.W4].startswith("profile ") and "proxy: w4 profile's mds_alone" in src[P.W8]
    assert list(plan.scores.loss[P.W4]) == mds
    ratio = [w8 / w4 for w8, w4 in zip(plan.scores.loss[P.W8], mds, strict=True)]
    assert all(0 < r < 0.2 for r in ratio)  # W8 weight error is far below W4's
    assert plan.precisions[0] == P.FP16 and plan.precisions[3] == P.FP16  # the important layers stay FP16
    assert engine.model.arena.precisions() == [p.value for p in plan.precisions]
    assert engine.block_manager.num_total_blocks == plan.kv_blocks >= 20
    # the same profile handed over as a document (the workflow's importance file holds it) gives the same plan
    other = _engine(tiny, 10, max_num_seqs=2)
    given = attach(other, "llm-pq-s2-p120-o40", [1, 2, 3, 0], profiles={"w4": _w4_profile(str(tiny), mds)},
                   profiles_root=tmp_path / "none").plan
    assert given.precisions == plan.precisions and given.scores.loss == plan.scores.loss
    assert given.scores.source[P.W4].startswith("profile document of")
    with pytest.raises(ValueError, match="not a 'morphserve-layer-importance-profile' document of precision 'w8'"):
        attach(_engine(tiny, 10, max_num_seqs=2), "llm-pq", [0, 1, 2, 3], profiles={"w8": _w4_profile("m", mds)})


def test_plugin_refuses_infeasible_loads_before_touching_the_engine(tiny, tmp_path):
    engine = _engine(tiny, 2, max_num_seqs=8, max_model_len=512)
    with pytest.raises(InfeasiblePlan, match=r"8 sequences x 512 tokens\) needs 256 KV blocks"):
        attach(engine, "llm-pq", list(range(LAYERS)), profiles_root=tmp_path)
    assert engine.morpher is None and engine.model.arena.precisions() == ["fp16"] * LAYERS
    with pytest.raises(ValueError, match="9 sequences at once, the engine runs at most max_num_seqs=8"):
        attach(engine, "llm-pq-s9-p10-o0", list(range(LAYERS)), profiles_root=tmp_path)
    with pytest.raises(ValueError, match="permutation"):
        attach(engine, "llm-pq", [0, 0, 1, 2], profiles_root=tmp_path)


def test_plugin_installs_nothing_when_fp16_fits(tiny, tmp_path):
    engine = _engine(tiny, 64, max_num_seqs=2, max_model_len=128)
    assert attach(engine, "llm-pq", list(range(LAYERS)), profiles_root=tmp_path) is None
    assert engine.morpher is None and engine.model.arena.precisions() == ["fp16"] * LAYERS
