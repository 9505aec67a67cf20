"""Layer importance: metrics, normalisation, greedy conditioning, orders, the prefix sweep, profiles and the CLI.

Everything runs on tiny random checkpoints (tests/conftest.py) in float32 on CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and kernels)
from morphserve.importance import bootstrap
from morphserve.importance.cli import add_parsers
from morphserve.importance.metrics import (DegradationProbe, cosine_distance, kl_divergence, layer_scores,
                                           normalise)
from morphserve.importance.orders import (STRATEGIES, CalibrationData, ContiguousBlockOrder, LISOrder, all_blocks,
                                          check_order, greedy_order, make_strategy, nested_block_chain)
from morphserve.importance.profile import (ProfileError, build_profile, load_order, model_key, profile_document,
                                           profile_path, read_profile, write_profile)
from morphserve.importance.runner import LayerRunner, quantized_config
from morphserve.importance.sweep import sweep, tree_nodes
from morphserve.importance.texts import TokenWindows, calibration_windows, document_windows
from morphserve.memory.kv_pool import KVPool
from morphserve.memory.weight_arena import Precision
from morphserve.model.llama import ForwardBatch, LlamaModel
from morphserve.model.weight_source import open_source
from morphserve.quant.staging import StagedVariants
from conftest import make_tiny_checkpoint

FP16, W8, W4 = Precision.FP16, Precision.W8, Precision.W4
LAYERS = 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-importance"), "gqa", num_hidden_layers=LAYERS)


def _model(path: Path) -> LlamaModel:
    return LlamaModel(open_source(str(path)), torch.float32, "cpu")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(model, staged variants, runner) of the 5-layer GQA checkpoint."""
    model = _model(tiny_dir)
    staged = StagedVariants.build(model)
    return model, staged, LayerRunner(model, staged)


@pytest.fixture(scope="module")
def calib(tiny_dir) -> TokenWindows:
    return calibration_windows(open_source(str(tiny_dir)).tokenizer(), num_windows=4, seq_len=24)


