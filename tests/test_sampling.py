"""Sampling parameters and the sampler."""

import pytest
import torch

from morphserve.engine.sampler import sample
from morphserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("kw,name", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(stop_token_ids=(-3,)), "stop_token_ids"), (dict(seed=-1), "seed"),
])
def test_invalid_params_name_the_value(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 1.9], [5.0, -1.0, 0.0]])
    assert sample(logits, [SamplingParams()] * 2, [None, None]) == [1, 0]


def _draws(p, logits, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [sample(logits[None], [p], [g])[0] for _ in range(n)]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([3.0, 2.9, 2.8, 0.0, -1.0])
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2), logits)) == {0, 1}
    probs = logits.softmax(-1)  # ~[.37, .33, .30, .02, .007]: top_p=0.6 keeps the first two
    assert probs[:1].sum() < 0.6 <= probs[:2].sum()
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.6), logits)) == {0, 1}
    assert len(set(_draws(SamplingParams(temperature=1.0), logits))) >= 4


def test_seeded_sampling_is_reproducible_and_temperature_sharpens():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5])
    p = SamplingParams(temperature=1.0)
    assert _draws(p, logits, 50, seed=3) == _draws(p, logits, 50, seed=3)
    cold = _draws(SamplingParams(temperature=0.05), logits, 200)
    assert cold.count(0) >= 195


def test_draw_frequencies_match_the_distribution():
    """One batched call, 4000 rows with the same logits and their own generators: the exponential race draws each
    token with its softmax probability (deterministic seeds; the bound is ~4 standard deviations)."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5]).expand(4000, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    got = torch.tensor(sample(logits, [SamplingParams(temperature=1.0)] * 4000, gens))
    freq = torch.bincount(got, minlength=4).float() / 4000
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.03, freq


def test_rows_are_independent_of_the_batch():
    """A seeded row draws the same tokens alone and in a batch with greedy rows and rows of other parameters, and
    each row keeps to its own top-k / top-p support."""
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    params = [SamplingParams(temperature=0.9, top_k=3), SamplingParams(), SamplingParams(temperature=1.2, top_p=0.5),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=10, top_p=0.8)]

    def gens():
        return [None if p.greedy else torch.Generator().manual_seed(10 + i) for i, p in enumerate(params)]

    batch_gens, alone_gens = gens(), gens()
    for _ in range(30):
        together = sample(logits, params, batch_gens)
        alone = [sample(logits[i:i + 1], [p], [alone_gens[i]])[0] for i, p in enumerate(params)]
        assert together == alone
        assert together[1] == int(logits[1].argmax())
        assert together[0] in logits[0].topk(3).indices.tolist()
        probs = (logits[2] / 1.2).softmax(-1).sort(descending=True)
        keep = int((probs.values.cumsum(-1) - probs.values < 0.5).sum())
        assert together[2] in probs.indices[:keep].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda_never_synchronises():
    """With generators on the device (what the engine creates), sampling enqueues work only: PyTorch's sync debug
    mode raises on any host-device synchronisation.  A host generator is served without a wait too."""
    dev = torch.device("cuda")
    logits = torch.randn(6, 32000, device=dev)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(),
              SamplingParams(temperature=1.0, top_k=20, seed=2), SamplingParams(temperature=0.5),
              SamplingParams(), SamplingParams(temperature=1.1, top_k=5, top_p=0.7)]
    gens = [None if p.greedy else torch.Generator(device=dev).manual_seed(i) for i, p in enumerate(params)]
    gens[3] = torch.Generator().manual_seed(3)  # a host generator
    from morphserve.engine.sampler import sample_tensor
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample_tensor(logits, params, gens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and out[1].item() == logits[1].argmax().item()
