"""Snakemake script: Fig. 6, TTFT versus offered request rate for the rate-sweep systems of one setting: P95 (solid)
and P50 (dashed) TTFT at each load, with the TTFT SLO as a horizontal line."""

import sys

import matplotlib.pyplot as plt

from artifact.frames import read_frame, read_provenance
from artifact.plotting import marks, ordered, palette, save, setup

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
setup()
w = sm.wildcards
runs = read_frame(sm.input.runs)
sweep = sm.config["rate_sweep"]
df = runs[(runs.model == w.model) & (runs.budget == w.budget) & (runs.trace == w.trace) &
          (runs.taskset == w.taskset) & runs.system.isin(sweep["systems"])].sort_values("offered_rps")
if df.empty:
    raise ValueError(f"no rate-sweep runs for {w.model}/{w.budget}/{w.trace}/{w.taskset}")
systems = ordered(df.system.unique())
colors = palette(systems)
fig, ax = plt.subplots(figsize=(7, 4.5))
for s in systems:
    sub = df[df.system == s]
    ax.plot(sub.offered_rps, sub.ttft_p95_s, marker="o", color=colors[s], linewidth=2, label=f"{s} P95")
    ax.plot(sub.offered_rps, sub.ttft_p50_s, marker=".", color=colors[s], linewidth=1, linestyle="--",
            label=f"{s} P50")
slo = float(df.slo_ttft_s.iloc[0])
ax.axhline(slo, color="black", linestyle=":", linewidth=1, label=f"TTFT SLO ({slo:.2f} s)")
ax.set_yscale("log")
ax.set_xlabel("offered request rate (requests/s)")
ax.set_ylabel("TTFT (s, log scale)")
ax.legend(fontsize=8, loc="upper left")
fig.suptitle(f"TTFT vs request rate\n{w.model}, budget {w.budget}, {w.trace}, tasks {w.taskset}"
             f"{marks(bool(df.synthetic_weights.any()), bool(df.synthetic_trace.any()))}", fontsize=11)
fig.tight_layout()
save(fig, sm.output[0], read_provenance(sm.input.runs))
