"""Fixtures and helpers of the regression benchmarks: small engines whose hot paths are timed (README.md here)."""

from __future__ import annotations

import pytest
import torch

import morphserve.quant  # noqa: F401  (registers the W8/W4 layouts and linear kernels)
from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory):
    """The tiny MHA checkpoint of the test suite with a wider MLP (512), so one W4 layer frees several KV blocks."""
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("bench-wide"), "mha", intermediate_size=512)


def make_engine(path, device: str, blocks: int = 256, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), device=device, num_kv_blocks=blocks, **kwargs))
