"""Regression benchmarks of the reference kernels (the CPU path and ground truth of every fast kernel), at the
shapes of a SmolLM2-135M layer (hidden 576, 9 query / 3 KV heads of 64, FFN 1536) in float32."""

from __future__ import annotations

import pytest
import torch

from morphserve.kernels import reference as ref
from morphserve.memory.kv_pool import KVPool
from morphserve.model.config import architecture

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64


@pytest.fixture(scope="module")
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("tokens", [1, 256])
def test_rms_norm(benchmark, gen, tokens):
    x = torch.randn(tokens, HIDDEN, generator=gen)
    w = torch.randn(HIDDEN, generator=gen)
    out = benchmark(ref.rms_norm, x, w, 1e-5)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_rotary(benchmark, gen):
    x = torch.randn(256, HEADS, HEAD_DIM, generator=gen)
    cos, sin = torch.randn(256, HEAD_DIM, generator=gen), torch.randn(256, HEAD_DIM, generator=gen)
    out = benchmark(ref.rotary, x, cos, sin)
    assert out.shape == x.shape


def test_silu_and_mul(benchmark, gen):
    x = torch.randn(256, 2 * FFN, generator=gen)
    out = benchmark(ref.silu_and_mul, x)
    assert out.shape == (256, FFN)


def test_paged_attention_decode(benchmark, gen):
    """One decode step of 8 sequences of 512 cached tokens each, through the segment table of a paged pool."""
    cfg = architecture("smollm2-135m")
    pool = KVPool(cfg, 8 * 32 + 8, 16, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    pool.segments[0].tensor.normal_()  # any finite K/V: the timing does not depend on the values
    tables = [list(range(s * 32, (s + 1) * 32)) for s in range(8)]
    q = torch.randn(8, HEADS, HEAD_DIM, generator=gen)
    out = benchmark(ref.paged_attention, q, pool, 0, list(range(9)), [512] * 8, tables, HEAD_DIM ** -0.5)
    assert out.shape == (8, HEADS * HEAD_DIM) and torch.isfinite(out).all()
