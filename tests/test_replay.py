"""Open-loop real-time replay into a tiny engine: every request ends in one record, arrivals are kept, lag is seen."""

import dataclasses
import json
import time

import pytest

from morphserve.engine.config import EngineConfig
from morphserve.engine import heap_freeze
from morphserve.engine.engine import LLMEngine
from morphserve.engine.llm import LLM
from morphserve.engine.sampling_params import SamplingParams
from morphserve.engine.serving import ServingEngine
from morphserve.harness.records import read_csv, read_json, read_request_records
from morphserve.harness.replay import ReplayBehindWarning, replay, run_replay
from morphserve.workloads.builder import Workload, WorkloadError, WorkloadSpec, build_workload, write_workload
from morphserve.workloads.traces import Trace, TraceRequest
from test_workload_builder import examples


def tiny_workload(model, n: int = 10, gap_s: float = 0.25, prompt_tokens: int = 48, output_tokens: int = 6,
                  seed: int = 0) -> Workload:
    trace = Trace("t", [TraceRequest(gap_s * i, 100, 10) for i in range(n)], "test", synthetic=False)
    spec = WorkloadSpec(tasks=("qmsum",), prompt_tokens=prompt_tokens, output_tokens=output_tokens, seed=seed)
    return build_workload(spec, str(model), trace=trace, examples={"qmsum": examples("qmsum", 4)}, progress=False)


KV_BLOCKS = 256  # 4096 tokens: ample here; the CPU reference path's step time grows with the pool size


def engine(model, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), **{"num_kv_blocks": KV_BLOCKS, **kw}))


