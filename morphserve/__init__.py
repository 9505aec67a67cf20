"""MorphServe: a workload-aware LLM serving engine (paged KV cache, continuous batching, runtime layer swapping
and elastic KV capacity).  Control plane in :mod:`morphserve.engine`; data plane in :mod:`morphserve.model`,
:mod:`morphserve.memory` and :mod:`morphserve.kernels`."""

from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine, RequestError
from morphserve.engine.llm import LLM
from morphserve.engine.request import RequestOutput
from morphserve.engine.sampling_params import SamplingParams
from morphserve.engine.serving import ServingEngine

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "RequestError", "ServingEngine"]
__version__ = "0.1.0"
