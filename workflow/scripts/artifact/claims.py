"""The paper's headline claims against this run's measurements (config/claims.yaml says which claims and rules).

For every claim a *metric* (the functions in :data:`METRICS`) computes one value per setting (or per setting and
system) from the run rows of :mod:`artifact.summary`, always comparing systems of the same setting at the base load
(the rate-sweep metric uses every load).  The claim's *rule* then decides ``yes`` or ``no`` with a stated reason;
a claim is ``not comparable`` when the run lacks what it needs, again with the reason.  Nothing is typed in: the
paper's numbers come from the claims file, the measured ones from the rows.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

SETTING = ["model", "budget", "trace", "taskset"]
YES, NO, NOT_COMPARABLE = "yes", "no", "not comparable"


@dataclass
class Measured:
    """Values of one claim's metric: ``(label, value)`` per setting (and system), or why there are none."""

    values: list[tuple[str, float]] = field(default_factory=list)
    reason: str | None = None  # set when the claim is not comparable
    expected: list[float] = field(default_factory=list)  # each_within: the paper's value for each entry


@dataclass
class Verdict:
    id: str
    text: str
    paper: str
    measured: str
    verdict: str
    reason: str
    values: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "values": [list(v) for v in self.values]}


class Context:
    """What the metrics see: the run rows, the base load, the configured systems and budgets."""

    def __init__(self, runs: pd.DataFrame, config: dict[str, Any], base_load: str):
        self.runs = runs
        self.config = config
        self.base_load = base_load
        self.base = runs[runs.load == base_load]

    def systems(self, spec: list[str]) -> list[str]:
        out: list[str] = []
        for s in spec:
            if s == "headline":
                out.append(self.config["morphserve_headline_mode"])
            elif s == "morphserve":
                out.extend(x for x in self.config["systems"] if x.startswith("morphserve-"))
            else:
                out.append(s)
        return [s for s in dict.fromkeys(out)]

    def baselines(self, name: str) -> list[str]:
        """The runs of a claim's baseline: the system called ``name`` and its named variants (``name-...``, e.g.
        ``pyramidkv-64`` for a smaller KV budget), each compared on its own."""
        present = set(self.base.system)
        return [s for s in self.config["systems"] if s in present and (s == name or s.startswith(name + "-"))]

    def pairs(self, systems: list[str], other: str = "fp16"):
        """(label, row of system, row of ``other``) for each setting at the base load where both ran."""
        for keys, sub in self.base.groupby(SETTING, sort=True):
            ref = sub[sub.system == other]
            if ref.empty:
                continue
            for s in systems:
                row = sub[sub.system == s]
                if not row.empty:
                    yield f"{'/'.join(keys)} {s}", row.iloc[0], ref.iloc[0]


