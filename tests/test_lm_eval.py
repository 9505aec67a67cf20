"""lm-eval integration: the ``morphserve`` model and the ``morphserve_*`` tasks score a workload exactly as the
replay harness does (same outputs, same per-request scores, same task means)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

import morphserve.eval
from morphserve.engine.config import EngineConfig
from morphserve.engine.engine import LLMEngine
from morphserve.engine.llm import LLM
from morphserve.engine.sampling_params import SamplingParams
from morphserve.eval.lm_eval_model import MorphServeLM, NotSupportedError
from morphserve.harness.records import read_json, read_request_records
from morphserve.harness.replay import run_replay
from morphserve.workloads.builder import Workload, WorkloadSpec, build_workload, write_workload
from morphserve.workloads.traces import Trace, TraceRequest
from test_workload_builder import examples

TASKS_DIR = Path(morphserve.eval.__file__).parent / "lm_eval_tasks"
TASKS = ["morphserve_qmsum", "morphserve_gov_report"]
OUT_TOKENS = 16
KV_BLOCKS = 256  # 4096 tokens: ample here; the CPU reference path's step time grows with the pool size


@pytest.fixture(scope="module")
def replayed(tiny_mha, tmp_path_factory):
    """A 6-request workload over two tasks, replayed by the harness.  The references are chosen from what the model
    writes (its whole output, the first half of its words, or unrelated words) so that scores span 0 to 100."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    trace = Trace("t", [TraceRequest(0.1 * i, 100, 10) for i in range(6)], "test", synthetic=False)
    spec = WorkloadSpec(tasks=("qmsum", "gov_report"), prompt_tokens=48, output_tokens=OUT_TOKENS, seed=1)
    w = build_workload(spec, str(tiny_mha), trace=trace, progress=False,
                       examples={"qmsum": examples("qmsum", 4), "gov_report": examples("gov_report", 3)})
    outs = LLM(str(tiny_mha), num_kv_blocks=KV_BLOCKS).generate([r.prompt for r in w.requests],
                                       SamplingParams(max_tokens=OUT_TOKENS, ignore_eos=True), use_tqdm=False)
    requests = []
    for i, (r, o) in enumerate(zip(w.requests, outs)):
        words = o.text.split()
        ref = [o.text, " ".join(words[:max(1, len(words) // 2)]), "an unrelated reference summary"][i % 3]
        requests.append(dataclasses.replace(r, references=(ref,)))
    assert {r.task for r in requests} == {"qmsum", "gov_report"}
    path, _ = write_workload(Workload(requests, w.summary), tmp / "w.jsonl", {"test": True})
    engine = LLMEngine(EngineConfig(model=str(tiny_mha), num_kv_blocks=KV_BLOCKS))
    try:
        run = run_replay(path, tmp / "run", engine, progress=False)
    finally:
        engine.close()
    quality, _ = read_json(run["files"]["quality"], "quality")
    return path, run["files"], quality


def evaluate(model, workload: Path) -> dict:
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"workload": str(workload)})
    return lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=tm, log_samples=True)


def check_same_scores(res: dict, files: dict, quality: dict) -> None:
    records, _ = read_request_records(files["requests_json"])
    text = {r.request_id: r.text for r in records}
    per_request = {d["request_id"]: d["scores"] for d in quality["per_request"]}
    for name in TASKS:
        task = name.removeprefix("morphserve_")
        samples = res["samples"][name]
        assert len(samples) == quality["tasks"][task]["scored"]
        for s in samples:
            rid = s["doc"]["request_id"]
            assert s["arguments"][0][0] == s["doc"]["prompt"]  # lm-eval sends the workload's prompt as it is
            assert s["filtered_resps"][0] == text[rid]  # the same output as the replay
            for scheme, value in per_request[rid].items():
                assert s[scheme] == value
        for scheme, d in quality["tasks"][task]["schemes"].items():
            assert res["results"][name][f"{scheme},none"] == pytest.approx(d["mean"], rel=1e-12, abs=1e-12)
    assert 0 < quality["tasks"]["qmsum"]["headline_mean"] < 100  # the references make the numbers non-trivial


def test_lm_eval_generation_gives_the_harness_scores(tiny_mha, replayed):
    path, files, quality = replayed
    check_same_scores(evaluate(MorphServeLM(model=str(tiny_mha), num_kv_blocks=KV_BLOCKS), path), files, quality)


def test_lm_eval_scores_recorded_replay_outputs(replayed):
    path, files, quality = replayed
    check_same_scores(evaluate(MorphServeLM(results=files["requests_json"]), path), files, quality)


def test_registration_and_unsupported_requests(tiny_mha):
    assert get_model("morphserve") is MorphServeLM
    lm = MorphServeLM(model=str(tiny_mha), num_kv_blocks=KV_BLOCKS)
    with pytest.raises(NotSupportedError, match="generate_until only"):
        lm.loglikelihood([])
    with pytest.raises(NotSupportedError, match="rolling"):
        lm.loglikelihood_rolling([])
    with pytest.raises(ValueError, match="batch_size=0"):
        MorphServeLM(model=str(tiny_mha), batch_size=0)


def test_task_without_workload_is_a_clear_error(monkeypatch, replayed):
    import importlib.util

    spec = importlib.util.spec_from_file_location("morphserve_lm_eval_utils", TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    monkeypatch.delenv("MORPHSERVE_WORKLOAD", raising=False)
    with pytest.raises(ValueError, match="MORPHSERVE_WORKLOAD=PATH"):
        utils.load_docs(morphserve_task="qmsum")
    with pytest.raises(ValueError, match="no 'dureader' requests"):
        utils.load_docs(workload=str(replayed[0]), morphserve_task="dureader")
    monkeypatch.setenv("MORPHSERVE_WORKLOAD", str(replayed[0]))
    docs = utils.load_docs(morphserve_task="qmsum", version=1.0)["test"]
    assert len(docs) == replayed[2]["tasks"]["qmsum"]["scored"] and docs[0]["max_tokens"] == OUT_TOKENS


@pytest.mark.slow
def test_lm_eval_command_line(tiny_mha, replayed, tmp_path):
    """The documented command: lm-eval's own CLI, run through morphserve.eval.lm_eval_model."""
    path, files, quality = replayed
    env = {**os.environ, "MORPHSERVE_WORKLOAD": str(path)}
    cmd = [sys.executable, "-m", "morphserve.eval.lm_eval_model", "run", "--model", "morphserve",
           "--model_args", f"model={tiny_mha},num_kv_blocks={KV_BLOCKS}", "--tasks", "morphserve_qmsum",
           "--include_path", str(TASKS_DIR),
           "--device", "cpu", "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.rglob("results_*.json")
    got = json.loads(result.read_text())["results"]["morphserve_qmsum"]
    assert got["longbench,none"] == pytest.approx(quality["tasks"]["qmsum"]["headline_mean"], rel=1e-12)
