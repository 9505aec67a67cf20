"""Baselines compared with MorphServe inside the same engine (issue #8).

* :mod:`baselines.llm_pq` - an LLM-PQ-style offline precision planner: one static FP16/W8/W4 map per layer, chosen
  by an exact integer program under a memory budget and an expected load, installed as a static system.
* :mod:`baselines.pyramidkv` - PyramidKV KV-cache compression at the end of prefill: per-layer token budgets on a
  pyramid, tokens chosen by the attention of an observation window, only the kept tokens stored in KV blocks.

Each baseline exposes a ``system_plugins`` installer (``config/config.yaml``): ``function(engine, name, order)``
installs the system on an idle engine, like :func:`morphserve.systems.attach_system`.
"""
