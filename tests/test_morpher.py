"""The morpher on CPU: static maps, the dynamic controller under pressure and relief, and a stress test that
swaps and resizes every step without losing or corrupting a request."""

import random

import pytest

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and linear kernels)
from morphserve.engine.config import EngineConfig
from morphserve.engine.controller import MorphController, mode_config
from morphserve.engine.engine import LLMEngine
from morphserve.engine.morpher import Morpher
from morphserve.engine.sampling_params import SamplingParams
from morphserve.memory.kv_resizer import KVResizer
from morphserve.memory.layer_swapper import LayerSwapper, ScratchBlocks
from morphserve.memory.weight_arena import Precision
from morphserve.parity import PARITY_PROMPTS
from morphserve.quant.staging import StagedVariants
from morphserve.systems import reserve_for_staging

P = Precision


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide-gqa"), "gqa", intermediate_size=512,
                                num_hidden_layers=4)


def _engine(path, blocks, extension_first=False, staged_swaps=False, copy_budget=None, async_steps=False, **kw):
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=blocks, max_num_batched_tokens=64,
                                    device="cpu", async_steps=async_steps))
    if extension_first:
        engine.block_manager.extension_first = True
    staged = StagedVariants.build(engine.model)
    scratch = ScratchBlocks(engine.pool, engine.block_manager) if staged_swaps else None
    swapper = LayerSwapper(engine.model.arena, staged, "cpu", scratch=scratch, copy_budget=copy_budget)
    resizer = KVResizer(engine.pool, engine.block_manager, engine.model.arena,
                        lambda: [r.block_table for r in engine.scheduler.running])
    return engine, swapper, resizer


def _serve(engine, morpher, prompts, params, on_step=None):
    ids = [engine.add_request(p, params) for p in prompts]
    outs, step = {}, 0
    while engine.has_unfinished():
        if on_step:
            on_step(step)
        if morpher:
            morpher.before_step()
        for o in engine.step():
            outs[o.request_id] = o
        if morpher:
            morpher.after_step()
        step += 1
    return [outs[i] for i in ids]


def test_static_w4_map_turns_freed_weights_into_kv_blocks(wide):
    engine, swapper, resizer = _engine(wide, 40)
    morpher = Morpher(engine, swapper, resizer, static_map=[P.W4] * 4)
    morpher.apply_now()
    assert engine.model.arena.precisions() == ["w4"] * 4
    added = resizer.extension_blocks()
    assert added > 0 and engine.block_manager.num_total_blocks == 40 + added
    out = _serve(engine, None, PARITY_PROMPTS[:3], SamplingParams(max_tokens=8, ignore_eos=True))
    assert all(len(o.output_token_ids) == 8 for o in out)


@pytest.mark.parametrize("staged_swaps,reserve", [(False, False), (True, False), (True, True)],
                         ids=["in-place", "staged", "staged-reserved"])
def test_controller_goes_down_under_pressure_and_back_up_when_idle(wide, staged_swaps, reserve):
    """Under pressure the pool is nearly full, so staged swaps often find no scratch and run in place: both kinds
    mix in the staged run.  With a base reserve for staging (what the systems install on CUDA), every swap is
    staged: sequences never take the reserved blocks, and a swap that finds the scratch taken waits."""
    blocks = 30 if reserve else 26  # (the longest request needs 24 blocks besides the reserve)
    engine, swapper, resizer = _engine(wide, blocks, staged_swaps=staged_swaps)
    mode = mode_config("performance", persist_steps=2, min_dwell_steps=2, relief_persist_steps=4,
                       layers_per_decision=1, max_layer_fraction=1.0)
    if reserve:
        assert reserve_for_staging(engine, swapper, mode.ladder) == 5 and swapper.staged_only  # W4 head: 5 blocks
    controller = MorphController(mode, 4, [3, 1, 0, 2])
    morpher = Morpher(engine, swapper, resizer, controller=controller)
    out = _serve(engine, morpher, PARITY_PROMPTS[:8], SamplingParams(max_tokens=40, ignore_eos=True))
    assert all(len(o.output_token_ids) == 40 and o.error is None for o in out)
    peak = max(e.kv_total_blocks for e in morpher.timeline)
    assert controller.level > 0 and peak > blocks and "pressure" in controller.decisions[0].reason
    assert any(e.precisions.count("4") >= 2 for e in morpher.timeline)
    for _ in range(200):  # the serving loop keeps ticking the morpher while idle
        morpher.before_step()
        morpher.after_step()
    assert controller.level == 0 and engine.model.arena.precisions() == ["fp16"] * 4
    assert resizer.extension_blocks() == 0 and engine.block_manager.num_total_blocks == blocks
    assert any(d.reason.startswith("relief") for d in controller.decisions)
    kinds = {s.is_staged for s in swapper.completed}
    assert kinds == ({True} if reserve else {False} if not staged_swaps else {True, False}), kinds
    t = morpher.timeline[-1].to_dict()
    assert set(t) >= {"step", "precisions", "target", "kv_total_blocks", "kv_used_blocks", "queue_len", "reason"}


@pytest.mark.parametrize("staged_swaps,paced,async_steps", [(False, False, False), (True, False, False),
                                                             (True, True, False), (True, True, True)],
                         ids=["in-place", "staged", "staged-paced", "staged-paced-async"])
