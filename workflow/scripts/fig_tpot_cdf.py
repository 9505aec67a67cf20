"""Snakemake script: Fig. 7, the CDF of TPOT (mean time per output token after the first, per request) for every
system of one setting at the base load, from each run's requests.csv (finished requests only)."""

import sys

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from artifact.frames import read_frame, read_provenance
from artifact.plotting import marks, ordered, palette, save, setup

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
setup()
w = sm.wildcards
frames = []
for s, path in zip(sm.params.systems, sm.input.requests):
    r = read_frame(path)
    r = r[(r.status == "ok") & r.tpot_s.notna()]
    frames.append(pd.DataFrame({"system": s, "tpot_ms": 1e3 * r.tpot_s}))
df = pd.concat(frames, ignore_index=True)
runs = read_frame(sm.input.runs)
meta = runs[(runs.model == w.model) & (runs.budget == w.budget) & (runs.trace == w.trace) &
            (runs.taskset == w.taskset) & (runs.load == sm.params.load)]
systems = ordered(df.system.unique())
fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
sns.ecdfplot(data=df, x="tpot_ms", hue="system", hue_order=systems, palette=palette(systems), ax=ax, linewidth=2)
slo = float(meta.slo_tpot_s.iloc[0]) * 1e3
ax.axvline(slo, color="black", linestyle=":", linewidth=1)
ax.text(slo, 0.02, f" TPOT SLO {slo:.0f} ms", fontsize=8)
ax.set_xscale("log")
ax.set_xlabel("TPOT per request (ms per output token, log scale)")
ax.set_ylabel("fraction of requests")
sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title_fontsize=9)  # off the curves
n = df.groupby("system").size()
fig.suptitle(f"TPOT CDF, {w.model}, budget {w.budget}, {w.trace}, tasks {w.taskset}, load {sm.params.load}x\n"
             f"({int(n.min())}-{int(n.max())} requests per system)"
             f"{marks(bool(meta.synthetic_weights.any()), bool(meta.synthetic_trace.any()))}", fontsize=11)
save(fig, sm.output[0], read_provenance(sm.input.runs))
