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
