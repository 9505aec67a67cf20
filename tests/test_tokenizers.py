"""morphserve.model.tokenizer: the llama2 and llama3 tokenizers built from the data mirror."""

from __future__ import annotations

import os

import pytest

from morphserve.data.mirror import resolve
from morphserve.model.tokenizer import load_tokenizer

needs_mirror = pytest.mark.skipif(not os.environ.get("MORPHSERVE_DATA_MIRROR"),
                                reason="MORPHSERVE_DATA_MIRROR is not set (the tokenizers come from the data mirror)")


@needs_mirror
def test_llama2_encodes_with_bos() -> None:
    tok = load_tokenizer("llama2")
    assert tok("Hello world")["input_ids"] == [1, 15043, 3186]
    assert tok("The capital of France is Paris.")["input_ids"] == [1, 450, 7483, 310, 3444, 338, 3681, 29889]
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id, tok.unk_token_id) == \
        ("<s>", 1, "</s>", 2, 0)
    assert len(tok) == 32000
    assert tok.decode(tok("Hello world")["input_ids"], skip_special_tokens=True) == "Hello world"


@needs_mirror
def test_llama2_matches_sentencepiece_on_single_spaced_text() -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(resolve("llama2_tokenizer_model")))
    tok = load_tokenizer("llama2")
    for text in ("Hello world", "Summarize the meeting transcript.", "def f(x): return x + 1", "你好，世界",
                 "naïve café 🙂", "Line one\nLine two"):
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text


@needs_mirror
def test_llama3_encodes_with_bos() -> None:
    tok = load_tokenizer("llama3")
    assert tok("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert tok("Hello, world!")["input_ids"] == [128000, 9906, 11, 1917, 0]
    assert tok("The capital of France is Paris.")["input_ids"] == [128000, 791, 6864, 315, 9822, 374, 12366, 13]
    assert (tok.bos_token_id, tok.eos_token_id) == (128000, 128001)
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    assert tok.decode(tok("Hello world")["input_ids"], skip_special_tokens=True) == "Hello world"


@needs_mirror
def test_tokenizers_are_cached_per_family() -> None:
    assert load_tokenizer("llama2") is load_tokenizer("llama2")
    assert load_tokenizer("llama3") is not load_tokenizer("llama2")


def test_unknown_family_is_named() -> None:
    with pytest.raises(ValueError, match="'gpt2'"):
        load_tokenizer("gpt2")