def _tokens(b: int = 3, t: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- runner and sweep --------------------------------------------------------------------------------------------

def _engine_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    pool = KVPool(model.cfg, -(-n // 16), 16, model.dtype, model.device)
    pos = torch.arange(n)
    batch = ForwardBatch(token_ids=torch.tensor(ids), positions=pos, slot_mapping=pos.clone(), query_start=[0, n],
                         context_lens=[n], block_tables=[list(range(-(-n // 16)))], logits_indices=pos.clone())
    return model.forward(batch, pool)


def test_runner_matches_engine_forward_with_swapped_layers(tiny_dir):
    """The runner's logits equal the engine's forward with the same layers swapped in place by write_into."""
    model = _model(tiny_dir)
    staged = StagedVariants.build(model)
    config = (FP16, W8, FP16, W4, W4)
    tokens = _tokens(2, 21)
    hidden = LayerRunner(model, staged).run(tokens, config)[-1]
    ours = LayerRunner(model, staged).logits(hidden)
    for i, p in enumerate(config):
        staged.write_into(model.arena, i, p)
    try:
        for b in range(tokens.shape[0]):
            torch.testing.assert_close(ours[b], _engine_logits(model, tokens[b].tolist()), atol=2e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="not FP16"):
            LayerRunner(model, staged)
    finally:
        for i in range(LAYERS):
            staged.write_into(model.arena, i, FP16)


def test_sweep_equals_separate_runs(tiny):
    _, _, runner = tiny
    rng = random.Random(1)
    configs = [tuple(rng.choice((FP16, W8, W4)) for _ in range(LAYERS)) for _ in range(7)]
    configs.append(configs[2])  # a duplicate is reduced once and shared
    tokens = _tokens()
    got, stats = sweep(runner, runner.embed(tokens), configs, lambda h: h.clone())
    for c, h in zip(configs, got):
        torch.testing.assert_close(h, runner.run(tokens, c)[-1], atol=1e-6, rtol=1e-5)
    assert got[2] is got[-1]
    assert stats.configs == len(set(configs))
    assert stats.token_layers == tree_nodes(configs) * tokens.numel()  # shared prefixes are computed once


def test_runner_rejects_bad_input(tiny):
    _, _, runner = tiny
    with pytest.raises(ValueError, match="token ids"):
        runner.embed(torch.tensor([[0, 320]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        runner.embed(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="one precision per layer"):
        runner.run(_tokens(), (FP16,) * (LAYERS - 1))
    with pytest.raises(ValueError, match="outside"):
        quantized_config(LAYERS, [LAYERS], W4)
    with pytest.raises(ValueError, match="staged variants"):
        LayerRunner(tiny[0]).weights(0, W4)


# ---- metrics -----------------------------------------------------------------------------------------------------

def test_cosine_distance_is_exact_for_nearly_parallel_vectors():
    a = torch.randn(4, 64, dtype=torch.float32)
    d = torch.randn(4, 64) * 1e-5
    got = cosine_distance(a, a + d)
    want = 1 - F.cosine_similarity(a.double(), (a + d).double(), dim=-1)  # float64 reference
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    assert bool((got > 0).all())
    assert float(cosine_distance(a, 3 * a).max()) < 1e-15  # scale does not matter
    with pytest.raises(ValueError, match="zero vector"):
        cosine_distance(torch.zeros(1, 4), torch.ones(1, 4))


def test_kl_divergence():
    logits = torch.randn(5, 30)
    assert float(kl_divergence(logits, logits).abs().max()) == 0.0
    other = logits + torch.randn(5, 30)
    kl = kl_divergence(logits, other, chunk=2)
    ref = F.log_softmax(logits.double(), -1)
    torch.testing.assert_close(kl, (ref.exp() * (ref - F.log_softmax(other.double(), -1))).sum(-1))
    assert bool((kl > 0).all())
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(logits, other[:, :3])


def test_lts_of_identity_layer_is_zero(tiny_dir):
    model = _model(tiny_dir)
    model.arena.layers[2]["o"].zero_()  # attention and MLP add nothing: layer 2 is the identity
    model.arena.layers[2]["down"].zero_()
    scores = layer_scores(LayerRunner(model, StagedVariants.build(model)), _tokens(), W4)
    assert scores.lts[2] == 0.0
    assert min(v for i, v in enumerate(scores.lts) if i != 2) > 1e-4
    assert scores.tokens == _tokens().numel()


def test_lrs_feeds_both_layers_the_fp16_input(tiny_dir):
    """Layer 2's weights are exactly representable in W8, so its own replacement error is 0.  Layers 0-1 are not:
    an LRS fed the drifted input of a quantized prefix would be far from 0 for layer 2."""
    model = _model(tiny_dir)
    g = torch.Generator().manual_seed(0)
    for name in ("qkv", "o", "gate_up", "down"):
        w = model.arena.layers[2][name]
        k = (torch.randn(w.shape, generator=g) * 80).round().clamp(-127, 127)
        k[:, 0] = 127  # every row's absmax is 127 steps: the RTN scale is exactly 2^-10
        w.copy_(k * 2.0 ** -10)
    staged = StagedVariants.build(model)
    runner = LayerRunner(model, staged)
    tokens = _tokens()
    scores = layer_scores(runner, tokens, W8)
    assert scores.lrs[2] == 0.0
    assert min(scores.lrs[i] for i in (0, 1, 3, 4)) > 1e-12
    # the drifted variant the extension study used: FP16 model's output vs the W8 model's output at layer 2
    fp16 = runner.run(tokens, keep_states=True)
    drifted = runner.run(tokens, (W8,) * LAYERS, keep_states=True)
    assert float(cosine_distance(fp16[3], drifted[3]).mean()) > 1e3 * max(scores.lrs[2], 1e-15)


def test_lrs_rejects_fp16(tiny):
    with pytest.raises(ValueError, match="w8 or w4"):
        layer_scores(tiny[2], _tokens(), FP16)


def test_normalise():
    assert normalise({0: 5.0, 1: 1.0, 2: 3.0}) == {0: 1.0, 1: 0.0, 2: 0.5}
    assert normalise({0: 5.0, 1: 1.0, 2: 1.0, 3: 9.0}) == {0: 2 / 3, 1: 1 / 6, 2: 1 / 6, 3: 1.0}  # average ranks
    assert normalise({0: 5.0, 1: 1.0, 2: 3.0}, "minmax") == {0: 1.0, 1: 0.0, 2: 0.5}
    # min-max keeps magnitudes (the outlier squeezes the rest), rank does not
    raw = {0: 100.0, 1: 1.0, 2: 2.0, 3: 3.0}
    assert normalise(raw, "minmax")[3] < 0.03 and normalise(raw, "rank")[3] == 2 / 3
    assert normalise({7: 0.3}) == {7: 0.0} and normalise({1: 2.0, 2: 2.0}, "minmax") == {1: 0.0, 2: 0.0}
    with pytest.raises(ValueError, match="empty"):
        normalise({})
    with pytest.raises(ValueError, match="normalisation 'zscore'"):
        normalise({0: 1.0}, "zscore")
    with pytest.raises(ValueError, match="non-finite"):
        normalise({0: 1.0, 1: math.nan})


# ---- greedy conditioning -----------------------------------------------------------------------------------------

def test_greedy_rescores_given_the_chosen_set():
    """Layer 0 is cheapest alone; once it is chosen, layer 1 becomes expensive (they interact) and layer 2 wins,
    although layer 1 is cheaper than layer 2 on its own."""
    base = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.9}
    seen: list[list[int]] = []

    def step(chosen, remaining):
        seen.append(chosen)
        scores = {p: base[p] + (5.0 if p == 1 and 0 in chosen else 0.0) for p in remaining}
        return scores, {}, {}

    order, steps = greedy_order(4, step)
    assert sorted(base, key=base.get) == [0, 1, 2, 3]  # the static order
    assert order == [0, 2, 3, 1]
    assert seen == [[], [0], [0, 2], [0, 2, 3]]
    assert [s["chosen"] for s in steps] == order


def test_lis_mds_is_measured_given_the_chosen_layers(tiny, calib):
    """Every recorded MDS equals a direct, sweep-free run of the model with Q + {p} quantized."""
    model, staged, runner = tiny
    data = CalibrationData(runner, calib, search_windows=2)
    result = LISOrder().build(LAYERS, W4, data)
    tokens = data.search_tokens()
    (ref,) = runner.run(tokens)
    for step in result.details["steps"]:
        chosen = result.order[:step["step"]]
        assert step["chosen"] == result.order[step["step"]]
        assert sorted(map(int, step["mds"])) == sorted(set(range(LAYERS)) - set(chosen))
        for p, value in step["mds"].items():
            (h,) = runner.run(tokens, quantized_config(LAYERS, [*chosen, int(p)], W4))
            assert value == pytest.approx(float(cosine_distance(ref, h).mean()), rel=1e-5)
        lis = step["lis"]
        assert step["chosen"] == int(min(lis, key=lambda p: (lis[p], step["mds"][p], int(p))))
    assert result.details["mds_alone"] == [result.details["steps"][0]["mds"][str(p)] for p in range(LAYERS)]
    assert result.token_layers > 0 and result.settings["calibration"]["tokens_sha256"] == calib.tokens_sha256


# ---- orders ------------------------------------------------------------------------------------------------------

def test_every_strategy_gives_a_permutation(tiny, calib):
    data = CalibrationData(tiny[2], calib, search_windows=1)
    for name in STRATEGIES:
        strategy = make_strategy(name)
        result = strategy.build(LAYERS, W8, data if strategy.uses_calibration else None)
        assert sorted(result.order) == list(range(LAYERS)), name
        assert result.strategy == name and result.precision == "w8"
        json.dumps(result.to_json())  # the record is JSON
    assert make_strategy("front-to-back").build(4, W4).order == [0, 1, 2, 3]
    assert make_strategy("back-to-front").build(4, W4).order == [3, 2, 1, 0]
    assert make_strategy("random", seed=3).build(9, W4).order == make_strategy("random", seed=3).build(9, W4).order
    assert make_strategy("random", seed=3).build(9, W4).order != make_strategy("random", seed=4).build(9, W4).order
    with pytest.raises(ValueError, match="unknown order strategy"):
        make_strategy("middle-out")
    with pytest.raises(ValueError, match="calibration data"):
        make_strategy("lis").build(LAYERS, W4)
    with pytest.raises(ValueError, match="not fp16"):
        make_strategy("front-to-back").build(LAYERS, FP16)
    with pytest.raises(ValueError, match="permutation"):
        check_order([0, 2, 2], 3)


def _chains(num_layers: int):
    """Every order whose prefixes are contiguous blocks (brute force)."""
    def grow(a, b, order):
        if b - a == num_layers:
            yield list(order)
            return
        if a > 0:
            yield from grow(a - 1, b, order + [a - 1])
        if b < num_layers:
            yield from grow(a, b + 1, order + [b])
    for s in range(num_layers):
        yield from grow(s, s + 1, [s])


def test_nested_block_chain_is_the_optimal_contiguous_chain():
    rng = random.Random(0)
    for n in (1, 2, 5, 6):
        cost = {blk: rng.uniform(-3, 3) for blk in all_blocks(n)}
        got = nested_block_chain(n, cost)

        def total(order):
            return sum(cost[(min(order[:k]), max(order[:k]) + 1)] for k in range(1, n + 1))
        assert total(got) == pytest.approx(min(total(o) for o in _chains(n)))
        for k in range(1, n + 1):
            assert max(got[:k]) - min(got[:k]) == k - 1  # contiguous
    assert len(all_blocks(30)) == 30 * 31 // 2  # the LIS greedy's number of candidate evaluations
    with pytest.raises(ValueError, match="no cost"):
        nested_block_chain(3, {(0, 1): 0.0})


def test_contiguous_block_is_chosen_on_calibration_data(tiny, calib, tiny_dir):
    _, _, runner = tiny
    data = CalibrationData(runner, calib, search_windows=2)
    result = ContiguousBlockOrder().build(LAYERS, W4, data)
    for k in range(1, LAYERS + 1):
        assert max(result.order[:k]) - min(result.order[:k]) == k - 1
    # the choice is the DP over the blocks' MDS measured on the calibration search windows, and nothing else
    probe = DegradationProbe(runner, data.search_tokens(), "mds")
    blocks = all_blocks(LAYERS)
    values = probe.configs([quantized_config(LAYERS, range(a, b), W4) for a, b in blocks])
    assert [b["mds"] for b in result.details["blocks"]] == pytest.approx(values, rel=1e-6)
    assert result.order == nested_block_chain(LAYERS, {blk: math.log(v) for blk, v in zip(blocks, values)})
    assert result.settings["calibration"]["pool"] == "calibration"
    # evaluation text cannot be used to choose
    tok = open_source(str(tiny_dir)).tokenizer()
    held_out = document_windows(tok, "multi_news", "eval", 2, 16)
    with pytest.raises(ValueError, match="calibration text only"):
        CalibrationData(runner, held_out, 1)
    with pytest.raises(ValueError, match="search_windows"):
        CalibrationData(runner, calib, calib.num_windows + 1)


# ---- texts -------------------------------------------------------------------------------------------------------

def test_calibration_windows_are_qmsum_test_meetings(calib, tiny_dir):
    assert calib.task == "qmsum" and calib.pool == "calibration"
    assert calib.num_windows == 4 and calib.seq_len == 24 and len(set(calib.documents)) == 4
    assert all("/test/" in d for d in calib.documents)
    assert all(len(v) == 64 for v in calib.files.values())
    assert calib.tensor(1, 2).shape == (2, 24)
    with pytest.raises(ValueError, match="requested"):
        calib.tensor(3, 2)
    tok = open_source(str(tiny_dir)).tokenizer()
    with pytest.raises(ValueError, match="fewer than seq_len"):
        document_windows(tok, "qmsum", "calibration", 1, 10 ** 7)
    with pytest.raises(ValueError, match="distinct documents"):
        document_windows(tok, "qmsum", "calibration", 1000, 8)


# ---- profiles ----------------------------------------------------------------------------------------------------

def test_profile_round_trip_and_fallback(tiny, calib, tiny_dir, tmp_path, caplog):
    model, staged, _ = tiny
    name = str(tiny_dir)
    doc = build_profile(model, staged, "w4", calib, model_name=name, search_windows=1)
    path = profile_path(name, "w4", tmp_path)
    assert path == tmp_path / model_key(name) / "w4.json"
    write_profile(doc, path)
    back = read_profile(path)
    assert back["order"] == doc["order"] and back["calibration"]["tokens_sha256"] == calib.tokens_sha256
    assert len(back["scores"]["lts"]) == LAYERS and len(back["normalised"]["lrs"]) == LAYERS
    assert back["variant"]["method"] == "rtn" and back["provenance"]["git_commit"]

    order, source = load_order(name, "w4", LAYERS, root=tmp_path)
    assert order == doc["order"] and source.startswith(f"profile: {path}")

    with caplog.at_level(logging.WARNING, logger="morphserve.importance.profile"):
        order, source = load_order(name, "w8", LAYERS, root=tmp_path)
    assert order == list(range(LAYERS))
    assert source.startswith("fallback: front-to-back") and "w8.json" in source
    assert "fallback: front-to-back" in caplog.text

    with pytest.raises(ProfileError, match="5-layer model, the model has 6 layers"):
        load_order(name, "w4", LAYERS + 1, root=tmp_path)
    with pytest.raises(ProfileError, match="a w4 profile, w8 requested"):
        load_order(name, "w8", LAYERS, path=path)
    with pytest.raises(ProfileError, match="not 'smollm2-135m'"):
        load_order("smollm2-135m", "w4", LAYERS, path=path)
    with pytest.raises(ProfileError, match="'rtn' variants, 'awq' requested"):
        load_order(name, "w4", LAYERS, path=path, variant="awq")
    assert profile_path(name, "w4", tmp_path, variant="awq").name == "w4-awq.json"
    with pytest.raises(ValueError, match="holds a 'lis' order"):
        profile_document(make_strategy("front-to-back").build(LAYERS, W4), model, staged, model_name=name)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        read_profile(bad)
    bad.write_text(json.dumps({**doc, "order": [0, 0, 1, 2, 3]}))
    with pytest.raises(ProfileError, match="permutation"):
        read_profile(bad)
    bad.write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(ProfileError, match="version 99"):
        read_profile(bad)
    with pytest.raises(ValueError, match="no swap order"):
        profile_path(name, "fp16", tmp_path)
    with pytest.raises(ValueError, match="expected one of"):
        profile_path(name, "w3", tmp_path)


def test_profile_cli(tiny_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="morphserve")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["profile", "--model", str(tiny_dir), "--precision", "w8", "--calib-windows", "3",
                           "--seq-len", "16", "--search-windows", "1", "--profiles-dir", str(tmp_path)])
    assert a.fn(a) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["precision"] == "w8" and sorted(line["order"]) == list(range(LAYERS))
    doc = read_profile(Path(line["profile"]))
    assert doc["settings"]["search_windows"] == 1 and doc["calibration"]["num_windows"] == 3
    a = parser.parse_args(["profile", "--model", str(tiny_dir), "--output", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="one file"):
        a.fn(a)
    a = parser.parse_args(["profile", "--model", str(tiny_dir), "--search-windows", "0"])
    with pytest.raises(ValueError, match="search-windows"):
        a.fn(a)


def test_brute_force_chains_are_complete():
    """The brute-force enumeration used above finds every contiguous order (checked against all permutations)."""
    direct = [p for p in itertools.permutations(range(4)) if all(max(p[:k]) - min(p[:k]) == k - 1 for k in range(1, 5))]
    assert sorted(map(tuple, _chains(4))) == sorted(direct)


# ---- bootstrap statistics ----------------------------------------------------------------------------------------

def test_bootstrap_perplexity_and_paired_verdicts():
    rng = np.random.default_rng(1)
    tokens = [100] * 30
    base = rng.normal(300.0, 40.0, 30)  # documents differ a lot in difficulty
    idx = bootstrap.draws(30, 2000, seed=5)
    assert (idx == bootstrap.draws(30, 2000, seed=5)).all()

    ppl = bootstrap.perplexity(base, tokens, idx)
    assert ppl.value == pytest.approx(math.exp(base.sum() / 3000))
    assert ppl.low < ppl.value < ppl.high

    same = bootstrap.paired_ratio(base, base, tokens, idx)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and bootstrap.verdict(same) == "tie"
    # a uniform 0.01 nats/token penalty is detected despite the large document-to-document spread (pairing)
    worse = bootstrap.paired_ratio(base + 1.0, base, tokens, idx)
    assert worse.value == pytest.approx(math.expm1(0.01)) and bootstrap.verdict(worse) == "better"
    assert bootstrap.verdict(bootstrap.paired_ratio(base - 1.0, base, tokens, idx)) == "worse"
    noise = rng.normal(0.0, 1.0, 30)
    noisy = bootstrap.paired_ratio(base + noise - noise.mean(), base, tokens, idx)
    assert noisy.low < 0 < noisy.high and bootstrap.verdict(noisy) == "tie"
    mean = bootstrap.paired_mean_ratio([(base + 1.0, base), (base + 3.0, base)], tokens, idx)
    assert mean.value == pytest.approx(math.expm1(0.02))

    with pytest.raises(ValueError, match="do not match"):
        bootstrap.perplexity(base[:5], tokens, idx)
    with pytest.raises(ValueError, match="finite"):
        bootstrap.perplexity([math.inf] * 30, tokens, idx)
    with pytest.raises(ValueError, match=">= 2 documents"):
        bootstrap.draws(1)
