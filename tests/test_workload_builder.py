"""The workload builder: determinism in the seed, lengths, lineage, file round trip and validation errors."""

import json

import pytest

from morphserve.workloads.builder import (PAPER_DOWNSAMPLE, WorkloadError, WorkloadSpec, build_workload,
                                          load_workload, read_requests, summary_path, write_workload)
from morphserve.workloads.tasks import TaskExample
from morphserve.workloads.traces import Trace, TraceRequest

WORDS = "the quick brown fox jumps over the lazy dog while paged attention batches requests".split()


def examples(task: str, n: int, words: int = 120) -> list[TaskExample]:
    out = []
    for i in range(n):
        context = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words + 7 * i))
        out.append(TaskExample(task, f"{task}/{i}", context, f"what about item {i}?", (f"answer {i}",), "en",
                               f"test {i}"))
    return out


def small_trace(n: int = 12) -> Trace:
    return Trace("test", [TraceRequest(0.25 * i, 50 + 10 * i, 3 + i) for i in range(n)], "test", synthetic=False,
                 span_s=0.25 * n)


POOLS = {"qmsum": examples("qmsum", 5), "gov_report": examples("gov_report", 3, words=200)}


def build(tiny_mha, **kw):
    spec = WorkloadSpec(**{"tasks": ("qmsum", "gov_report"), "prompt_tokens": 64, "output_tokens": 8, **kw})
    return build_workload(spec, str(tiny_mha), trace=small_trace(), examples=POOLS, progress=False)


def test_same_seed_same_workload_other_seed_differs(tiny_mha):
    a, b, c = build(tiny_mha, seed=1), build(tiny_mha, seed=1), build(tiny_mha, seed=2)
    assert [r.to_dict() for r in a.requests] == [r.to_dict() for r in b.requests]
    assert [r.example_id for r in a.requests] != [r.example_id for r in c.requests]
    assert {r.task for r in a.requests} == {"qmsum", "gov_report"}


def test_fixed_lengths_and_pool_cycling(tiny_mha):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_mha)
    w = build(tiny_mha, tasks=("qmsum",))
    assert len(w) == 12 and [r.arrival_s for r in w.requests] == [0.25 * i for i in range(12)]
    for r in w.requests:
        assert r.max_tokens == 8 and r.ignore_eos and r.prompt_tokens <= 64
        assert r.prompt_tokens == len(tok(r.prompt)["input_ids"])  # the count is what the engine will see
        assert r.references == (f"answer {int(r.example_id.split('/')[1])}",)
    # without replacement: the first 5 draws cover the pool of 5, and so do the next 5
    ids = [r.example_id for r in w.requests]
    assert len(set(ids[:5])) == 5 and len(set(ids[5:10])) == 5
    s = w.summary
    assert s["workload"]["requests"] == 12 and s["workload"]["rate_rps"] == pytest.approx(12 / 3.0)
    assert s["lengths"]["max_tokens"]["mean"] == 8 and s["tasks"]["qmsum"]["distinct_examples"] == 5
    assert s["inputs"] == {"trace_given": True, "examples_given": True}


def test_trace_lengths_and_context_clipping(tiny_mha):
    trace = Trace("t", [TraceRequest(0.0, 40, 5), TraceRequest(0.1, 900, 300)], "t", synthetic=True)
    spec = WorkloadSpec(tasks=("qmsum",), lengths="trace")
    w = build_workload(spec, str(tiny_mha), trace=trace, examples=POOLS, progress=False)
    r0, r1 = w.requests
    assert (r0.max_tokens, r0.trace_prompt_tokens, r0.trace_output_tokens) == (5, 40, 5) and r0.prompt_tokens <= 40
    # 900 + 300 exceeds the tiny model's 1024 positions: the prompt budget shrinks to 724, the output stays 300
    assert r1.max_tokens == 300 and r1.prompt_tokens <= 724
    assert w.summary["lengths"]["clipped_to_context"] == 1 and w.summary["synthetic"]["trace"] is True


def test_fixed_lengths_must_fit_the_context(tiny_mha):
    with pytest.raises(WorkloadError, match="exceed the context window"):
        build(tiny_mha, prompt_tokens=1000, output_tokens=100)


