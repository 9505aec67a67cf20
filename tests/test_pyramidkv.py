"""PyramidKV (baselines/pyramidkv.py): the budget schedule, token selection against a brute-force reference, the
compacted cache (per-layer lengths, K/V contents, block footprint), decode on the compressed cache against a dense
re-implementation, exact parity when nothing is compressed, preemption, the Triton kernels, and bad parameters.

On CPU the Triton kernels run under the interpreter (tiny models, few tokens)."""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    from morphserve.kernels.triton_support import enable_interpreter

    enable_interpreter()

from morphserve.engine.config import EngineConfig  # noqa: E402
from morphserve.engine.engine import LLMEngine  # noqa: E402
from morphserve.engine.sampling_params import SamplingParams  # noqa: E402
from morphserve.kernels import reference as ref  # noqa: E402
from morphserve.model.linear import linear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: the baselines package

from baselines.pyramidkv import (  # noqa: E402
    NAME_GRAMMAR, PyramidConfig, PyramidKV, attach, layer_budgets, observation_scores, pool_scores, select_tokens)

DEV = "cuda" if CUDA else "cpu"


def _prompts(lengths, vocab: int = 320, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _engine(path, system: str | None = None, kernels: str | None = None, **kw):
    eng = LLMEngine(EngineConfig(model=str(path), device=DEV, dtype="float32", **kw), kernels=kernels)
    policy = attach(eng, system, list(range(eng.model_config.num_layers))) if system else None
    return eng, policy


def _greedy(eng, prompts, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in prompts]
    done = {o.request_id: o.output_token_ids for o in eng.run_until_done()}
    assert eng.block_manager.num_used == 0  # every block came back
    return [done[i] for i in ids]


# ---- (c) the budget schedule ------------------------------------------------------------------------------------
def _pyramid_real(layers, budget, beta, window):
    avg = Fraction(budget - window)
    top = avg / Fraction(beta)
    bottom = 2 * avg - top
    return [window + bottom - (bottom - top) * Fraction(i, layers - 1) for i in range(layers)]


@pytest.mark.parametrize("layers,budget,beta,window", [(30, 128, 20, 8), (32, 64, 20, 8), (3, 32, 20, 8),
                                                       (24, 2048, 20, 8), (7, 50, 3.5, 5), (16, 100, 1, 8)])
def test_budget_schedule_is_the_pyramid(layers, budget, beta, window):
    got = layer_budgets(layers, budget, beta, window)
    real = _pyramid_real(layers, budget, beta, window)
    assert sum(got) == layers * budget  # the total, exactly
    assert all(a >= b for a, b in zip(got, got[1:]))  # monotone: lower layers keep more
    assert all(abs(g - r) < 1 for g, r in zip(got, real))  # each within rounding of the formula
    assert all(b >= window for b in got)
    if beta == 1:
        assert got == [budget] * layers  # no slope: SnapKV's uniform allocation
    else:
        assert got[0] > budget > got[-1]


def test_budget_schedule_examples():
    # avg 16 selected tokens a layer; top 16/4 = 4; bottom 2*16 - 4 = 28; step 8
    assert layer_budgets(4, 20, beta=4, window=4) == [32, 24, 16, 8]
    assert PyramidConfig(budget=20, beta=4, window=4).budgets(4) == [32, 24, 16, 8]
    assert layer_budgets(1, 64) == [64]
    # a prompt no longer than the budget is not compressed
    assert layer_budgets(5, 64, prompt_len=64) == [64] * 5 and layer_budgets(5, 64, prompt_len=10) == [10] * 5
    # a prompt shorter than the bottom layer's budget: clipped pyramid (bottom keeps it all), same total
    assert layer_budgets(3, 32, 20, 8, prompt_len=40) == [40, 32, 24]
    clipped = layer_budgets(30, 128, 20, 8, prompt_len=200)
    assert clipped[0] == 200 and sum(clipped) == 30 * 128 and all(a >= b for a, b in zip(clipped, clipped[1:]))
    assert max(layer_budgets(30, 128, 20, 8, prompt_len=1000)) < 1000


# ---- (e) bad parameters -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(budget=8, window=8), r"budget=8"), (dict(budget=0), r"budget must be an integer >= 1, got 0"),
    (dict(budget="128"), r"got '128'"), (dict(budget=True), r"got True"), (dict(beta=0.5), r"got 0\.5"),
    (dict(beta=float("inf")), r"got inf"), (dict(window=0), r"window must be an integer >= 1, got 0"),
    (dict(kernel_size=4), r"odd.*got 4"), (dict(kernel_size=0), r"got 0"),
    (dict(pooling="median"), r"pooling must be one of \('max', 'avg'\), got 'median'")])
