"""Snakemake script: artifacts/REPORT.md, every number read from the measured files.

It lists the hardware and software (from the runs' provenance), the configuration (models and weights, budgets,
calibration, offered loads, SLOs, swap order), each headline claim of the paper next to the value measured here
with a verdict and its reason (artifact/claims.py, rules in config/claims.yaml), the paper's Table 5 beside the
measured one, the main results table and the figures."""

import json
import sys
from pathlib import Path

import yaml

from artifact.claims import evaluate
from artifact.frames import read_frame, read_provenance
from artifact.grid import base_load
from artifact.tables import fmt, systems_table, table5, to_markdown
from morphserve.harness.records import read_json

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
cfg = sm.config
out_path = Path(sm.output.report)
art = out_path.parent
base = base_load(cfg)
runs = read_frame(sm.input.runs)
prov = read_provenance(sm.input.runs)
claims_cfg = yaml.safe_load(Path(sm.input.claims).read_text())
cals = {Path(p).parent.name + "/" + Path(p).stem: read_json(p, "calibration") for p in sm.input.calibrations}
imps = {Path(p).stem: read_json(p, "importance")[0] for p in sm.input.importances}
wls = [read_json(p, "summary")[0] for p in sm.input.workloads]


def rel(path: str) -> str:
    return Path(path).resolve().relative_to(art.resolve()).as_posix()


L = []
add = L.append
add(f"# MorphServe reproduction report: `{cfg['profile']}` profile")
add("")
add(f"Written by `workflow/scripts/report.py` from the files the workflow measured (`{sm.input.runs}` and the "
    f"files beside it); every number below is read from them.  Rerun `snakemake` to regenerate; do not edit.")
add("")
add("## Hardware and software")
add("")
devices = sorted(set(runs.device.dropna()))
add(f"- device of the runs: {', '.join(f'`{d}`' for d in devices)}")
add(f"- commit `{prov.get('git_commit')}`, torch {prov.get('torch')}, transformers {prov.get('transformers')}, "
    f"Python {prov.get('python')}; summary written {prov.get('created')}")
add("")
add("## Configuration")
add("")
syn_w = bool(runs.synthetic_weights.any())
add("| model | weights | swap order | memory budget | FP16 KV blocks | prompt / output tokens |")
add("|---|---|---|---|---|---|")
for key, (cal, _) in sorted(cals.items()):
    model, budget = key.split("/")
    imp = imps[model]
    bud = cfg["budgets"][budget]
    weights = "SYNTHETIC" if cal["synthetic_weights"] else "real"
    add(f"| {model} | {weights} ({cal['model']['note']}) | {imp['strategy']}: {imp['source']} | {budget}: "
        f"{bud['memory_budget_bytes'] / 1e9:.3g} GB ({bud.get('description', '')}) | {cal['fp16_kv_blocks']} | "
        f"{cal['request_shape']['prompt_tokens']} / {cal['request_shape']['output_tokens']} |")
add("")
add("**Calibration** (FP16, measured before the runs; `results/<profile>/calibration/`): the base offered load is "
    f"{base} x the saturated FP16 capacity; SLOs as configured or derived from the unloaded latency.")
add("")
add("| model / budget | FP16 capacity (req/s) | capacity with unbounded KV (req/s) | unloaded TTFT P50 (s) | "
    "unloaded TPOT P50 (s) | TTFT SLO (s) | TPOT SLO (s) |")
add("|---|---|---|---|---|---|---|")
for key, (cal, _) in sorted(cals.items()):
    unb = cal.get("saturated_unbounded_kv", {}).get("capacity_rps")
    add(f"| {key} | {fmt(cal['capacity_rps'])} | {fmt(unb)} | {fmt(cal['unloaded']['ttft_p50_s'])} | "
        f"{fmt(cal['unloaded']['tpot_p50_s'])} | {fmt(cal['slo']['ttft_s'])} ({cal['slo']['ttft_rule']}) | "
        f"{fmt(cal['slo']['tpot_s'])} ({cal['slo']['tpot_rule']}) |")
add("")
add("**Workloads** (trace window, downsampling and rate scale; `results/<profile>/workloads/`):")
add("")
add("| model / budget / trace / tasks | load | trace | native rate (req/s) | offered rate (req/s) | rate scale | "
    "requests | last arrival (s) |")
add("|---|---|---|---|---|---|---|---|")
for s in sorted(wls, key=lambda s: (s["setting"]["model"], s["setting"]["budget"], s["setting"]["trace"],
                                     s["setting"]["taskset"], s["calibration"]["load_factor"])):
    st, c = s["setting"], s["calibration"]
    trace = f"{st['trace']} ({'SYNTHETIC generator' if s['synthetic']['trace'] else 'real'})"
    add(f"| {st['model']}/{st['budget']}/{st['trace']}/{st['taskset']} | {c['load_factor']:g} | {trace} | "
        f"{fmt(c['native_rate_rps'])} | {fmt(c['target_rate_rps'])} | {fmt(c['rate_scale'])} | "
        f"{s['workload']['requests']} | {fmt(s['workload']['last_arrival_s'])} |")
