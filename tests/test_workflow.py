"""The reproducibility workflow: its DAG for both profiles (a dry run), the grid and config validation, and the
claim rules and tables that REPORT.md is built from."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

from artifact import claims as C  # noqa: E402
from artifact import grid  # noqa: E402
from artifact.tables import fmt, systems_table, table5, to_markdown, with_fp16_quality  # noqa: E402

SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def _config(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())


def _dry_run(*args: str) -> dict[str, int]:
    """Job counts of a forced dry run (every job of the DAG, whatever exists already)."""
    proc = subprocess.run([str(SNAKEMAKE), "-n", "--forceall", "--nolock", "--quiet", "rules", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, re.M))
    return {k: int(v) for k, v in counts.items()}


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed in this environment")
def test_default_dag_runs_every_system_on_every_trace_plus_the_rate_sweep():
    cfg = _config("config.yaml")
    counts = _dry_run()
    systems, traces = len(cfg["systems"]), len(cfg["traces"])
    sweep = len(cfg["rate_sweep"]["systems"]) * len(cfg["rate_sweep"]["load_factors"])
    assert counts["run"] == systems * traces + sweep == counts["score"]
    assert counts["calibrate"] == counts["importance"] == counts["tables"] == counts["report"] == 1
    assert counts["fig_kv_timeline"] == counts["fig_tpot_cdf"] == traces
    assert counts["fig_ttft_vs_rate"] == 1 and counts["fig_ttft_quality"] == 1


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed in this environment")
def test_paper_dag_dry_runs():
    cfg = _config("paper.yaml")
    counts = _dry_run("--configfile", "config/paper.yaml")
    settings = len(grid.settings(cfg))
    assert settings == 4 * 2 * 4  # four models (one budget each), two traces, four tasks
    sweep = len(grid.sweep_runs(cfg)) - len(set(grid.sweep_runs(cfg)) & set(grid.main_runs(cfg)))
    assert counts["run"] == settings * len(cfg["systems"]) + sweep
    assert counts["calibrate"] == counts["importance"] == 4
    assert "generate" not in counts  # the foundation's checks belong to the default profile


def test_grid_paths_and_loads():
    cfg = _config("config.yaml")
    assert grid.load_label(1.3) == "1.3" and grid.load_label(2.0) == "2"
    assert grid.sweep_loads(cfg) == ["0.6", "1.3", "2"]
    runs = grid.all_runs(cfg)
    assert len(runs) == len(set(runs))
    key = runs[0]
    assert key.run_dir("results/x").startswith(f"results/x/runs/{key.model}/{key.budget}/{key.trace}/")
    assert key.workload("r").endswith(f"load{key.load}.jsonl")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["systems"].append("fp8"), "'fp8' is neither a morphserve system"),
    (lambda c: c["systems"].remove("fp16"), "must include 'fp16'"),
    (lambda c: c["models"].__setitem__("smol_lm", {"budgets": ["cpu-small"]}), "model name 'smol_lm'"),
    (lambda c: c["models"]["smollm2-135m"].__setitem__("budgets", ["h100"]), "names 'h100'"),
    (lambda c: c["task_sets"].__setitem__("mix", ["trec"]), "task_sets.mix"),
    (lambda c: c["rate_sweep"].__setitem__("systems", ["w8"]), "rate_sweep.systems names 'w8'"),
    (lambda c: c["calibration"].__setitem__("load_factor", 0), "positive number, got 0"),
    (lambda c: c["budgets"]["cpu-small"].__setitem__("memory_budget_bytes", -1), "memory_budget_bytes"),
    (lambda c: c["system_plugins"].__setitem__("llm-pq", "no colon"), "system_plugins.llm-pq"),
])
def test_validate_names_the_bad_value(edit, message):
    cfg = copy.deepcopy(_config("config.yaml"))
    edit(cfg)
    with pytest.raises(grid.ConfigError, match=re.escape(message)):
        grid.validate(cfg)


def test_plugin_systems_are_accepted():
    cfg = copy.deepcopy(_config("config.yaml"))
    assert cfg["system_plugins"]["llm-pq"] == "baselines.llm_pq:attach" and "llm-pq" in cfg["systems"]
    cfg["system_plugins"]["llm-pq-s4-p256-o32"] = "baselines.llm_pq:attach"
    cfg["systems"].append("llm-pq-s4-p256-o32")
    grid.validate(cfg)
    assert {"llm-pq", "llm-pq-s4-p256-o32"} <= {r.system for r in grid.main_runs(cfg)}


# ---- claims and tables ---------------------------------------------------------------------------------------

def _runs(rows: list[dict]) -> pd.DataFrame:
    base = dict(model="m", budget="b", trace="t", taskset="mix", load="1.3", synthetic_weights=False,
                synthetic_trace=False, fp16_kv_blocks=100, max_kv_blocks=100, queueing_mean_s=1.0,
                tpot_p99_s=0.1, goodput_rps=1.0, offered_rps=1.0, ttft_p50_s=1.0, ttft_p99_s=1.0, tpot_p50_s=0.1,
                tpot_p95_s=0.1, any_violation_rate=0.0, throughput_tok_s=1.0, throughput_rps=1.0,
                start_kv_blocks=100, ok=10, requests=10, fell_behind=False)
    return pd.DataFrame([{**base, **r} for r in rows])


CFG = {"systems": ["fp16", "w4", "morphserve-default", "morphserve-performance"],
       "morphserve_headline_mode": "morphserve-default", "budgets": {"b": {"emulates_paper_gpu": False}}}


def test_claim_rules():
    assert C.decide("mean_at_least", 92.45, [80.0, 70.0], 0.25, [])[0] == C.YES  # mean 75 >= 69.3
    assert C.decide("mean_at_least", 92.45, [60.0, 70.0], 0.25, [])[0] == C.NO
    assert C.decide("min_at_least", [2.2, 3.9], [1.7, 9.0], 0.25, [])[0] == C.YES  # 1.7 >= 1.65
    assert C.decide("min_at_least", [2.2, 3.9], [1.6, 9.0], 0.25, [])[0] == C.NO
    assert C.decide("max_at_most", [0.51, 3.82], [1.0, 4.7], 0.25, [])[0] == C.YES  # 4.7 <= 4.775
    assert C.decide("within_range", [2.34, 9.47], [1.0], 0.25, [])[0] == C.NO
    verdict, why = C.decide("each_within", None, [1013.0], 0.10, [958.0])
    assert verdict == C.YES and "5.7%" in why
    with pytest.raises(ValueError, match="unknown claim rule"):
        C.decide("roughly", 1.0, [1.0], 0.1, [])


def test_claims_from_runs():
    runs = _runs([
        dict(system="fp16", ttft_violation_rate=0.5, ttft_p95_s=8.0, quality=20.0, max_kv_blocks=100),
        dict(system="w4", ttft_violation_rate=0.0, ttft_p95_s=2.0, quality=18.0, max_kv_blocks=400),
        dict(system="morphserve-default", ttft_violation_rate=0.1, ttft_p95_s=3.0, quality=19.9, max_kv_blocks=150),
        dict(system="morphserve-performance", ttft_violation_rate=0.0, ttft_p95_s=2.0, quality=19.5,
             max_kv_blocks=300),
    ])
    claims = yaml.safe_load((ROOT / "config" / "claims.yaml").read_text())
    got = {v.id: v for v in C.evaluate(runs, CFG, claims, "1.3")}
    assert got["slo_violations"].values == [("m/b/t/mix morphserve-default", pytest.approx(80.0))]
    assert got["slo_violations"].verdict == C.YES
    assert got["ttft_performance"].values[0][1] == pytest.approx(4.0) and got["ttft_performance"].verdict == C.YES
    assert got["quality_w4"].values[0][1] == pytest.approx(10.0)
    assert got["quality_w4"].verdict == C.YES  # a 10% loss is inside [2.34 x 0.75, 9.47 x 1.25]
    assert got["quality_performance"].values[0][1] == pytest.approx(2.5)
    assert got["kv_capacity"].verdict == C.NOT_COMPARABLE and "not the paper's quantity" in got["kv_capacity"].reason
    assert got["vs_llmpq"].verdict == C.NOT_COMPARABLE and "llm-pq baseline was not run" in got["vs_llmpq"].reason
    assert got["throughput"].verdict == C.NOT_COMPARABLE  # no rate sweep in these rows
    assert got["ttft_accuracy"].verdict == C.NOT_COMPARABLE  # accuracy mode not run
    assert got["fp16_kv_blocks"].verdict == C.NOT_COMPARABLE


def test_claims_against_baseline_variants():
    """A claim's baseline is the system of that name or any named variant of it, each compared on its own; a
    system that merely shares a prefix without the dash is not a variant."""
    runs = _runs([
        dict(system="fp16", ttft_violation_rate=0.5, ttft_p95_s=8.0, quality=20.0),
        dict(system="morphserve-default", ttft_violation_rate=0.1, ttft_p95_s=3.0, quality=19.0),
        dict(system="pyramidkv-64", ttft_violation_rate=0.3, ttft_p95_s=6.0, quality=16.0),
        dict(system="pyramidkvx", ttft_violation_rate=0.3, ttft_p95_s=9.0, quality=10.0),
        dict(system="llm-pq", ttft_violation_rate=0.3, ttft_p95_s=6.0, quality=18.0),
    ])
    cfg = {**CFG, "systems": ["fp16", "morphserve-default", "pyramidkv-64", "pyramidkvx", "llm-pq"]}
    claims = yaml.safe_load((ROOT / "config" / "claims.yaml").read_text())
    got = {v.id: v for v in C.evaluate(runs, cfg, claims, "1.3")}
    assert got["vs_pyramidkv"].values == [("m/b/t/mix morphserve-default vs pyramidkv-64", pytest.approx(2.0))]
    assert got["vs_llmpq"].values == [("m/b/t/mix morphserve-default vs llm-pq", pytest.approx(50.0))]


def test_claims_need_pressure_and_real_weights():
    runs = _runs([dict(system="fp16", ttft_violation_rate=0.0, ttft_p95_s=1.0, quality=None),
                  dict(system="morphserve-default", ttft_violation_rate=0.0, ttft_p95_s=1.0, quality=None)])
    runs["synthetic_weights"] = True
    claims = yaml.safe_load((ROOT / "config" / "claims.yaml").read_text())
    got = {v.id: v for v in C.evaluate(runs, CFG, claims, "1.3")}
    assert got["slo_violations"].verdict == C.NOT_COMPARABLE and "not under pressure" in got["slo_violations"].reason
    assert got["quality_performance"].reason.startswith("every run has synthetic weights")
    assert got["ttft_performance"].verdict == C.NOT_COMPARABLE and "under pressure" in got["ttft_performance"].reason


def test_quality_change_and_tables():
    runs = _runs([
        dict(system="fp16", ttft_violation_rate=0.5, ttft_p95_s=8.0, quality=20.0),
        dict(system="w4", ttft_violation_rate=0.0, ttft_p95_s=2.0, quality=18.0),
        dict(system="selective-8", ttft_violation_rate=0.2, ttft_p95_s=4.0, quality=None),
    ])
    q = with_fp16_quality(runs).set_index("system")
    assert q.loc["w4", "quality_delta"] == pytest.approx(-2.0)
    assert q.loc["w4", "quality_change_pct"] == pytest.approx(-10.0)
    assert pd.isna(q.loc["selective-8", "quality_delta"])
    st = systems_table(runs, "1.3", ["fp16", "w4", "selective-8"])
    assert list(st.system) == ["fp16", "w4", "selective-8"]
    assert st.ttft_slo_violations_pct.tolist() == pytest.approx([50.0, 0.0, 20.0])
    t5 = table5(runs, "1.3", "morphserve-default")
    assert list(t5.system) == ["w4", "selective-8", "fp16"]  # Table 5's row order, missing rows left out
    md = to_markdown(st, ["system", "ttft_p95_s", "quality_delta"])
    assert md.splitlines()[0] == "| system | TTFT P95 (s) | Δ quality vs FP16 (pts) |"
    assert "| selective-8 | 4.00 | n/a |" in md
    assert [fmt(x) for x in (None, 0.0, 0.01234, 5.678, 1234.5, 7, True)] == \
        ["n/a", "0", "0.0123", "5.68", "1234", "7", "yes"]


def test_claims_need_enough_requests():
    runs = _runs([dict(system="fp16", ttft_violation_rate=0.5, ttft_p95_s=8.0, quality=20.0, ok=3),
                  dict(system="morphserve-default", ttft_violation_rate=0.0, ttft_p95_s=1.0, quality=20.0, ok=3)])
    claims = yaml.safe_load((ROOT / "config" / "claims.yaml").read_text())
    got = {v.id: v for v in C.evaluate(runs, CFG, claims, "1.3")}
    assert got["slo_violations"].verdict == C.NOT_COMPARABLE
    assert got["slo_violations"].reason.startswith("no run has 10 finished requests (these have 3 to 3)")
    assert "finished requests" not in got["kv_capacity"].reason  # memory accounting needs no samples