def test_bad_parameters_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        PyramidConfig(**kw)


def test_bad_names_and_calls(tiny_mha):
    for bad in ("pyramidkv-", "pyramidkv-x", "pyramid-128", "pyramidkv-128-median"):
        with pytest.raises(ValueError, match=f"not a PyramidKV system name: '{bad}'"):
            PyramidConfig.from_name(bad)
    assert NAME_GRAMMAR.startswith("pyramidkv")
    with pytest.raises(ValueError, match=r"budget=4"):
        PyramidConfig.from_name("pyramidkv-4")  # not above the default window of 8
    with pytest.raises(ValueError, match=r"num_layers must be an integer >= 1, got 0"):
        layer_budgets(0, 64)
    with pytest.raises(ValueError, match=r"prompt_len must be an integer >= 1, got -3"):
        layer_budgets(4, 64, prompt_len=-3)
    with pytest.raises(ValueError, match="fewer than the observation window"):
        select_tokens(torch.randn(4, 2, 8), torch.randn(20, 2, 8), keep=3)
    eng = LLMEngine(EngineConfig(model=str(tiny_mha), device="cpu"))
    with pytest.raises(ValueError, match="permutation"):
        attach(eng, "pyramidkv", [0, 0, 1])
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="must be idle"):
        attach(eng, "pyramidkv", [0, 1, 2])


def test_names():
    assert PyramidConfig.from_name("pyramidkv") == PyramidConfig(128, 20.0, 8, 7, "max")
    assert PyramidConfig.from_name("pyramidkv-64") == PyramidConfig(budget=64)
    assert PyramidConfig.from_name("pyramidkv-256-b10.5-w16-k5-avg") == PyramidConfig(256, 10.5, 16, 5, "avg")
    assert PyramidConfig.from_name("pyramidkv-64", beta=4).beta == 4.0


