"""Snakemake script: Fig. 5, KV-cache capacity and use over time for every system of one setting at the base load
(top panel), and, for every system whose layer precisions change or differ from FP16, a heatmap strip of each
decoder layer's precision over time (one row per layer; FP16 / W8 / W4).  From each run's per-step timeline.csv;
between steps the state is held (step function)."""

import sys

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from artifact.frames import read_frame, read_provenance
from artifact.plotting import PRECISION_CODES, PRECISION_COLORS, marks, ordered, palette, save, setup

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stderr = open(sm.log[0], "w", buffering=1)
setup()
w = sm.wildcards
timelines = {s: read_frame(p) for s, p in zip(sm.params.systems, sm.input.timelines)}
runs = read_frame(sm.input.runs)
meta = runs[(runs.model == w.model) & (runs.budget == w.budget) & (runs.trace == w.trace) &
            (runs.taskset == w.taskset) & (runs.load == sm.params.load)]
systems = ordered(timelines)
colors = palette(systems)


def precision_matrix(tl):
    codes = [[PRECISION_CODES[p] for p in str(row).split(",")] for row in tl.precisions]
    return np.array(codes, dtype=float).T  # [layers, steps]


strips = [s for s in systems if not timelines[s].empty and
          (precision_matrix(timelines[s]) != 0).any()]
heights = [3.6] + [0.9] * len(strips)
# constrained layout keeps the panels their height with the legends outside on the right (tight_layout squeezed
# the panels to slivers once nine systems' legend entries were there)
fig, axes = plt.subplots(1 + len(strips), 1, figsize=(12, sum(heights) + 1.4), sharex=True, layout="constrained",
                         gridspec_kw={"height_ratios": heights}, squeeze=False)
ax = axes[0][0]
t_end = max((tl.t_s.max() + tl.duration_s.iloc[-1]) for tl in timelines.values() if not tl.empty)
for s in systems:
    tl = timelines[s]
    if tl.empty:
        continue
    t = np.append(tl.t_s.to_numpy(), tl.t_s.iloc[-1] + tl.duration_s.iloc[-1])
    ax.step(t, np.append(tl.kv_total_blocks, tl.kv_total_blocks.iloc[-1]), where="post", color=colors[s],
            linewidth=2)
    ax.step(t, np.append(tl.kv_used_blocks, tl.kv_used_blocks.iloc[-1]), where="post", color=colors[s],
            linewidth=1.2, linestyle="--")
ax.set_ylabel("KV cache\n(blocks of 16 tokens)")
ax.set_ylim(bottom=0)
handles = [Line2D([], [], color=colors[s], linewidth=2, label=s) for s in systems if not timelines[s].empty]
handles += [Line2D([], [], color="0.3", linewidth=2, label="capacity"),
            Line2D([], [], color="0.3", linewidth=1.2, linestyle="--", label="used")]
ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="system",
          title_fontsize=9)
cmap = ListedColormap(PRECISION_COLORS)
norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5], cmap.N)
for k, s in enumerate(strips, start=1):
    tl = timelines[s]
    m = precision_matrix(tl)
    edges = np.append(tl.t_s.to_numpy(), tl.t_s.iloc[-1] + tl.duration_s.iloc[-1])
    axk = axes[k][0]
    axk.pcolormesh(edges, np.arange(m.shape[0] + 1), m, cmap=cmap, norm=norm, shading="flat")
    axk.set_ylabel(s, fontsize=8, rotation=0, ha="right", va="center")
    axk.set_ylim(m.shape[0], 0)
    axk.set_yticks([0.5, m.shape[0] - 0.5], ["layer 0", f"layer {m.shape[0] - 1}"], fontsize=7)
    axk.grid(False)
axes[-1][0].set_xlabel("time since the replay started (s)")
axes[-1][0].set_xlim(0, t_end)
if strips:
    axes[1][0].legend(handles=[Patch(color=c, label=p.upper()) for p, c in zip(PRECISION_CODES, PRECISION_COLORS)],
                      loc="upper left", bbox_to_anchor=(1.01, 1.0), title="layer precision", fontsize=8,
                      title_fontsize=9)
syn_w = bool(meta.synthetic_weights.any())
syn_t = bool(meta.synthetic_trace.any())
fig.suptitle(f"KV capacity and use over time, with layer precisions\n{w.model}, budget {w.budget}, {w.trace}, "
             f"tasks {w.taskset}, load {sm.params.load}x FP16 capacity{marks(syn_w, syn_t)}", fontsize=11)
save(fig, sm.output[0], read_provenance(sm.input.runs))
