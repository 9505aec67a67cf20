"""Snakemake script: Fig. 4, P95 TTFT versus task quality per (trace, task) for one (model, budget): one point per
system, from the per-task rows of the base-load runs (P95 over that task's requests).  Without quality (synthetic
weights) the panels show P95 TTFT per system only, and the title says why."""

import sys

import matplotlib.pyplot as plt
import numpy as np

from artifact.frames import read_frame, read_provenance
from artifact.grid import base_load
from artifact.plotting import marks, ordered, palette, save, setup

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
setup()
w = sm.wildcards
tasks = read_frame(sm.input.tasks)
runs = read_frame(sm.input.runs)
base = base_load(sm.config)
sel = (tasks.model == w.model) & (tasks.budget == w.budget) & (tasks.load == base)
df = tasks[sel]
meta = runs[(runs.model == w.model) & (runs.budget == w.budget) & (runs.load == base)]
if df.empty:
    raise ValueError(f"no base-load runs for model {w.model!r}, budget {w.budget!r}")
traces = sorted(df.trace.unique())
task_names = sorted(df.task.unique())
systems = ordered(df.system.unique())
colors = palette(systems)
has_quality = df.quality.notna().any()
fig, axes = plt.subplots(len(traces), len(task_names), figsize=(3.6 * len(task_names), 3.2 * len(traces)),
                         squeeze=False, sharex=False)
for i, trace in enumerate(traces):
    synthetic_trace = bool(meta[meta.trace == trace].synthetic_trace.any())
    for j, task in enumerate(task_names):
        ax = axes[i][j]
        sub = df[(df.trace == trace) & (df.task == task)]
        n = int(sub.requests.median()) if not sub.empty else 0
        if has_quality:
            for s in systems:
                row = sub[sub.system == s]
                ax.scatter(row.ttft_p95_s, row.quality, color=colors[s], s=60, label=s, edgecolor="black",
                           linewidth=0.5)
            metric = sub.quality_metric.dropna().iloc[0] if sub.quality_metric.notna().any() else "quality"
            ax.set_ylabel(f"{metric.split(' (')[0]} (%)")
        else:
            vals = [sub[sub.system == s].ttft_p95_s.mean() for s in systems]
            ax.barh(np.arange(len(systems)), vals, color=[colors[s] for s in systems])
            ax.set_yticks(np.arange(len(systems)), systems)
            ax.set_ylabel("")
        ax.set_xlabel("P95 TTFT (s)")
        ax.set_title(f"{trace}{' (synthetic)' if synthetic_trace else ''} / {task}\n(n = {n} requests per system)",
                     fontsize=9)
if has_quality:
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(systems), 4), bbox_to_anchor=(0.5, -0.02 - 0.03 *
               ((len(systems) - 1) // 4)), title="system")
synthetic_weights = bool(meta.synthetic_weights.any())
note = "" if has_quality else " - quality not measured (synthetic weights)"
fig.suptitle(f"P95 TTFT vs quality, {w.model}, budget {w.budget}, load {base}x FP16 capacity"
             f"{marks(synthetic_weights, False)}{note}\n(better: up and to the left)", fontsize=11)
fig.tight_layout(rect=(0, 0.06 if has_quality else 0, 1, 1))
save(fig, sm.output[0], read_provenance(sm.input.runs))
