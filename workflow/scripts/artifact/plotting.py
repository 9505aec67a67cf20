"""Shared figure style: one colour per system across every figure, readable sizes, PNG output with provenance.

Figures are drawn with seaborn on matplotlib's Agg backend (no display needed).  A run with synthetic weights or a
synthetic trace is marked in the figure's title by :func:`marks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

SYSTEM_ORDER = ("fp16", "w4", "selective-8", "selective-16", "morphserve-accuracy", "morphserve-default",
                "morphserve-performance")
PRECISION_CODES = {"fp16": 0, "w8": 1, "w4": 2}
PRECISION_COLORS = ("#4c72b0", "#f2b134", "#c44e52")  # FP16, W8, W4


def setup() -> None:
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)


def palette(systems: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per system: the known systems always get the same colour, others follow."""
    known = [s for s in SYSTEM_ORDER]
    extra = [s for s in systems if s not in known]
    colors = sns.color_palette("tab10", len(known) + len(extra))
    return {s: colors[i] for i, s in enumerate(known + extra)}


def ordered(systems: Sequence[str]) -> list[str]:
    rank = {s: i for i, s in enumerate(SYSTEM_ORDER)}
    return sorted(set(systems), key=lambda s: (rank.get(s, len(rank)), s))


def marks(synthetic_weights: bool, synthetic_trace: bool) -> str:
    parts = []
    if synthetic_weights:
        parts.append("SYNTHETIC WEIGHTS")
    if synthetic_trace:
        parts.append("synthetic BurstGPT-shaped trace")
    return f" [{'; '.join(parts)}]" if parts else ""


def save(fig, path: str | Path, provenance: dict[str, Any]) -> None:
    """Write ``fig`` as PNG, with the commit and device in the PNG's text metadata."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {"Software": f"morphserve {provenance.get('git_commit', 'unknown')}",
            "Comment": f"device: {provenance.get('device')}; created {provenance.get('created')}"}
    fig.savefig(path, dpi=130, bbox_inches="tight", metadata=meta)
    plt.close(fig)
