"""Snakemake script: the artifact's tables as CSV (with a provenance line) and Markdown, from the run summary."""

import sys
from pathlib import Path

from artifact.frames import read_frame, read_provenance
from artifact.grid import base_load
from artifact.tables import (grouped_markdown, per_task_table, sweep_table, systems_table, table5)
from morphserve.harness.records import write_csv

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
cfg = sm.config
runs = read_frame(sm.input.runs)
tasks = read_frame(sm.input.tasks)
prov = read_provenance(sm.input.runs)
base = base_load(cfg)
sweep = cfg.get("rate_sweep") or {}
tables = {
    "systems": (systems_table(runs, base, cfg["systems"]),
                "Per system at the base load: latency percentiles, SLO violations, throughput, goodput, KV capacity "
                "and quality with its change versus FP16 of the same setting."),
    "table5": (table5(runs, base, cfg["morphserve_headline_mode"]),
               f"The paper's Table 5 layout: all layers W4, static selective 16 / 8 layers W4, FP16 and MorphServe "
               f"({cfg['morphserve_headline_mode']})."),
    "rate_sweep": (sweep_table(runs, sweep.get("systems", []), sweep.get("traces", [])),
                   "TTFT versus offered load (Fig. 6's data)."),
    "per_task": (per_task_table(tasks, base), "Per task of each run: TTFT and quality (Fig. 4's points)."),
}
for name, (df, caption) in tables.items():
    csv_path, md_path = sm.output[f"{name}_csv"], sm.output[f"{name}_md"]
    write_csv(csv_path, df.astype(object).where(df.notna(), None).to_dict("records"), list(df.columns), prov)
    cols = [c for c in df.columns if c not in ("model", "budget", "trace", "taskset")]
    group = ["model", "budget", "trace", "taskset"]
    text = (f"# {name}\n\n{caption}\n\nSLOs, hardware and configuration: see REPORT.md.  "
            f"Source: {Path(sm.input.runs).as_posix()} (commit {prov.get('git_commit')}).\n\n"
            + grouped_markdown(df, cols, group))
    Path(md_path).write_text(text, encoding="utf-8")
    print(f"{name}: {len(df)} rows", file=sys.stderr)