def _ok(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def slo_violation_reduction(ctx: Context, claim: dict) -> Measured:
    m = Measured()
    pressured = 0
    for label, row, fp16 in ctx.pairs(ctx.systems(claim["systems"])):
        if fp16.ttft_violation_rate > 0:
            pressured += 1
            m.values.append((label, 100.0 * (1.0 - row.ttft_violation_rate / fp16.ttft_violation_rate)))
    if not pressured:
        m.reason = "FP16 violated the TTFT SLO in no setting (it was not under pressure), so there is nothing to reduce"
    return m


def _ratio(ctx: Context, claim: dict, column: str, invert: bool = False, other: str = "fp16") -> Measured:
    m = Measured()
    for label, row, ref in ctx.pairs(ctx.systems(claim["systems"]), other):
        a, b = ref[column], row[column]
        if _ok(a) and _ok(b) and b > 0:
            m.values.append((label, a / b))
    if not m.values:
        m.reason = f"no setting has both {other} and {', '.join(ctx.systems(claim['systems']))} with {column}"
    return m


def ttft_p95_speedup(ctx: Context, claim: dict) -> Measured:
    return _ratio(ctx, claim, "ttft_p95_s")


def tpot_p99_speedup(ctx: Context, claim: dict) -> Measured:
    return _ratio(ctx, claim, "tpot_p99_s")


def queueing_reduction(ctx: Context, claim: dict) -> Measured:
    return _ratio(ctx, claim, "queueing_mean_s")


def quality_loss(ctx: Context, claim: dict) -> Measured:
    m = Measured()
    for label, row, fp16 in ctx.pairs(ctx.systems(claim["systems"])):
        if _ok(row.quality) and _ok(fp16.quality) and fp16.quality > 0:
            m.values.append((label, 100.0 * (fp16.quality - row.quality) / fp16.quality))
    if not m.values:
        m.reason = "no setting has measured quality for both FP16 and the system"
    return m


def kv_capacity_gain(ctx: Context, claim: dict) -> Measured:
    m = Measured()
    for label, row, _ in ctx.pairs(ctx.systems(claim["systems"])):
        m.values.append((label, 100.0 * (row.max_kv_blocks / row.fp16_kv_blocks - 1.0)))
    return m


def sustained_goodput_ratio(ctx: Context, claim: dict) -> Measured:
    m = Measured()
    runs = ctx.runs
    for keys, sub in runs.groupby(SETTING, sort=True):
        fp16 = sub[sub.system == "fp16"]
        if fp16.load.nunique() < 2:
            continue
        for s in ctx.systems(claim["systems"]):
            mine = sub[sub.system == s]
            if mine.load.nunique() < 2:
                continue
            best_fp16, best = fp16.goodput_rps.max(), mine.goodput_rps.max()
            if _ok(best_fp16) and best_fp16 > 0:
                m.values.append((f"{'/'.join(keys)} {s}", best / best_fp16))
    if not m.values:
        m.reason = "no setting was run at several loads for both FP16 and a MorphServe mode (rate_sweep)"
    return m


def _not_run(base: str) -> Measured:
    return Measured(reason=f"the {base} baseline was not run (add it, or a variant {base}-..., to `systems` through "
                           f"`system_plugins`; baselines/, issue #8)")


def degradation_vs(ctx: Context, claim: dict) -> Measured:
    bases = ctx.baselines(claim["baseline"])
    if not bases:
        return _not_run(claim["baseline"])
    m = Measured()
    for base in bases:
        for label, row, fp16 in ctx.pairs(ctx.systems(claim["systems"])):
            same = (ctx.base.model == row.model) & (ctx.base.budget == row.budget) & (ctx.base.trace == row.trace) \
                & (ctx.base.taskset == row.taskset)
            other = ctx.base[same & (ctx.base.system == base)]
            if other.empty or not all(_ok(x) for x in (row.quality, fp16.quality, other.iloc[0].quality)):
                continue
            loss_sys, loss_base = fp16.quality - row.quality, fp16.quality - other.iloc[0].quality
            if loss_base > 0:
                m.values.append((f"{label} vs {base}", 100.0 * (1.0 - loss_sys / loss_base)))
    if not m.values:
        m.reason = f"no setting has measured quality for FP16, {', '.join(bases)} (with a loss) and MorphServe"
    return m


def ttft_p95_vs(ctx: Context, claim: dict) -> Measured:
    bases = ctx.baselines(claim["baseline"])
    if not bases:
        return _not_run(claim["baseline"])
    m = Measured()
    for base in bases:
        one = _ratio(ctx, claim, "ttft_p95_s", other=base)
        m.values.extend((f"{label} vs {base}", v) for label, v in one.values)
    if not m.values:
        m.reason = f"no setting has both {', '.join(bases)} and MorphServe with ttft_p95_s"
    return m


def fp16_kv_blocks(ctx: Context, claim: dict) -> Measured:
    m = Measured()
    fp16 = ctx.base[ctx.base.system == "fp16"].drop_duplicates(["model", "budget"])
    for _, row in fp16.iterrows():
        if row.model in claim["paper"]:
            m.values.append((f"{row.model}/{row.budget}", float(row.fp16_kv_blocks)))
            m.expected.append(float(claim["paper"][row.model]))
    if not m.values:
        m.reason = f"none of the paper's models ({', '.join(claim['paper'])}) was run"
    return m


METRICS: dict[str, Callable[[Context, dict], Measured]] = {f.__name__: f for f in (
    slo_violation_reduction, ttft_p95_speedup, tpot_p99_speedup, queueing_reduction, quality_loss,
    kv_capacity_gain, sustained_goodput_ratio, degradation_vs, ttft_p95_vs, fp16_kv_blocks)}


def _paper_text(paper: Any) -> str:
    if isinstance(paper, list):
        return f"{paper[0]:g} to {paper[1]:g}"
    if isinstance(paper, dict):
        return ", ".join(f"{k} {v:g}" for k, v in paper.items())
    return f"{paper:g}"


def _summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"mean {statistics.fmean(values):.3g}, range {min(values):.3g} to {max(values):.3g} ({len(values)} values)"


def decide(rule: str, paper: Any, values: list[float], tol: float, expected: list[float]) -> tuple[str, str]:
    """(verdict, reason) of ``rule`` on ``values`` (see config/claims.yaml for the rules)."""
    low, high = (paper[0], paper[1]) if isinstance(paper, list) else (paper, paper)
    if rule == "mean_at_least":
        v, bound = statistics.fmean(values), low * (1 - tol)
        return (YES if v >= bound else NO), f"mean {v:.3g} {'>=' if v >= bound else '<'} {bound:.3g} (= {low:g} x {1 - tol:g})"
    if rule == "min_at_least":
        v, bound = min(values), low * (1 - tol)
        return (YES if v >= bound else NO), f"lowest {v:.3g} {'>=' if v >= bound else '<'} {bound:.3g} (= {low:g} x {1 - tol:g})"
    if rule == "max_at_least":
        v, bound = max(values), low * (1 - tol)
        return (YES if v >= bound else NO), f"best {v:.3g} {'>=' if v >= bound else '<'} {bound:.3g} (= {low:g} x {1 - tol:g})"
    if rule == "max_at_most":
        v, bound = max(values), high * (1 + tol)
        return (YES if v <= bound else NO), f"worst {v:.3g} {'<=' if v <= bound else '>'} {bound:.3g} (= {high:g} x {1 + tol:g})"
    if rule == "within_range":
        lo, hi = low * (1 - tol), high * (1 + tol)
        inside = all(lo <= v <= hi for v in values)
        return (YES if inside else NO), (f"{'all' if inside else 'not all'} of {min(values):.3g} to {max(values):.3g} "
                                         f"in [{lo:.3g}, {hi:.3g}]")
    if rule == "each_within":
        errs = [abs(v / e - 1) for v, e in zip(values, expected)]
        ok = all(err <= tol for err in errs)
        return (YES if ok else NO), f"largest deviation {max(errs):.1%} {'<=' if ok else '>'} {tol:.0%}"
    raise ValueError(f"unknown claim rule {rule!r}")


def pressured(runs: pd.DataFrame, base_load: str) -> pd.DataFrame:
    """The rows of the settings where FP16, at the base load, violated the TTFT SLO for at least one request."""
    fp16 = runs[(runs.system == "fp16") & (runs.load == base_load) & (runs.ttft_violation_rate > 0)]
    keys = set(map(tuple, fp16[SETTING].itertuples(index=False)))
    return runs[[tuple(k) in keys for k in runs[SETTING].itertuples(index=False)]]


def evaluate(runs: pd.DataFrame, config: dict[str, Any], claims: dict[str, Any], base_load: str) -> list[Verdict]:
    out = []
    for claim in claims["claims"]:
        tol = float(claim.get("tolerance", claims.get("tolerance", 0.0)))
        if claim["metric"] not in METRICS:
            raise ValueError(f"claim {claim['id']!r}: unknown metric {claim['metric']!r}; known: {', '.join(METRICS)}")
        reason = None
        sub = runs
        min_requests = int(claims.get("min_requests", 0))
        if claim.get("needs_samples", True) and min_requests:
            sub = sub[sub.ok >= min_requests]
            if sub.empty:
                reason = (f"no run has {min_requests} finished requests (these have {int(runs.ok.min())} to "
                          f"{int(runs.ok.max())}): too few for percentiles or quality")
        if reason is None and claim.get("needs_real_weights"):
            sub = sub[~sub.synthetic_weights.astype(bool)]
            if sub.empty:
                reason = "every run has synthetic weights: quality is not measured"
        if reason is None and claim.get("needs_paper_budget"):
            paper_budgets = [b for b, v in config["budgets"].items() if v.get("emulates_paper_gpu")]
            sub = sub[sub.budget.isin(paper_budgets)]
            if sub.empty:
                reason = (f"no run used a memory budget emulating the paper's GPUs (budgets: "
                          f"{', '.join(config['budgets'])}); the CPU default's KV pool is deliberately small, so "
                          f"its relative KV numbers are not the paper's quantity")
        if reason is None and claim.get("needs_pressure"):
            sub = pressured(sub, base_load)
            if sub.empty:
                reason = ("FP16 violated the TTFT SLO in no setting (it was not under pressure); the claim is about "
                          "serving under pressure")
        measured = Measured(reason=reason) if reason else METRICS[claim["metric"]](Context(sub, config, base_load), claim)
        values = [v for _, v in measured.values]
        if measured.reason or not values:
            verdict, why, text = NOT_COMPARABLE, measured.reason or "no value could be measured", "n/a"
        else:
            verdict, why = decide(claim["rule"], claim["paper"], values, tol, measured.expected)
            text = _summary(values)
        out.append(Verdict(claim["id"], " ".join(claim["text"].split()), f"{_paper_text(claim['paper'])} "
                           f"{claim.get('unit', '')}".strip(), text, verdict, why, measured.values))
    return out