# ---- selection against brute force ------------------------------------------------------------------------------
def _brute_force_select(q, k, keep, kernel, pooling, scale):
    """Loops and math.exp: the method as written in the paper, for one tiny example."""
    w, heads, d = q.shape
    n, kvh, _ = k.shape
    group = heads // kvh
    mass = [[0.0] * (n - w) for _ in range(heads)]
    for h in range(heads):
        for i in range(w):
            visible = n - w + i + 1
            logits = [scale * sum(float(q[i, h, x]) * float(k[j, h // group, x]) for x in range(d))
                      for j in range(visible)]
            top = max(logits)
            z = sum(math.exp(v - top) for v in logits)
            for j in range(n - w):
                mass[h][j] += math.exp(logits[j] - top) / z
    kept = []
    for g in range(kvh):
        s = [sum(mass[h][j] for h in range(g * group, (g + 1) * group)) / group for j in range(n - w)]
        r = kernel // 2
        if pooling == "max":
            pooled = [max(s[max(0, j - r):j + r + 1]) for j in range(n - w)]
        else:
            pooled = [sum(s[max(0, j - r):j + r + 1]) / kernel for j in range(n - w)]
        best = sorted(range(n - w), key=lambda j: (-pooled[j], j))[:keep - w]
        kept.append(sorted(best) + list(range(n - w, n)))
    return kept


@pytest.mark.parametrize("heads,kvh", [(4, 2), (3, 3)])
@pytest.mark.parametrize("pooling,kernel", [("max", 3), ("avg", 3), ("max", 1), ("avg", 5)])
def test_selection_matches_brute_force(heads, kvh, pooling, kernel):
    g = torch.Generator().manual_seed(heads * 10 + kernel)
    for n, w, keep in [(13, 3, 7), (9, 2, 8), (20, 4, 5)]:
        q = torch.randn(w, heads, 5, generator=g, dtype=torch.float64)
        k = torch.randn(n, kvh, 5, generator=g, dtype=torch.float64)
        got = select_tokens(q, k, keep, kernel, pooling, scale=0.7)
        assert got.tolist() == _brute_force_select(q, k, keep, kernel, pooling, 0.7)
    assert select_tokens(q, k, n, kernel, pooling).tolist() == [list(range(n))] * kvh  # keep all


def test_selection_details():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 4, 8, generator=g), torch.randn(30, 2, 8, generator=g)
    s = observation_scores(q, k, 8 ** -0.5)
    assert s.shape == (2, 26) and torch.all(s >= 0)
    # every window query puts mass 1 on the keys it sees: the prefix gets at most the window's 4 queries' worth
    assert float(s.sum()) <= 2 * 4 + 1e-5
    assert torch.equal(pool_scores(s, 1, "max"), s)
    # equal keys: all prefix positions tie, and ties go to the earlier positions
    same = torch.ones(30, 2, 8)
    assert select_tokens(q, same, 10, 3, "max").tolist() == [list(range(6)) + list(range(26, 30))] * 2


# ---- the engine: nothing compressed ------------------------------------------------------------------------------
def test_budget_at_least_the_prompt_is_exact(tiny_checkpoint):
    prompts = _prompts((40, 64, 9, 57))
    want = _greedy(_engine(tiny_checkpoint)[0], prompts, 12)
    for kw in ({}, {"max_num_batched_tokens": 16}):
        eng, policy = _engine(tiny_checkpoint, "pyramidkv-64", **kw)
        assert _greedy(eng, prompts, 12) == want
        assert policy.stats["compressed_requests"] == 0 and policy.stats["uncompressed_requests"] == 4


# ---- the engine: (b) per-layer contents, (d) footprint -----------------------------------------------------------
def _prefill(eng, prompt, max_tokens=6):
    rid = eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    req = eng.requests[rid]
    while req.num_computed_tokens < len(prompt):
        eng.step()
    return req


@pytest.mark.parametrize("chunk", [None, 16])
def test_compressed_layers_hold_their_budget_and_the_selected_kv(tiny_checkpoint, chunk):
    n, system = 150, "pyramidkv-32"  # with a 16-token chunk the 8-token window spans two chunks (150 = 9*16 + 6)
    kw = {"max_num_batched_tokens": chunk} if chunk else {}
    prompt = _prompts((n,), seed=3)[0]
    eng, policy = _engine(tiny_checkpoint, system, **kw)
    base, _ = _engine(tiny_checkpoint, **kw)
    req, breq = _prefill(eng, prompt), _prefill(base, prompt)
    layers = eng.model_config.num_layers
    budgets = layer_budgets(layers, 32, prompt_len=n)
    assert budgets == [55, 32, 9] and sum(budgets) == 32 * layers
    assert policy.layer_lengths(req) == budgets
    assert req.num_computed_tokens == n and req.num_evicted_tokens == n - max(budgets)
    # (d) the footprint: the bottom layer's budget, not the prompt
    bs = eng.pool.block_size
    assert len(req.block_table) == -(-max(budgets) // bs) == 4 < len(breq.block_table) == -(-n // bs) == 10
    assert eng.block_manager.num_used == 4 and base.block_manager.num_used == 10
    st = policy.state(req)
    ids = torch.tensor(req.block_table, device=eng.device)
    bids = torch.tensor(breq.block_table, device=base.device)
    for layer, b in enumerate(budgets):
        kept = st.kept[layer]  # [kv_heads, b]
        assert kept.shape == (eng.model_config.num_kv_heads, b)
        assert torch.all(kept[:, 1:] > kept[:, :-1])  # position order
        assert kept[:, -8:].tolist() == [list(range(n - 8, n))] * kept.shape[0]  # the window
        k, v = eng.pool.gather(layer, ids, b)
        bk, bv = base.pool.gather(layer, bids, n)
        for h in range(kept.shape[0]):
            assert torch.equal(k[:, h], bk[kept[h], h]) and torch.equal(v[:, h], bv[kept[h], h])
    # decode continues on the compressed cache: one more block per 16 generated tokens, from the bottom layer's end
    outs = eng.run_until_done()
    assert len(outs) == 1 and len(outs[0].output_token_ids) == 6
    assert eng.block_manager.num_used == 0
    used = [s.kv_used_blocks for s in eng.step_stats]
    assert max(used[-5:]) == 4  # 55 + 6 tokens still fit in 4 blocks


# ---- decode on the compressed cache against a dense re-implementation ----------------------------------------------
def _dense_layers(model, tokens, positions, caches, capture=None):
    """The decoder with explicit per-layer, per-KV-head caches (``caches[l] = (K, V)``, ``[kv_heads, m, d]``, grown in
    place); the new tokens attend to the cache and causally to each other.  Returns the last row's logits."""
    cfg = model.cfg
    h_, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    t, dev = len(tokens), model.device
    x, residual = model.embed[torch.tensor(tokens, device=dev)], None
    pos = torch.tensor(positions, device=dev)
    cos, sin = model.cos[pos], model.sin[pos]
    for i in range(cfg.num_layers):
        lw = model.arena.layers[i]
        if residual is None:
            residual, h = x, ref.rms_norm(x, lw["input_norm"], cfg.rms_norm_eps)
        else:
            h, residual = ref.add_rms_norm(x, residual, lw["input_norm"], cfg.rms_norm_eps)
        qkv = linear(h, lw, "qkv")
        q = ref.rotary(qkv[:, :h_ * d].view(t, h_, d), cos, sin)
        k = ref.rotary(qkv[:, h_ * d:(h_ + kvh) * d].view(t, kvh, d), cos, sin)
        v = qkv[:, (h_ + kvh) * d:].view(t, kvh, d)
        if capture is not None:
            capture.append((q, k, v))
        K = torch.cat([caches[i][0], k.transpose(0, 1)], dim=1)
        V = torch.cat([caches[i][1], v.transpose(0, 1)], dim=1)
        caches[i] = (K, V)
        m = K.shape[1] - t
        mask = torch.arange(m + t, device=dev)[None, :] <= (m + torch.arange(t, device=dev))[:, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), K.repeat_interleave(h_ // kvh, 0),
                                           V.repeat_interleave(h_ // kvh, 0), attn_mask=mask, scale=model.scale)
        x = linear(o.transpose(0, 1).reshape(t, h_ * d), lw, "o")
        h, residual = ref.add_rms_norm(x, residual, lw["post_norm"], cfg.rms_norm_eps)
        x = linear(ref.silu_and_mul(linear(h, lw, "gate_up")), lw, "down")
    h, _ = ref.add_rms_norm(x[-1:], residual[-1:], model.final_norm, cfg.rms_norm_eps)
    return F.linear(h, model.lm_head).float()[0]


@pytest.mark.parametrize("system", ["pyramidkv-32", "pyramidkv-48-b4-w6-k5-avg"])
def test_decode_on_compressed_cache_matches_dense_reference(tiny_checkpoint, system):
    n, new = 130, 10
    prompt = _prompts((n,), seed=5)[0]
    eng, policy = _engine(tiny_checkpoint, system)
    req = _prefill(eng, prompt, new)
    outs = eng.run_until_done()
    tokens = outs[0].output_token_ids
    cfg, model = policy.config, eng.model
    kvh, d = model.cfg.num_kv_heads, model.cfg.head_dim
    caches = [(torch.zeros(kvh, 0, d, device=eng.device), torch.zeros(kvh, 0, d, device=eng.device))
              for _ in range(model.cfg.num_layers)]
    qkv = []
    with torch.no_grad():
        logits = _dense_layers(model, prompt, list(range(n)), caches, qkv)
        want = [int(logits.argmax())]
        budgets = cfg.budgets(model.cfg.num_layers, n)
        for layer, (q, k, v) in enumerate(qkv):  # PyramidKV on the dense caches
            keep = select_tokens(q[-cfg.window:], k, budgets[layer], cfg.kernel_size, cfg.pooling, model.scale)
            assert torch.equal(keep, policy.state(req).kept[layer])
            idx = keep.unsqueeze(-1).expand(-1, -1, d)
            caches[layer] = (k.transpose(0, 1).gather(1, idx), v.transpose(0, 1).gather(1, idx))
        for step in range(1, new):
            logits = _dense_layers(model, [want[-1]], [n + step - 1], caches)
            want.append(int(logits.argmax()))
    assert tokens == want


# ---- preemption, Triton, SmolLM2, the plugin ---------------------------------------------------------------------
@pytest.mark.parametrize("lengths,blocks,chunk", [((100, 120, 90, 110), 14, 128), ((96, 128, 64, 96), 16, 16)])
def test_preempted_compressed_request_is_recompressed(tiny_mha, lengths, blocks, chunk):
    """A compressed request preempted and recomputed is compressed again, keeping the same prompt tokens and every
    generated token.  With 16-token chunks and prompts of whole chunks, the recompute's prompt ends at a chunk
    boundary: its generated tokens then continue as multi-token chunks on the compressed cache."""
    prompts = _prompts(lengths, seed=1)
    eng, policy = _engine(tiny_mha, "pyramidkv-32", num_kv_blocks=blocks, max_num_batched_tokens=chunk)
    multi = []
    plain_before_forward = policy.before_forward

    def before_forward(sched):
        multi.extend(c.num_new_tokens for c in sched.chunks
                     if c.num_new_tokens > 1 and c.request.num_evicted_tokens > 0)
        plain_before_forward(sched)

    policy.before_forward = before_forward
    before = {}
    orig = eng.scheduler._preempt

    def preempt(req):
        st = policy.state(req)
        if st is not None and st.kept is not None:
            before[req.request_id] = [t.clone() for t in st.kept]
        orig(req)
        assert req.num_evicted_tokens == 0 and policy.state(req) is None
        assert policy.layer_lengths(req) == [0] * 3

    eng.scheduler._preempt = preempt
    reqs = []
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for p in prompts:
        reqs.append(eng.requests[eng.add_request(p, params)])
    kept_after = {}
    while eng.has_unfinished():
        eng.step()
        for r in reqs:
            st = policy.state(r)
            if r.request_id in before and st is not None and st.kept is not None:
                kept_after.setdefault(r.request_id, ([t.clone() for t in st.kept], list(policy.layer_lengths(r)),
                                                     r.num_computed_tokens, r.num_prompt_tokens))
    assert before, "no compressed request was preempted: the test lost its power"
    assert eng.block_manager.num_used == 0 and all(len(r.output_token_ids) == 40 for r in reqs)
    assert policy.stats["compressed_requests"] == 4 + len(before)
    for rid, kept in before.items():
        again, lengths, m, n = kept_after[rid]
        assert all(torch.equal(a, b) for a, b in zip(kept, again))  # the same prompt tokens kept
        budgets = layer_budgets(3, 32, prompt_len=n)
        assert lengths == [b + m - n for b in budgets] and m >= n  # every recomputed generated token kept
    assert bool(multi) == (chunk == 16)


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gqa-pyramidkv"), "gqa")


def test_triton_kernels_match_reference(tiny_gqa):
    """Per-layer slot mappings and context lengths through the Triton kernels (interpreter on CPU), in steps that
    mix prefill chunks with decode rows of compressed requests (the prefill kernel) and decode-only steps."""
    prompts = _prompts((50, 30, 60), seed=2)
    out = {}
    for ks in ("reference", "triton"):
        eng, policy = _engine(tiny_gqa, "pyramidkv-20-w4", kernels=ks, max_num_batched_tokens=40)
        assert eng.runner.graphs is None and eng.runner.kernels.name == ks
        out[ks] = _greedy(eng, prompts, 4)
        assert policy.stats["compressed_requests"] == 3
        mixed = [s for s in eng.step_stats if s.num_seqs > 1 and s.num_tokens > s.num_seqs]
        assert mixed and any(s.num_tokens == s.num_seqs for s in eng.step_stats)
    assert out["triton"] == out["reference"]


def test_per_layer_metadata_travels_in_the_packed_upload(tiny_gqa, monkeypatch):
    """In steps with a compressed request, the per-layer slot mapping and context lengths are two more regions of the
    step's one packed upload (no copy of their own, which would give them storage of their own): the per-layer views
    share the packed buffer's storage, for both kernel sets, and the Triton set still finds its own regions (the
    prefill tile map) in front of them."""
    from baselines import pyramidkv

    seen = []
    layer_state = pyramidkv.PyramidKernels._layer_state

    def spy(self, state, batch, plan, layer):
        seen.append((plan.slots.untyped_storage().data_ptr(), plan.context_lens_t.untyped_storage().data_ptr(),
                     batch.token_ids.untyped_storage().data_ptr(), plan.uploaded, len(batch.kernel_regions)))
        return layer_state(self, state, batch, plan, layer)

    monkeypatch.setattr(pyramidkv.PyramidKernels, "_layer_state", spy)
    prompts = _prompts((50, 30, 60), seed=2)
    for ks in ("reference", "triton"):
        seen.clear()
        eng, policy = _engine(tiny_gqa, "pyramidkv-20-w4", kernels=ks, max_num_batched_tokens=40)
        _greedy(eng, prompts, 4)
        assert policy.stats["compressed_requests"] == 3 and seen
        assert all(s == p and c == p and up for s, c, p, up, _ in seen), ks
        if ks == "triton":  # mixed steps hand the inner set its tile map (2 regions); decode steps none
            assert {n for *_, n in seen} == {0, 2}


def test_plugin_through_the_workflow_installer(tiny_mha):
    sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
    from artifact.engines import install_system

    eng = LLMEngine(EngineConfig(model=str(tiny_mha), device="cpu"))
    got = install_system(eng, "pyramidkv-64", [2, 0, 1], {"pyramidkv-64": "baselines.pyramidkv:attach"})
    assert isinstance(got, PyramidKV) and eng.kv_policy is got and got.config.budget == 64
    assert got.to_dict()["nominal_layer_budgets"] == layer_budgets(3, 64)
    with pytest.raises(ValueError, match="no system or KV policy installed"):
        attach(eng, "pyramidkv", [0, 1, 2])


def test_smollm2():
    """SmolLM2-135M (real weights, GQA 9/3, 30 layers): a budget above the prompts changes nothing; a small one
    shrinks the cache and still decodes."""
    eng = LLMEngine(EngineConfig(model="smollm2-135m", device="cpu"))
    text = ("The history of the printing press begins in the fifteenth century, when movable type changed how books "
            "were made and read across Europe. ") * 6
    prompts = [eng.tokenize(text), eng.tokenize("The capital of Italy is")]
    assert len(prompts[0]) > 128
    want = _greedy(eng, prompts, 8)
    base_peak = max(s.kv_used_blocks for s in eng.step_stats)
    policy = attach(eng, "pyramidkv-256", list(range(30)))
    assert _greedy(eng, prompts, 8) == want and policy.stats["compressed_requests"] == 0
    policy.uninstall()
    assert eng.kv_policy is None and eng.runner.kernels is eng.model.kernels
    first = len(eng.step_stats)
    policy = attach(eng, "pyramidkv-32", list(range(30)))
    got = _greedy(eng, prompts, 8)
    assert policy.stats["compressed_requests"] == 1 and policy.stats["uncompressed_requests"] == 1
    assert got[1] == want[1] and got[0][0] == want[0][0]  # the short prompt is untouched; token 1 is prefill's
    decode = [s.kv_used_blocks for s in list(eng.step_stats)[first + 1:]]
    assert max(decode) < base_peak


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_fp16_default_fast_path(tiny_checkpoint):
    """On CUDA at fp16 with the default fast path (Triton kernels, decode graphs): the policy switches the graphs
    off, serves every request (a pool small enough to preempt), returns every block, and its first tokens (from the
    uncompressed prefill) match the engine without PyramidKV."""
    prompts = _prompts((100, 120, 90, 110, 140, 80), seed=4)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for system in (None, "pyramidkv-32"):
        eng = LLMEngine(EngineConfig(model=str(tiny_checkpoint), device="cuda", dtype="float16", num_kv_blocks=24,
                                     max_num_batched_tokens=128))
        assert eng.runner.graphs is not None
        policy = attach(eng, system, list(range(3))) if system else None
        ids = [eng.add_request(p, params) for p in prompts]
        done = {o.request_id: o.output_token_ids for o in eng.run_until_done()}
        outs[system] = [done[i] for i in ids]
        assert eng.block_manager.num_used == 0 and all(len(o) == 24 for o in outs[system])
        if policy is not None:
            assert eng.runner.graphs is None and policy.stats["compressed_requests"] >= 6
    assert [o[0] for o in outs[None]] == [o[0] for o in outs["pyramidkv-32"]]