def test_spec_validation_names_the_bad_value():
    with pytest.raises(WorkloadError, match="unknown trace 'azure'"):
        WorkloadSpec(trace="azure")
    with pytest.raises(WorkloadError, match="rate_scale=0"):
        WorkloadSpec(rate_scale=0)
    with pytest.raises(WorkloadError, match="downsample=0.5"):
        WorkloadSpec(downsample=0.5)
    with pytest.raises(WorkloadError, match="name a task twice"):
        WorkloadSpec(tasks=("qmsum", "qmsum"))
    with pytest.raises(WorkloadError, match="lengths='trace'"):
        WorkloadSpec(lengths="trace", prompt_tokens=10)
    assert WorkloadSpec(trace="burstgpt").downsample_factor == PAPER_DOWNSAMPLE["burstgpt"] == 1.75


def test_file_round_trip(tiny_mha, tmp_path):
    w = build(tiny_mha)
    path, spath = write_workload(w, tmp_path / "w.jsonl", {"git_commit": "x"})
    assert spath == summary_path(path) == tmp_path / "w.summary.json"
    back = load_workload(path)
    assert back.requests == w.requests and back.summary["provenance"] == {"git_commit": "x"}
    assert back.summary["workload"]["sha256"] and back.model == str(tiny_mha)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("max_tokens"), "line 3: field 'max_tokens' is missing"),
    (lambda d: d.update(max_tokens=-3), "line 3: field 'max_tokens' must be an integer >= 1, got -3"),
    (lambda d: d.update(max_tokens=2.5), "line 3: field 'max_tokens' must be an integer >= 1, got 2.5"),
    (lambda d: d.update(arrival_s="soon"), "line 3: field 'arrival_s' must be a finite number"),
    (lambda d: d.update(ignore_eos="yes"), "line 3: field 'ignore_eos' must be true or false"),
    (lambda d: d.update(references=[]), "line 3: field 'references' must be a non-empty list of strings"),
    (lambda d: d.update(prompt=""), "line 3: field 'prompt' must be a non-empty string"),
    (lambda d: d.update(colour="red"), "line 3: unknown field 'colour'"),
    (lambda d: d.update(request_id="r00000"), "request_id 'r00000' repeats request 0"),
    (lambda d: d.update(arrival_s=0.0), "arrival_s 0.0 is earlier than the previous request's 0.25"),
])
def test_broken_lines_name_line_and_field(tiny_mha, tmp_path, mutate, message):
    w = build(tiny_mha)
    path, _ = write_workload(w, tmp_path / "w.jsonl", {})
    lines = path.read_text().splitlines()
    d = json.loads(lines[2])
    mutate(d)
    lines[2] = json.dumps(d)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(WorkloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_requests(path)


def test_broken_files(tiny_mha, tmp_path):
    w = build(tiny_mha)
    path, spath = write_workload(w, tmp_path / "w.jsonl", {})
    text = path.read_text()
    path.write_text(text.replace("\n", "\n\n", 1))
    with pytest.raises(WorkloadError, match="w.jsonl line 2: blank line"):
        read_requests(path)
    path.write_text(text[:-20] + "\n")
    with pytest.raises(WorkloadError, match="w.jsonl line 12: invalid JSON"):
        load_workload(path)
    path.write_text(text.replace('"r00011"', '"r00099"'))  # valid, but not what the summary describes
    with pytest.raises(WorkloadError, match="changed after it was built"):
        load_workload(path)
    spath.unlink()
    with pytest.raises(WorkloadError, match="summary .* does not exist"):
        load_workload(path)
    with pytest.raises(WorkloadError, match="does not exist"):
        load_workload(tmp_path / "missing.jsonl")


def test_real_trace_and_tasks(tiny_mha):
    """The real Azure conv trace (the paper's busiest 72 s window, thinned 4.75x) paired with real QMSum inputs."""
    spec = WorkloadSpec(trace="azure-conv", tasks=("qmsum", "multi_news"), prompt_tokens=128, output_tokens=16,
                        max_requests=20, rate_scale=0.5, seed=3)
    w = build_workload(spec, str(tiny_mha), progress=False)
    s = w.summary
    assert len(w) == 20 and s["synthetic"] == {"trace": False, "weights": False}
    ops = [step["op"] for step in s["trace"]["meta"]["lineage"]]
    assert ops == ["select_window", "downsample", "scale_rate", "truncate"]
    assert s["trace"]["meta"]["sha256"] and s["spec"]["seed"] == 3
    assert all(r.prompt_tokens <= 128 for r in w.requests)
    assert s["lengths"]["prompts_shorter_than_budget"] == 0  # real contexts are far longer than 128 tokens
    assert {r.task for r in w.requests} <= {"qmsum", "multi_news"}