def test_stress_swap_and_resize_every_step(wide, staged_swaps, paced, async_steps, monkeypatch):
    """Random targets every step; live blocks are kept in extension segments (extension-first allocation), so every
    release migrates live KV.  No request is lost, and the tokens equal a replay of the same per-step precision
    schedule on an engine that never resizes (capacity never binds, so both schedule identically).  Staged: every
    swap's bytes pass through scratch KV blocks of the base pool.  Paced: 64 KiB of them per step (pieces of 16 KiB),
    so a swap spans several steps.  Async: the engine launches each step before reading back the previous one's
    tokens (the swaps and migrations then happen while a step is in flight)."""
    if paced:
        import morphserve.memory.layer_swapper as ls

        monkeypatch.setattr(ls, "COPY_CHUNK_BYTES", 16 << 10)
    engine, swapper, resizer = _engine(wide, 300, extension_first=True, staged_swaps=staged_swaps,
                                       copy_budget=64 << 10 if paced else None, async_steps=async_steps)
    morpher = Morpher(engine, swapper, resizer, static_map=[P.FP16] * 4)
    rng = random.Random(1)
    params = SamplingParams(max_tokens=30, ignore_eos=True)

    def shake(step):
        morpher.static_map = [rng.choice([P.FP16, P.W8, P.W4]) for _ in range(4)]

    out = _serve(engine, morpher, PARITY_PROMPTS[:8], params, on_step=shake)
    assert all(len(o.output_token_ids) == 30 and o.finish_reason == "length" for o in out)
    realized = [e.precisions for e in morpher.timeline]
    assert len(set(realized)) > 10  # it really kept changing
    assert resizer.migrated_total > (10 if paced else 20)  # releases really moved live KV blocks
    assert engine.scheduler.num_preemptions == 0
    staged_done = [s for s in swapper.completed if s.is_staged]
    assert len(staged_done) > (8 if paced else 20) if staged_swaps else not staged_done
    assert not paced or max(s.copy_steps for s in staged_done) >= 3

    ref, ref_swapper, _ = _engine(wide, 300)
    code = {"F": P.FP16, "8": P.W8, "4": P.W4}
    steps = iter(realized)

    def replay(step):
        for layer, c in enumerate(next(steps)):
            if ref_swapper.precision(layer) != code[c]:
                ref_swapper.request(layer, code[c])
                ref_swapper.issue()
                ref_swapper.poll()

    ref_out = _serve(ref, None, PARITY_PROMPTS[:8], params, on_step=replay)
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in ref_out]


def test_systems_installed_in_the_engine_loop(wide):
    """attach_system wires the morpher into LLMEngine.step and the serving loop's idle ticks."""
    import time

    from morphserve.engine.serving import ServingEngine
    from morphserve.systems import attach_system, static_map, system_spec

    assert static_map(system_spec("selective-2"), 4, [3, 1, 0, 2]) == [P.FP16, P.W4, P.FP16, P.W4]
    with pytest.raises(ValueError, match="unknown system 'w5'"):
        system_spec("w5")
    engine = LLMEngine(EngineConfig(model=str(wide), num_kv_blocks=26, max_num_batched_tokens=64))
    morpher = attach_system(engine, "morphserve-performance", [3, 1, 0, 2],
                            mode_overrides={"persist_steps": 2, "relief_persist_steps": 8})
    assert morpher.swapper.copy_budget == 16 << 20  # the mode's pacing
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    with ServingEngine(engine) as srv:
        futures = [srv.submit(p, params) for p in PARITY_PROMPTS[:8]]
        outs = [f.result(timeout=120) for f in futures]
        deadline = time.monotonic() + 30
        while (morpher.controller.level or engine.model.arena.precisions() != ["fp16"] * 4) and \
                time.monotonic() < deadline:  # on CUDA the last up-swaps land asynchronously, in idle ticks
            time.sleep(0.05)
    assert all(len(o.output_token_ids) == 40 for o in outs)
    levels = [d.new_level for d in morpher.controller.decisions]
    assert max(levels) > 0 and levels[-1] == 0  # went down under load, came back when idle
    assert engine.model.arena.precisions() == ["fp16"] * 4 and engine.block_manager.num_total_blocks == 26
    w4 = LLMEngine(EngineConfig(model=str(wide), num_kv_blocks=26))
    attach_system(w4, "w4", [3, 1, 0, 2])
    assert w4.model.arena.precisions() == ["w4"] * 4 and w4.block_manager.num_total_blocks > 26
    assert attach_system(LLMEngine(EngineConfig(model=str(wide), num_kv_blocks=26)), "fp16", [0, 1, 2, 3]) is None


def test_runner_calls_before_forward_every_step_even_with_inactive_hooks(wide):
    """The runner calls its hooks' ``before_forward`` before every forward, also when ``active()`` is False (a
    staged landing's copy must be joined before the next step reads the slot, whether or not per-layer hooks
    run), and only ``before_forward`` while inactive."""
    calls = []

    class Hooks:
        def before_forward(self):
            calls.append("before_forward")

        def active(self):
            return False

        def before_layer(self, layer):
            calls.append("before_layer")

        def after_layer(self, layer):
            calls.append("after_layer")

        def after_step(self):
            calls.append("after_step")

        def step_precision(self, layer):
            raise AssertionError("inactive hooks are not asked")

    engine = _engine(wide, 64)[0]
    engine.runner.hooks = Hooks()
    engine.add_request(PARITY_PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    assert steps >= 3 and calls == ["before_forward"] * steps
