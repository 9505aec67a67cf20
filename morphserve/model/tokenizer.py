"""Tokenizers of the synthetic-weight model families, built from the files of the data manifest.

``llama2`` (Llama-2, Vicuna, CodeLlama): the 32k SentencePiece ``tokenizer.model`` as a transformers
``LlamaTokenizer`` that prepends ``<s>`` (1).  ``llama3``: the 128k byte-level BPE ``tokenizer.json`` with its
``tokenizer_config.json``, prepending ``<|begin_of_text|>`` (128000).  Each loaded tokenizer is checked against a
known encoding so a silently mis-built tokenizer never reaches the engine.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from morphserve.data.mirror import resolve

FAMILIES = ("llama2", "llama3")

# "Hello world" encoded with special tokens, as the published tokenizers do it.
EXPECTED_HELLO_WORLD = {
    "llama2": [1, 15043, 3186],
    "llama3": [128000, 9906, 1917],
}

_LLAMA2_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "legacy": False,
    "clean_up_tokenization_spaces": False,
}


class TokenizerError(RuntimeError):
    """A tokenizer that loaded but does not encode as the published one does."""


def _check(family: str, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> PreTrainedTokenizerBase:
    got = tokenizer("Hello world")["input_ids"]
    if got != EXPECTED_HELLO_WORLD[family]:
        raise TokenizerError(f"{family} tokenizer encodes 'Hello world' as {got}; "
                             f"expected {EXPECTED_HELLO_WORLD[family]}")
    if len(tokenizer) < vocab_size:
        raise TokenizerError(f"{family} tokenizer has {len(tokenizer)} tokens; expected at least {vocab_size}")
    return tokenizer


def _load_llama2() -> PreTrainedTokenizerBase:
    model_file = resolve("llama2_tokenizer_model")
    with tempfile.TemporaryDirectory(prefix="morphserve-tok-llama2-") as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(_LLAMA2_CONFIG, indent=1), encoding="utf-8")
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    return _check("llama2", tokenizer, 32000)


def _load_llama3() -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory(prefix="morphserve-tok-llama3-") as tmp:
        shutil.copyfile(resolve("llama3_tokenizer_json"), Path(tmp) / "tokenizer.json")
        shutil.copyfile(resolve("llama3_tokenizer_config"), Path(tmp) / "tokenizer_config.json")
        # transformers ignores clean_up_tokenization_spaces=True (the file's value) for BPE and warns; say it.
        tokenizer = AutoTokenizer.from_pretrained(tmp, clean_up_tokenization_spaces=False)
    return _check("llama3", tokenizer, 128256)


@functools.lru_cache(maxsize=None)
def load_tokenizer(family: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``family`` ("llama2" or "llama3"), loaded once per process."""
    if family == "llama2":
        return _load_llama2()
    if family == "llama3":
        return _load_llama3()
    raise ValueError(f"unknown tokenizer family {family!r}; expected one of {', '.join(FAMILIES)}")
