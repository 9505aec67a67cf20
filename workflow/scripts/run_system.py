"""Snakemake script: one run, i.e. one system serving one workload in real time.

The engine is built from the (model, budget) engine configuration shared by every system, the system is installed
on the idle engine (static precision maps are applied before serving; dynamic systems get their controller), and the
workload is replayed open-loop by morphserve.harness.replay.run_replay with the calibrated SLOs.  Besides the
harness's files (requests, aggregates, the per-step timeline) it writes the morpher's own timeline (every decision,
target map and KV extension, times relative to the replay's start) and run.json: what was installed, the swap order
and its source, the KV capacity before serving and the controller's decisions."""

import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from artifact.engines import engine_config, install_system, model_source
from morphserve.engine.engine import LLMEngine
from morphserve.harness.metrics import SLO
from morphserve.harness.records import read_csv, read_json, write_csv, write_json
from morphserve.harness.replay import run_replay
from morphserve.provenance import provenance

MORPH_COLUMNS = ("step", "t_s", "precisions", "target", "kv_total_blocks", "kv_used_blocks", "kv_extension_blocks",
                 "queue_len", "running", "swaps_in_flight", "releasing_layers", "reason")

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
torch.set_num_threads(sm.threads)
cfg = sm.config
w = sm.wildcards
out_dir = Path(sm.output.aggregates).parent
cal, _ = read_json(sm.input.calibration, "calibration")
imp, _ = read_json(sm.input.importance, "importance")
replay_cfg = cfg.get("replay") or {}

ecfg = engine_config(cfg, w.model, w.budget)
engine = LLMEngine(ecfg)
fp16_blocks = engine.block_manager.num_total_blocks
t = time.monotonic()
context = {"importance": imp, "prompt_tokens": int(cfg["workload"]["prompt_tokens"]),
           "output_tokens": int(cfg["workload"]["output_tokens"]),
           "concurrency": int(cfg["calibration"]["requests"])}
installed = install_system(engine, w.system, list(imp["order"]), cfg.get("system_plugins") or {}, context)
install_s = time.monotonic() - t
start_blocks = engine.block_manager.num_total_blocks
print(f"{w.system}: installed in {install_s:.1f} s, KV blocks {fp16_blocks} -> {start_blocks}, "
      f"precisions {','.join(engine.model.arena.precisions())}", file=sys.stderr)
slo = SLO(ttft_s=cal["slo"]["ttft_s"], tpot_s=cal["slo"]["tpot_s"])
result = run_replay(sm.input.workload, out_dir, engine, slo=slo,
                    warmup_requests=int(replay_cfg.get("warmup_requests", 1)),
                    drain_timeout_s=replay_cfg.get("drain_timeout_s"), score_quality=False, progress=True)
for msg in result["warnings"]:
    print(f"warning: {msg}", file=sys.stderr)

# the replay's t0 on the engine clock, from any step of its timeline (t_s is relative to t0)
rows, prov = read_csv(result["files"]["timeline"])
starts = {s.step: s.start for s in engine.step_stats}
t0 = next((starts[int(r["step"])] - float(r["t_s"]) for r in rows if int(r["step"]) in starts), None)
morpher = getattr(engine, "morpher", None)
timeline = list(getattr(morpher, "timeline", []) or [])
if timeline and t0 is None:
    raise RuntimeError("the replay recorded no step, so the morpher's timeline cannot be aligned with it")
morph_rows = [{**{k: v for k, v in e.to_dict().items() if k != "time"}, "t_s": e.time - t0} for e in timeline]
write_csv(sm.output.morph_timeline, morph_rows, MORPH_COLUMNS, prov)
controller = getattr(morpher, "controller", None)
run = {
    "run": dict(w.items()),
    "system": w.system,
    "installed": type(installed).__name__ if installed is not None else None,
    "mode": controller.mode.to_dict() if controller is not None else None,
    "decisions": [asdict(d) for d in controller.decisions] if controller is not None else [],
    "order": list(imp["order"]),
    "order_source": imp["source"],
    "plan": installed.plan.to_dict() if getattr(installed, "plan", None) is not None else None,
    "install_s": install_s,
    "fp16_kv_blocks": fp16_blocks,
    "start_kv_blocks": start_blocks,
    "start_precisions": engine.model.arena.precisions(),
    "model": model_source(cfg, w.model).to_dict(),
    "synthetic_weights": engine.synthetic_weights,
    "slo": slo.to_dict(),
    "calibration": sm.input.calibration,
    "workload": sm.input.workload,
    "warnings": result["warnings"],
}
write_json(sm.output.run, "run", run, prov)
engine.close()  # releases the heap freeze run_replay took after its warm-up