add("")
add(f"Systems: {', '.join(f'`{s}`' for s in cfg['systems'])}; MorphServe's row in Table 5 and in single-mode "
    f"claims is `{cfg['morphserve_headline_mode']}`.  Tasks per set: "
    + "; ".join(f"{k}: {', '.join(v)}" for k, v in cfg["task_sets"].items()) + ".")
add("")
add("## Headline claims")
add("")
if any("cpu" in d for d in devices):
    add("These runs are on a CPU with a small model, short requests and a deliberately small KV pool; the paper's "
        "are on L4/A100 GPUs with 7B-34B models.  Ratios between systems under pressure are compared with the "
        "paper's; absolute magnitudes depend on the hardware, and each verdict states its rule.")
    add("")
tol = claims_cfg.get("tolerance", 0)
add(f"Rules and tolerance ({tol:.0%} unless the claim sets its own) are in `config/claims.yaml`; a run with fewer "
    f"than {claims_cfg.get('min_requests', 0)} finished requests is not used for the claims that need samples.")
add("")
add("| claim | paper | measured here | reproduces | why |")
add("|---|---|---|---|---|")
verdicts = evaluate(runs, cfg, claims_cfg, base)
for v in verdicts:
    add(f"| {v.text} | {v.paper} | {v.measured} | **{v.verdict}** | {v.reason} |")
add("")
add("<details><summary>Per-setting values of each claim</summary>")
add("")
for v in verdicts:
    if v.values:
        add(f"- `{v.id}`: " + "; ".join(f"{label}: {value:.3g}" for label, value in v.values))
add("")
add("</details>")
add("")
add("## Table 5 layout")
add("")
t5 = claims_cfg["table5"]
add(f"The paper ({t5['setting']}):")
add("")
add("| row | quality (F1) | P95 TTFT (s) | SLO violations (%) |")
add("|---|---|---|---|")
for r in t5["rows"].values():
    add(f"| {r['label']} | {r['quality']} | {r['ttft_p95_s']} | {r['slo_violations_pct']} |")
add("")
add("Measured here (quality: the headline scheme's score, macro mean over the task set; SLO: TTFT):")
add("")
add(to_markdown(table5(runs, base, cfg["morphserve_headline_mode"]).rename(columns={"ttft_slo_violations_pct":
                                                                                 "SLO violations (%)"})))
add("")
add("## Results per system")
add("")
st = systems_table(runs, base, cfg["systems"])
add(to_markdown(st, ["model", "trace", "taskset", "weights", "system", "ttft_p95_s", "tpot_p99_s",
                     "ttft_slo_violations_pct", "throughput_rps", "goodput_rps", "max_kv_blocks", "quality",
                     "quality_delta"]))
add("")
add("Full tables (CSV and Markdown): " + ", ".join(f"[{Path(p).name}]({rel(p)})" for p in sm.input.tables) + ".")
add("")
add("## Figures")
add("")
for p in sm.params.figures:
    add(f"- [{Path(p).name}]({rel(p)})")
add("")
add("## Caveats")
add("")
behind = runs[runs.fell_behind.astype(bool)]
errs = runs[runs.errors > 0]
if syn_w:
    add("- Some runs use SYNTHETIC weights: their quality is not measured and their text is meaningless.")
if bool(runs.synthetic_trace.any()):
    add("- The BurstGPT trace is not available offline: its runs use the SYNTHETIC BurstGPT-shaped generator "
        "(morphserve.workloads.traces.synthetic_burstgpt), labelled `(synthetic)` everywhere.")
add(f"- Replays where the driver submitted a request later than its tolerance (latencies include the delay): "
    f"{len(behind)} of {len(runs)}" + (": " + ", ".join(f"{r.trace}/{r.system}@{r.load}" for r in
                                                            behind.itertuples()) if len(behind) else "") + ".")
add(f"- Runs with error records: {len(errs)} of {len(runs)}" +
    (": " + ", ".join(f"{r.trace}/{r.system}@{r.load} ({r.errors})" for r in errs.itertuples()) if len(errs) else "")
    + ".")
if any(str(d).startswith("cpu") for d in devices):
    add("- On a CPU, W8/W4 layers run the pure-PyTorch reference path (dequantize, then multiply, at every step), "
        "which is slower than FP16: the TPOT of systems with quantized layers is penalised here.  On a GPU the "
        "fused kernels are faster than FP16 at batch 1 but not at every batch size (BENCHMARKS.md, issue #3).")
small = runs[runs.load == base].ok.min()
add(f"- Sample sizes: {int(small)} to {int(runs[runs.load == base].ok.max())} finished requests per base-load run; "
    f"percentiles and per-task quality of small samples are noisy.")
out_path.write_text("\n".join(L) + "\n", encoding="utf-8")
Path(sm.output.claims).write_text(json.dumps({"provenance": prov, "claims": [v.to_dict() for v in verdicts]},
                                             indent=1) + "\n", encoding="utf-8")