def test_run_replay_writes_every_file_and_keeps_the_schedule(tiny_mha, tmp_path):
    w = tiny_workload(tiny_mha)
    write_workload(w, tmp_path / "w.jsonl", {"git_commit": "test"})
    eng = engine(tiny_mha)
    t = time.monotonic()
    try:
        out = run_replay(tmp_path / "w.jsonl", tmp_path / "run", eng, progress=False)
        wall = time.monotonic() - t
        assert heap_freeze.holders() == 1  # frozen after the warm-up, held until the engine is closed
    finally:
        eng.close()
    assert heap_freeze.holders() == 0
    assert wall >= w.requests[-1].arrival_s  # real time: the last request cannot be sent before its arrival
    files = out["files"]
    assert sorted(files) == ["aggregates", "quality", "requests_csv", "requests_json", "timeline"]
    engine_summary = out["aggregates"]["engine"]
    assert engine_summary["steps"] > 0 and engine_summary["num_fp16_layers"] == {"min": 3, "max": 3}

    records, prov = read_request_records(files["requests_json"])
    assert prov["config"]["workload"]["sha256"] == w.summary["workload"]["sha256"]
    assert prov["config"]["engine"]["model"] == str(tiny_mha) and prov["git_commit"] and prov["device"]
    assert prov["config"]["heap_frozen"] is True and prov["config"]["engine"]["freeze_heap"] is True
    assert [r.request_id for r in records] == [q.request_id for q in w.requests]
    for r, q in zip(records, w.requests):
        assert r.ok and r.finish_reason == "length" and r.output_tokens == 6 == len(r.token_times_s)
        assert r.prompt_tokens == q.prompt_tokens  # the builder's count is the engine's
        assert r.scheduled_s == q.arrival_s and 0 <= r.lag_s < 0.05
        # latencies count from the scheduled arrival
        assert r.ttft_s == pytest.approx(r.first_token_s - r.scheduled_s)
        assert r.queueing_delay_s == pytest.approx(r.first_scheduled_s - r.scheduled_s) and r.queueing_delay_s >= 0
        assert r.e2e_s == pytest.approx(r.finished_s - r.scheduled_s) and r.tpot_s > 0
        assert r.first_scheduled_s >= r.submitted_s >= r.scheduled_s

    agg, _ = read_json(files["aggregates"], "aggregates")
    assert agg["requests"]["total"] == agg["requests"]["ok"] == 10 and agg["driver"]["fell_behind"] is False
    assert agg["slo"]["ttft_s"] == 2.0 and agg["throughput"]["output_tokens"] == 60
    assert agg["throughput"]["makespan_s"] >= w.requests[-1].arrival_s

    rows, _ = read_csv(files["timeline"])
    assert rows and all(row["precisions"] == "fp16,fp16,fp16" for row in rows)
    assert int(rows[0]["kv_total_blocks"]) > 0 and max(int(row["kv_used_blocks"]) for row in rows) > 0
    assert sum(int(row["num_tokens"]) for row in rows) >= 10 * (w.requests[0].prompt_tokens // 2)
    assert all(float(row["t_s"]) >= 0 for row in rows)  # warm-up steps precede t0 and are not in the timeline

    quality, _ = read_json(files["quality"], "quality")
    assert quality["headline_scheme"] == "longbench" and quality["tasks"]["qmsum"]["scored"] == 10
    assert len(quality["per_request"]) == 10


def test_replay_outputs_equal_offline_generation(tiny_mha):
    w = tiny_workload(tiny_mha, n=6, gap_s=0.1)
    offline = LLM(str(tiny_mha), num_kv_blocks=KV_BLOCKS).generate([q.prompt for q in w.requests],
                                          SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    with ServingEngine(engine(tiny_mha)) as srv:
        res = replay(w, srv, progress=False)
    assert [r.text for r in res.records] == [o.text for o in offline]


def test_rejected_requests_end_in_error_records(tiny_mha, tmp_path):
    w = tiny_workload(tiny_mha, n=8, gap_s=0.1)
    reqs = list(w.requests)
    # 40 blocks of 16 tokens: a request for 1000 output tokens can never fit; a prompt over the 1024-token context.
    # The first request is bad, so the warm-up has to skip it too.
    reqs[0] = dataclasses.replace(reqs[0], max_tokens=1000)
    reqs[5] = dataclasses.replace(reqs[5], prompt=reqs[5].prompt * 40)
    bad = Workload(reqs, w.summary)
    eng = engine(tiny_mha, num_kv_blocks=40, freeze_heap=False)
    out = run_replay(bad, tmp_path, eng, progress=False)
    assert heap_freeze.holders() == 0  # the configuration opted out
    _, prov = read_request_records(out["files"]["requests_json"])
    assert prov["config"]["heap_frozen"] is False
    records, _ = read_request_records(out["files"]["requests_json"])
    assert len(records) == 8
    errs = {r.request_id: r for r in records if not r.ok}
    assert sorted(errs) == [reqs[0].request_id, reqs[5].request_id]
    assert all(r.error_kind == "rejected" for r in errs.values())
    assert "KV blocks" in errs[reqs[0].request_id].error and "context window" in errs[reqs[5].request_id].error
    agg = out["aggregates"]
    assert agg["requests"] == {"total": 8, "ok": 6, "errors": 2, "errors_by_kind": {"rejected": 2},
                               "finish_reasons": {"length": 6}}
    assert agg["slo"]["ttft_violations"] >= 2  # an error never meets an SLO
    _, prov = read_request_records(out["files"]["requests_json"])
    assert prov["config"]["warmup_requests"] == 1
    quality, _ = read_json(out["files"]["quality"], "quality")
    assert quality["tasks"]["qmsum"]["scored"] == 6 and quality["tasks"]["qmsum"]["errors"] == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop re-raises, by design
def test_engine_failure_loses_no_request(tiny_mha):
    w = tiny_workload(tiny_mha, n=10, gap_s=0.1, output_tokens=20)
    # the last request arrives well after the 8th step, when the engine is already dead
    w = Workload(w.requests[:-1] + [dataclasses.replace(w.requests[-1], arrival_s=3.0)], w.summary)
    eng = engine(tiny_mha)
    run = eng.runner.run
    calls = {"n": 0}

    def failing(sched):
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("injected kernel failure")
        return run(sched)

    eng.runner.run = failing
    srv = ServingEngine(eng)
    srv.start()
    res = replay(w, srv, progress=False)
    kinds = [r.error_kind for r in res.records]
    assert len(res.records) == 10 and all(r is not None for r in kinds)  # nothing finished: 20 tokens take > 8 steps
    assert kinds[0] == "engine_failure" and "injected kernel failure" in res.records[0].error
    assert kinds[-1] == "not_submitted"  # arrived after the engine had died
    assert set(kinds) == {"engine_failure", "not_submitted"}


def test_open_loop_driver_never_waits_for_the_engine(tiny_mha):
    """A slow engine (each step takes 0.2 s) queues requests, but every request is still sent on time."""
    w = tiny_workload(tiny_mha, n=8, gap_s=0.05)
    eng = engine(tiny_mha)
    run = eng.runner.run

    def slow(sched):
        time.sleep(0.2)
        return run(sched)

    eng.runner.run = slow
    with ServingEngine(eng) as srv:
        res = replay(w, srv, progress=False)
    assert all(r.ok for r in res.records) and not res.fell_behind
    assert max(r.lag_s for r in res.records) < 0.05
    # every request was sent before the first answer came back, and requests waited for a step to end
    assert max(r.submitted_s for r in res.records) < min(r.finished_s for r in res.records)
    assert max(r.queueing_delay_s for r in res.records) > 0.05


def test_a_driver_that_falls_behind_says_so(tiny_mha):
    w = tiny_workload(tiny_mha, n=6, gap_s=0.02)
    with ServingEngine(engine(tiny_mha)) as srv:
        submit = srv.submit

        def slow_submit(*a, **kw):
            time.sleep(0.1)
            return submit(*a, **kw)

        srv.submit = slow_submit
        with pytest.warns(ReplayBehindWarning, match="fell behind schedule"):
            res = replay(w, srv, progress=False, lag_tolerance_s=0.05)
    assert res.fell_behind and res.records[-1].lag_s > 0.3
    assert any("fell behind" in m for m in res.warnings)


def test_workload_for_another_model_is_refused(tiny_mha, tmp_path):
    from conftest import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", "gqa")
    w = tiny_workload(tiny_mha, n=2)
    with pytest.raises(WorkloadError, match="rebuild the workload for this model"):
        run_replay(w, tmp_path / "run", engine(other), progress=False)


def harness_cli(argv: list[str]) -> int:
    """The harness subcommands on a parser of their own (morphserve.cli wires the same add_parsers)."""
    import argparse

    from morphserve.harness.cli import add_parsers

    parser = argparse.ArgumentParser(prog="morphserve")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(argv)
    return a.fn(a)


def test_cli_rejects_a_broken_workload(tiny_mha, tmp_path):
    w = tiny_workload(tiny_mha, n=3)
    path, _ = write_workload(w, tmp_path / "w.jsonl", {})
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"max_tokens": 6', '"max_tokens": 0')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(WorkloadError, match="w.jsonl line 2: field 'max_tokens' must be an integer >= 1, got 0"):
        harness_cli(["replay", "--workload", str(path), "--out", str(tmp_path / "run")])


@pytest.mark.slow
def test_cli_azure_window_end_to_end(tiny_mha, tmp_path, capsys):
    """workload -> replay -> score through the command line: the real Azure conv trace (busiest 72 s window,
    thinned 4.75x, first 20 requests, rate doubled: about 6 s of arrivals) paired with real QMSum inputs."""
    wl = tmp_path / "azure.jsonl"
    assert harness_cli(["workload", "--model", str(tiny_mha), "--trace", "azure-conv", "--tasks", "qmsum",
                        "--prompt-tokens", "96", "--output-tokens", "8", "--max-requests", "20",
                        "--rate-scale", "2", "--seed", "5", "--output", str(wl)]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["requests"] == 20 and built["synthetic"] == {"trace": False, "weights": False}
    assert harness_cli(["replay", "--workload", str(wl), "--out", str(tmp_path / "run"),
                        "--num-kv-blocks", str(KV_BLOCKS), "--tpot-slo", "0.5"]) == 0
    brief = json.loads(capsys.readouterr().out)
    assert brief["requests"]["total"] == brief["requests"]["ok"] == 20
    assert brief["slo"]["tpot_s"] == 0.5 and brief["throughput"]["output_tokens"] == 160
    assert harness_cli(["score", "--results", brief["files"]["requests_json"],
                        "--output", str(tmp_path / "q.json")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["tasks"]["qmsum"]["scored"] == 20 and scored["headline_scheme"] == "longbench"
