"""Snakemake script: one row per run and one row per (run, task), from every run's files (artifact/summary.py),
written as CSV with provenance.  Everything downstream (tables, Fig. 4 and 6, the report) reads these."""

import sys

from artifact.grid import RunKey
from artifact.summary import run_row, task_rows
from morphserve.harness.records import write_csv
from morphserve.provenance import provenance

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
keys = [RunKey(*k) for k in sm.params.runs]
rows, tasks = [], []
for key, run_dir, summary in zip(keys, sm.params.run_dirs, sm.params.workload_summaries):
    rows.append(run_row(key, run_dir, summary))
    tasks.extend(task_rows(key, run_dir))
prov = provenance({"profile": sm.config["profile"], "runs": len(rows)})
write_csv(sm.output.runs, rows, list(rows[0]), prov)
write_csv(sm.output.tasks, tasks, list(tasks[0]), prov)
print(f"{len(rows)} runs, {len(tasks)} task rows", file=sys.stderr)
