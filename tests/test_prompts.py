"""morphserve.workloads.prompts: LongBench templates, middle truncation with the real tokenizers, paper lengths."""

from __future__ import annotations

import os

import pytest

from morphserve.model.config import architecture
from morphserve.workloads.prompts import (LONGBENCH_TEMPLATES, build_prompt, format_prompt, parse_prompt,
                                          prompt_length_for, response_length_for)
from morphserve.workloads.tasks import TaskExample, load_task

needs_mirror = pytest.mark.skipif(not os.environ.get("MORPHSERVE_DATA_MIRROR"),
                                  reason="MORPHSERVE_DATA_MIRROR is not set (tasks, tokenizers: mirror)")

TOKENIZERS = ("smollm2", "llama2", "llama3")


@pytest.fixture(scope="module")
def tokenizers():
    from morphserve.model.tokenizer import load_tokenizer
    from morphserve.model.weight_source import open_source

    return {"smollm2": open_source("smollm2-135m").tokenizer(), "llama2": load_tokenizer("llama2"),
            "llama3": load_tokenizer("llama3")}


@pytest.fixture(scope="module")
def examples():
    """The longest example of each task's first ten (all far longer than any budget used here)."""
    return {task: max(load_task(task)[:10], key=lambda ex: len(ex.context))
            for task in ("gov_report", "qmsum", "dureader", "multi_news")}


def _count(tok, text: str) -> int:
    return len(tok(text, verbose=False)["input_ids"])


@needs_mirror
@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("budget", [512, 1024, 777])
def test_truncation_fits_the_budget_and_keeps_head_and_tail(tokenizers, examples, name, budget) -> None:
    tok = tokenizers[name]
    for task in ("gov_report", "qmsum", "multi_news"):
        full = format_prompt(examples[task])
        assert _count(tok, full) > 2 * budget
        text, n = build_prompt(examples[task], tok, budget)
        assert n == _count(tok, text) <= budget
        assert n >= budget - 4, (task, n)  # the budget is used, not wasted
        assert text[:300] == full[:300] and text[-300:] == full[-300:]
        assert len(text) < len(full) / 2
    text, _ = build_prompt(examples["qmsum"], tok, budget)
    assert text.endswith(f"\n\nQuery: {examples['qmsum'].input}\nAnswer:")


@needs_mirror
@pytest.mark.parametrize("name", TOKENIZERS)
def test_truncation_is_longbench_pred_py(tokenizers, examples, name) -> None:
    """LongBench: tokens = tokenizer(prompt) (with BOS); tokens[:half] + tokens[-half:] decoded and joined.  Where
    re-tokenizing LongBench's text gives more than the budget (Llama-2's SentencePiece does at some junctions),
    build_prompt keeps fewer tokens instead."""
    tok = tokenizers[name]
    same = 0
    for task in ("gov_report", "qmsum", "multi_news", "dureader"):
        tokens = tok(format_prompt(examples[task]), verbose=False)["input_ids"]
        longbench = tok.decode(tokens[:256], skip_special_tokens=True) + tok.decode(tokens[-256:],
                                                                                    skip_special_tokens=True)
        text, n = build_prompt(examples[task], tok, 512)
        if _count(tok, longbench) <= 512:
            assert text == longbench
            same += 1
        else:
            assert text != longbench and n <= 512
    assert same >= 3


@needs_mirror
@pytest.mark.parametrize("name", TOKENIZERS)
def test_chinese_truncation_fits(tokenizers, examples, name) -> None:
    tok = tokenizers[name]
    ex = examples["dureader"]
    for budget in (512, 1024):
        text, n = build_prompt(ex, tok, budget)
        assert n == _count(tok, text) <= budget
        assert n >= budget - 16
        assert text.startswith("请基于给定的文章回答下述问题。\n\n文章：文章1\n标题：")
        assert text.endswith(f"\n\n问题：{ex.input}\n回答：")


@needs_mirror
def test_chat_template_is_inside_the_budget(tokenizers, examples) -> None:
    tok = tokenizers["smollm2"]
    text, n = build_prompt(examples["qmsum"], tok, 1024, chat=True)
    assert n == _count(tok, text) <= 1024 and n >= 1020
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nYou are given a meeting" in text
    assert text.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="has no chat template"):
        build_prompt(examples["qmsum"], tokenizers["llama2"], 1024, chat=True)
    with pytest.raises(ValueError, match="max_prompt_tokens=30 leaves .* need at least 2"):
        build_prompt(examples["qmsum"], tok, 30, chat=True)


@needs_mirror
@pytest.mark.parametrize("name", TOKENIZERS)
def test_short_prompt_is_returned_whole(tokenizers, name) -> None:
    tok = tokenizers[name]
    ex = TaskExample("qmsum", "t", "A: hello .\nB: hi .", "Who spoke?", ("A and B.",), "en", "test")
    text, n = build_prompt(ex, tok, 512)
    assert text == format_prompt(ex) and n == _count(tok, text)


@pytest.mark.parametrize("budget", [0, -5, 1.5, True, "512"])
def test_bad_budget_is_named(budget) -> None:
    ex = TaskExample("gov_report", "t", "report", "", ("s",), "en", "test")
    with pytest.raises(ValueError, match="max_prompt_tokens must be a positive integer"):
        build_prompt(ex, object(), budget)


def test_parse_prompt_inverts_format_and_rejects_foreign_prompts() -> None:
    ex = TaskExample("qmsum", "t", "A: Query: tricky\nAnswer: yes", "What?", ("x",), "en", "test")
    assert parse_prompt("qmsum", format_prompt(ex)) == (ex.context, ex.input)
    with pytest.raises(ValueError, match="does not start with"):
        parse_prompt("gov_report", format_prompt(ex))
    with pytest.raises(ValueError, match="does not end with"):
        parse_prompt("qmsum", format_prompt(ex) + " ")
    with pytest.raises(ValueError, match="no prompt template for task 'trec'"):
        parse_prompt("trec", "x")
    assert set(LONGBENCH_TEMPLATES) == {"gov_report", "qmsum", "dureader", "multi_news"}


def test_paper_lengths_by_attention() -> None:
    assert [prompt_length_for(architecture(m)) for m in ("vicuna-7b", "llama2-7b", "llama3-8b", "codellama-34b",
                                                         "smollm2-135m")] == [512, 512, 1024, 1024, 1024]
    assert [response_length_for(architecture(m)) for m in ("llama2-7b", "llama3-8b")] == [256, 512]
