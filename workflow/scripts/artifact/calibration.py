"""Calibration: measure what the engine at hand serves, so the offered load (and, on CPU, the SLOs) come from a
measurement instead of a typed constant.

For one (model, memory budget), with the FP16 system in the budget's KV pool and the workload's request shape
(fixed prompt and output lengths; prompts are seeded random token ids: with ``ignore_eos`` and fixed lengths the
cost of a request does not depend on its content):

* **unloaded**: ``unloaded_requests`` requests served one at a time; their median TTFT and TPOT are the latency of
  an idle engine;
* **capacity**: ``requests`` requests submitted at once and served to completion (closed loop, saturated); the
  capacity is ``requests / makespan`` (requests per second) and ``output tokens / makespan``;
* optionally the same saturated measurement with a KV pool large enough for every request at once
  (``unbounded_kv``): when it is much higher than the budget's capacity, the KV pool is what limits FP16, which is
  the pressure that MorphServe's extra KV blocks relieve.

The workload step sets each trace's rate scale so that the offered load is ``load_factor x capacity_rps``; the SLOs
are either given in seconds or ``multiple x`` the unloaded medians (:func:`slo_from`).
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np


def request_shape(config: dict[str, Any], model_config) -> tuple[int, int]:
    """(prompt tokens, output tokens) of the profile's fixed-length workloads for this model."""
    from morphserve.workloads.prompts import prompt_length_for, response_length_for

    wl = config["workload"]
    prompt = wl.get("prompt_tokens") or prompt_length_for(model_config)
    output = wl.get("output_tokens") or response_length_for(model_config)
    return int(prompt), int(output)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng([seed, 7])
    low = min(100, vocab // 2)  # keep clear of the special tokens at the start of the vocabulary
    return [rng.integers(low, vocab, size=length).tolist() for _ in range(n)]


def _serve_together(engine, prompts: list[list[int]], output_tokens: int, tag: str) -> dict[str, Any]:
    """Submit ``prompts`` at once, serve them to completion; throughput over the makespan."""
    from morphserve.engine.sampling_params import SamplingParams

    t0 = engine.clock()
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=output_tokens, ignore_eos=True), request_id=f"{tag}-{i}",
                           arrival_time=t0)
    outs = engine.run_until_done()
    if len(outs) != len(prompts) or any(o.finish_reason != "length" for o in outs):
        bad = [(o.request_id, o.finish_reason, o.error) for o in outs if o.finish_reason != "length"]
        raise RuntimeError(f"calibration requests did not all finish normally: {bad or 'missing outputs'}")
    makespan = max(o.metrics.finished_time for o in outs) - t0
    out_tokens = sum(len(o.output_token_ids) for o in outs)
    return {"requests": len(prompts), "makespan_s": makespan, "capacity_rps": len(prompts) / makespan,
            "output_tokens_per_s": out_tokens / makespan,
            "ttft_p50_s": statistics.median(o.metrics.ttft for o in outs),
            "preemptions": sum(o.metrics.num_preemptions for o in outs)}


def measure(engine, prompt_tokens: int, output_tokens: int, requests: int, unloaded_requests: int,
            seed: int) -> dict[str, Any]:
    """The unloaded latencies and the saturated capacity of ``engine`` (see the module docstring)."""
    from morphserve.engine.sampling_params import SamplingParams

    if requests < 1 or unloaded_requests < 1:
        raise ValueError(f"calibration needs requests >= 1 and unloaded_requests >= 1, got {requests}, "
                         f"{unloaded_requests}")
    vocab = engine.model_config.vocab_size
    prompts = _prompts(requests + unloaded_requests + 1, prompt_tokens, vocab, seed)
    engine.add_request(prompts[0], SamplingParams(max_tokens=2, ignore_eos=True), request_id="warmup")
    engine.run_until_done()
    ttft, tpot = [], []
    for i in range(unloaded_requests):
        engine.add_request(prompts[1 + i], SamplingParams(max_tokens=output_tokens, ignore_eos=True),
                           request_id=f"unloaded-{i}")
        (out,) = engine.run_until_done()
        ttft.append(out.metrics.ttft)
        if out.metrics.tpot is not None:
            tpot.append(out.metrics.tpot)
    saturated = _serve_together(engine, prompts[1 + unloaded_requests:], output_tokens, "saturated")
    return {"unloaded": {"requests": unloaded_requests, "ttft_p50_s": statistics.median(ttft),
                         "tpot_p50_s": statistics.median(tpot) if tpot else None,
                         "ttft_s": ttft, "tpot_s": tpot},
            "saturated": saturated}


def slo_from(slo_config: dict[str, Any], unloaded: dict[str, Any]) -> dict[str, Any]:
    """The SLOs in seconds: a configured number as is, else ``multiple x`` the unloaded median (and how)."""
    out: dict[str, Any] = {}
    for metric in ("ttft", "tpot"):
        fixed = slo_config.get(f"{metric}_s")
        multiple = slo_config.get(f"{metric}_unloaded_multiple")
        if fixed is not None:
            out[f"{metric}_s"] = float(fixed)
            out[f"{metric}_rule"] = "configured"
        elif multiple is not None:
            base = unloaded.get(f"{metric}_p50_s")
            if base is None:
                raise ValueError(f"slo.{metric}_unloaded_multiple needs an unloaded {metric.upper()}, but the "
                                 f"calibration measured none (output_tokens must be >= 2 for a TPOT)")
            out[f"{metric}_s"] = float(multiple) * base
            out[f"{metric}_rule"] = f"{multiple} x unloaded P50 ({base:.3f} s)"
        else:
            raise ValueError(f"slo.{metric}_s and slo.{metric}_unloaded_multiple are both null: set one")
    return out
