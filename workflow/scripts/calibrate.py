"""Snakemake script: measure FP16's unloaded latency and saturated capacity for one (model, budget) and derive the
SLOs (see artifact/calibration.py).  Writes the calibration JSON every workload and run of the pair reads."""

import sys
import time

import torch

from artifact.calibration import measure, request_shape, slo_from
from artifact.engines import engine_config, model_source
from morphserve.engine.engine import LLMEngine
from morphserve.harness.records import write_json
from morphserve.provenance import provenance

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
torch.set_num_threads(sm.threads)
cfg = sm.config
model, budget = sm.wildcards.model, sm.wildcards.budget
cal = cfg["calibration"]
seed = int(cfg.get("seed", 0))

ecfg = engine_config(cfg, model, budget)
t = time.monotonic()
engine = LLMEngine(ecfg)
load_s = time.monotonic() - t
prompt_tokens, output_tokens = request_shape(cfg, engine.model_config)
blocks_per_request = -(-(prompt_tokens + output_tokens) // ecfg.block_size)
print(f"calibrating {model} / {budget}: {engine.block_manager.num_total_blocks} FP16 KV blocks, "
      f"{prompt_tokens}+{output_tokens} tokens per request ({blocks_per_request} blocks)", file=sys.stderr)
budget_m = measure(engine, prompt_tokens, output_tokens, int(cal["requests"]), int(cal["unloaded_requests"]), seed)
result = {
    "model": model_source(cfg, model).to_dict(),
    "budget": {"name": budget, **cfg["budgets"][budget]},
    "synthetic_weights": engine.synthetic_weights,
    "request_shape": {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
                      "blocks_per_request": blocks_per_request},
    "fp16_kv_blocks": engine.block_manager.num_total_blocks,
    "block_size": ecfg.block_size,
    "weight_bytes": engine.model.weight_bytes(),
    "model_load_s": load_s,
    "unloaded": budget_m["unloaded"],
    "saturated": budget_m["saturated"],
    "capacity_rps": budget_m["saturated"]["capacity_rps"],
    "load_factor": float(cal["load_factor"]),
}
del engine
if cal.get("measure_unbounded_kv"):
    blocks = blocks_per_request * (int(cal["requests"]) + 1)
    big = LLMEngine(engine_config(cfg, model, budget, num_kv_blocks=blocks))
    result["saturated_unbounded_kv"] = {**measure(big, prompt_tokens, output_tokens, int(cal["requests"]), 1,
                                                  seed)["saturated"], "kv_blocks": blocks}
    result["kv_bound_ratio"] = result["saturated_unbounded_kv"]["capacity_rps"] / result["capacity_rps"]
    del big
result["slo"] = slo_from(cfg["slo"], result["unloaded"])
print(f"capacity {result['capacity_rps']:.3f} req/s; SLO {result['slo']}", file=sys.stderr)
write_json(sm.output[0], "calibration", result,
           provenance(ecfg.to_dict(), ecfg.torch_device(), seed, result["synthetic_weights"]))
