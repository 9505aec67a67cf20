"""Snakemake script: build one setting's workload at one offered load.

The trace's window is cut and downsampled as configured (the paper's 72 s and 4.75x / 1.75x), then rate-scaled so
that its mean arrival rate is ``load x`` the FP16 capacity measured by the calibration step, and cut to the requests
arriving in the first ``workload.replay_s`` seconds.  Each request is paired with an example of the task set
(morphserve.workloads.builder).  The summary records the measured capacity, the native and target rates and the
rate scale, next to the builder's own lineage."""

import sys

from artifact.engines import model_source
from morphserve.harness.records import read_json
from morphserve.provenance import provenance
from morphserve.workloads.builder import WorkloadSpec, build_workload, load_trace, write_workload

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
cfg = sm.config
w = sm.wildcards
cal, _ = read_json(sm.input.calibration, "calibration")
tr = cfg["traces"][w.trace]
wl = cfg["workload"]
load = float(w.load)
common = dict(trace=w.trace, window_s=float(tr["window_s"]), window_rule=tr.get("window_rule", "busiest"),
              downsample=tr.get("downsample"), downsample_mode=tr.get("downsample_mode", "thin"),
              synthetic_rate_rps=tr.get("synthetic_rate_rps"), seed=int(cfg.get("seed", 0)))
native = load_trace(WorkloadSpec(**common))
native_rate = len(native.requests) / native.duration_s
target_rate = load * cal["capacity_rps"]
rate_scale = target_rate / native_rate
max_requests = max(1, min(len(native.requests), round(target_rate * float(wl["replay_s"]))))
spec = WorkloadSpec(**common, rate_scale=rate_scale, max_requests=max_requests,
                    tasks=tuple(cfg["task_sets"][w.taskset]), pool=wl.get("pool", "eval"), lengths="fixed",
                    prompt_tokens=cal["request_shape"]["prompt_tokens"],
                    output_tokens=cal["request_shape"]["output_tokens"], chat=bool(wl.get("chat", False)))
workload = build_workload(spec, model_source(cfg, w.model).source)
workload.summary["calibration"] = {
    "file": sm.input.calibration, "capacity_rps": cal["capacity_rps"], "load_factor": load,
    "native_rate_rps": native_rate, "target_rate_rps": target_rate, "rate_scale": rate_scale,
    "replay_s": float(wl["replay_s"]), "max_requests": max_requests,
}
workload.summary["setting"] = {"model": w.model, "budget": w.budget, "trace": w.trace, "taskset": w.taskset}
print(f"{w.trace}: native {native_rate:.3f} req/s -> target {target_rate:.3f} req/s (scale {rate_scale:.4f}), "
      f"{len(workload)} requests", file=sys.stderr)
write_workload(workload, sm.output.jsonl, provenance({"spec": spec.to_dict()}, None, spec.seed,
                                                       workload.summary["synthetic"]["weights"]))
